"""IaCN for DLRM-style models: an aux twin for named tables of an existing ``EmbeddingBagCollection``.

Two ways in, one idea (DESIGN.md, "Main models"):

* **The plug-in** (:class:`IaCNEmbeddingBagCollection`, :func:`attach_iacn`,
  :class:`EBCModelWithIaCN`): take a model that reads its sparse features through an
  ``EmbeddingBagCollection`` — TorchRec's own :class:`torchrec.models.dlrm.DLRM`, unmodified — and
  swap its EBC for a drop-in wrapper. Every named item table of dim D is split into ``E_orig``
  (D − a) and ``E_aux`` (a); the wrapper emits, per feature, ``pool(E_orig) ⊕ pool(E_aux)`` with the
  aux half's gradient × δ, so the model still sees D-dimensional features (DLRM's interaction needs
  equal dims) and its class and forward are untouched. IaCN reads the behaviour-sequence feature
  through ``E_aux`` (gradient × (1-δ)) and the training step returns ``L_main + λ·L_IaCN``.
* **The framework path** (:class:`DLRMMain`, ``iacn train --model dlrm``): TorchRec's DLRM arches
  (``DenseArch``, ``InteractionArch``, ``OverArch``) as a main model over the framework's
  :class:`~iacn_torchrec.modules.embeddings.EmbeddedBatch`, so :class:`CTRWithIaCN`, the training
  loop, sharding and the experiments treat DLRM like DIN, DIEN and Wide&Deep.

``E_aux`` lives in an :class:`~torchrec.modules.embedding_modules.EmbeddingCollection` (sequence
lookups: IaCN needs every behaviour, not their pool); the main path pools its rows with the
original table's pooling (sum or mean), which is exactly what an ``EmbeddingBag`` of the aux table
would return.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, choose
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    EmbeddingCollection,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from iacn_torchrec.models.layers import effective_length, masked_sum, segment_ids, segment_sum, sequence_mask
from iacn_torchrec.modules.embeddings import EmbeddedBatch, fixed_length_ids, pad_jagged
from iacn_torchrec.modules.gradient_split import scale_grad
from iacn_torchrec.modules.iacn import IaCNTask

__all__ = [
    "DLRMConfig",
    "DLRMMain",
    "EBCIaCNSpec",
    "EBCModelWithIaCN",
    "IaCNEmbeddingBagCollection",
    "IaCNViews",
    "attach_iacn",
    "log_history_length",
]


# ===================================================================================== the plug-in
@dataclass
class EBCIaCNSpec:
    """Which tables and features of an EBC model IaCN uses.

    Attributes:
        aux_tables: names of the EBC tables that get an aux twin (item-side tables, e.g.
            ``("item", "cate")``); IaCN's item representation is ``c = ⊕_t E_aux,t`` in this order.
        target_features: per aux table, the feature holding the target (one id per sample).
        history_features: per aux table, the behaviour-sequence feature (oldest first).
        negative_features: per aux table, a feature with S sampled negatives per sample for the
            sampled softmax (looked up in the aux tables only, never shown to the model), or None for
            the ``in_batch`` sampler.
        user_feature: a feature whose pooled (orig) embedding feeds IaCN's user-profile layer, or None.
        max_len: L, the padded history length (histories longer than this are an error).
    """

    aux_tables: tuple[str, ...] = ("item", "cate")
    target_features: tuple[str, ...] = ("item", "cate")
    history_features: tuple[str, ...] = ("hist_item", "hist_cate")
    negative_features: tuple[str, ...] | None = ("iacn_neg_item", "iacn_neg_cate")
    user_feature: str | None = "uid"
    max_len: int = 20

    def __post_init__(self) -> None:
        n = len(self.aux_tables)
        if n == 0:
            raise ValueError("EBCIaCNSpec.aux_tables: name at least one table")
        for name in ("target_features", "history_features", "negative_features"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"EBCIaCNSpec.{name}: need one feature per aux table ({n}), got {list(v)}")
        if self.max_len < 1:
            raise ValueError(f"EBCIaCNSpec.max_len must be >= 1, got {self.max_len}")


@dataclass
class IaCNViews:
    """IaCN's inputs for one batch (aux views carry gradient × (1-δ)).

    aux_hist ``[B, L, h]``, hist_lengths ``[B]``, aux_target ``[B, h]``, aux_negatives ``[R, S, h]``
    or None, target_ids ``[B]``, negative_ids ``[R, S]`` or None, negative_rows ``[R]`` (None: R = B,
    every row has negatives; the project's loader samples them for label-1 rows only), user
    ``[B, Du]`` (detached) or None.
    """

    aux_hist: torch.Tensor
    hist_lengths: torch.Tensor
    aux_target: torch.Tensor
    aux_negatives: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None
    negative_ids: torch.Tensor | None = None
    negative_rows: torch.Tensor | None = None
    user: torch.Tensor | None = None


def _pool(jt: JaggedTensor, B: int, pooling: PoolingType) -> torch.Tensor:
    """Sum / mean of a jagged ``[N, d]`` lookup per sample → ``[B, d]`` (empty bags give 0, as
    ``nn.EmbeddingBag`` does)."""
    values, lengths = jt.values(), jt.lengths()
    out = segment_sum(values, segment_ids(lengths, values.shape[0]), B)
    if pooling == PoolingType.MEAN:
        out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
    elif pooling != PoolingType.SUM:
        raise ValueError(f"{__file__}: pooling {pooling} is not supported for aux tables (SUM or MEAN)")
    return out


class IaCNEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A drop-in ``EmbeddingBagCollection`` whose named tables are ``E_orig ⊕ E_aux``.

    Args:
        tables: the model's original ``EmbeddingBagConfig`` s (dims D_t). They are reported unchanged
            by :meth:`embedding_bag_configs`, so the model built on them (DLRM's ``SparseArch`` reads
            dims and feature names from there) sees no difference.
        spec: :class:`EBCIaCNSpec` (which tables, which features).
        aux_dim: a, the aux width of every split table (``0 < a < D_t``; the orig table keeps D_t − a).
        delta: δ, the main model's share of the gradient reaching ``E_aux``.
        device: where the tables are allocated.

    ``forward(kjt) -> KeyedTensor`` with the original keys and widths: features of split tables are
    ``pool(E_orig) ⊕ scale_grad(pool(E_aux), δ)``, the others the orig lookup. Extra KJT keys (the
    negatives) are ignored there. The aux lookup of the last training forward is kept for
    :meth:`iacn_views` (one lookup per step; with fused optimizers a second lookup would update twice).
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        spec: EBCIaCNSpec,
        aux_dim: int,
        delta: float = 0.3,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        by_name = {t.name: t for t in tables}
        for i, name in enumerate(spec.aux_tables):
            if name not in by_name:
                raise ValueError(f"EBCIaCNSpec.aux_tables[{i}]={name!r}: no such table "
                                 f"(have {list(by_name)})")
            t = by_name[name]
            if not 0 < aux_dim < t.embedding_dim:
                raise ValueError(f"aux_dim={aux_dim} must be in (0, {t.embedding_dim}) for table {name!r} "
                                 f"(orig dim + aux dim = the table's dim {t.embedding_dim})")
            for fname, feats in (("target_features", spec.target_features),
                                 ("history_features", spec.history_features)):
                if feats[i] not in t.feature_names:
                    raise ValueError(f"EBCIaCNSpec.{fname}[{i}]={feats[i]!r} is not a feature of table "
                                     f"{name!r} (features {t.feature_names})")
        if spec.user_feature is not None and not any(spec.user_feature in t.feature_names for t in tables):
            raise ValueError(f"EBCIaCNSpec.user_feature={spec.user_feature!r} is no table's feature")
        if not 0.0 <= float(delta) <= 1.0:
            raise ValueError(f"IaCNEmbeddingBagCollection: delta must be in [0, 1], got {delta}")
        self.spec, self.aux_dim, self.delta = spec, int(aux_dim), float(delta)
        self._configs = list(tables)
        names_by_table = get_embedding_names_by_table(tables)
        self._embedding_names = [n for names in names_by_table for n in names]
        # per output key: (key, feature, whether it is E_orig ⊕ E_aux)
        self._keys = [(n, f, t.name in spec.aux_tables)
                      for t, names in zip(tables, names_by_table, strict=True)
                      for n, f in zip(names, t.feature_names, strict=True)]
        self._lengths = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._aux_features: dict[str, str] = {}  # feature -> aux table it is looked up in
        # E_orig: the same tables, split ones narrowed to D - a (their own init_fn; features unchanged)
        orig_tables = []
        for t in tables:
            t2 = copy.copy(t)
            t2.feature_names = list(t.feature_names)
            if t.name in spec.aux_tables:
                t2.embedding_dim = t.embedding_dim - aux_dim
            orig_tables.append(t2)
        self.orig = EmbeddingBagCollection(tables=orig_tables, device=device)
        # E_aux: sequence lookups; the negatives feature only ever reaches IaCN
        aux_tables = []
        for i, name in enumerate(spec.aux_tables):
            t = by_name[name]
            feats = list(t.feature_names) + ([spec.negative_features[i]] if spec.negative_features else [])
            for f in feats:
                self._aux_features[f] = name
            aux_tables.append(EmbeddingConfig(name=f"{name}_aux", num_embeddings=t.num_embeddings,
                                              embedding_dim=aux_dim, feature_names=feats))
        self.aux = EmbeddingCollection(tables=aux_tables, device=device)
        self._pooling = {f: t.pooling for t in tables for f in t.feature_names}
        self._last: tuple[KeyedJaggedTensor, dict[str, JaggedTensor], KeyedTensor] | None = None

    # ----------------------------------------------------------- EmbeddingBagCollectionInterface
    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The original configs (full dims), as the wrapped model expects."""
        return self._configs

    def is_weighted(self) -> bool:
        return False

    @property
    def aux_item_dim(self) -> int:
        """h: IaCN's item dimension ``len(aux_tables) · a``."""
        return len(self.spec.aux_tables) * self.aux_dim

    @property
    def user_dim(self) -> int | None:
        if self.spec.user_feature is None:
            return None
        return next(t.embedding_dim for t in self._configs if self.spec.user_feature in t.feature_names)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """``features`` → ``KeyedTensor`` ``[B, Σ D_t]`` in the original key order."""
        missing = [f for f in self._aux_features if f not in features.keys()]
        if missing:
            raise KeyError(f"{__file__}: IaCNEmbeddingBagCollection: the KJT lacks feature(s) {missing} "
                           f"(keys {features.keys()})")
        B = features.stride()
        orig = self.orig(features).to_dict()
        aux = self.aux(features)
        parts = []
        for name, feature, split in self._keys:
            if split:
                pooled_aux = _pool(aux[feature], B, self._pooling[feature])
                parts += [orig[name], scale_grad(pooled_aux, self.delta)]
            else:
                parts.append(orig[name])
        out = KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths,
                          values=torch.cat(parts, dim=1))
        # kept for iacn_views (training only: evaluation never runs IaCN)
        self._last = (features, aux, out) if self.training else None
        return out

    # ------------------------------------------------------------------------------- IaCN side
    def iacn_views(self, features: KeyedJaggedTensor) -> IaCNViews:
        """IaCN's inputs for ``features``, from the aux lookup of the forward on the same KJT (looked
        up afresh if there was none). Aux views carry gradient × (1-δ)."""
        spec = self.spec
        if self._last is not None and self._last[0] is features:
            _, aux, pooled = self._last
        else:
            aux, pooled = self.aux(features), None
        self._last = None  # do not keep the graph alive past this step
        B = features.stride()

        def cat(feats: tuple[str, ...]) -> torch.Tensor:
            return scale_grad(torch.cat([aux[f].values() for f in feats], dim=1), 1.0 - self.delta)

        hist = aux[spec.history_features[0]]
        lengths = hist.lengths().long()
        for f in spec.history_features[1:]:
            if aux[f].values().shape[0] != hist.values().shape[0]:
                raise ValueError(f"{__file__}: history feature {f!r} must have the lengths of "
                                 f"{spec.history_features[0]!r}")
        if lengths.numel() and int(lengths.max()) > spec.max_len:
            raise ValueError(f"{__file__}: feature {spec.history_features[0]!r} has a history of length "
                             f"{int(lengths.max())} > EBCIaCNSpec.max_len={spec.max_len}")
        for f in spec.target_features:
            if aux[f].values().shape[0] != B:
                raise ValueError(f"{__file__}: target feature {f!r} must have one id per sample")
        aux_hist = pad_jagged(cat(spec.history_features), hist.offsets(), spec.max_len)
        views = IaCNViews(aux_hist=aux_hist, hist_lengths=lengths, aux_target=cat(spec.target_features),
                          target_ids=features[spec.target_features[0]].values())
        first = features[spec.negative_features[0]] if spec.negative_features else None
        if first is not None and first.values().numel():  # none at all: no label-1 row, or placeholders
            views.negative_ids, views.negative_rows = fixed_length_ids(
                first.values(), first.lengths(), spec.negative_features[0])
            views.aux_negatives = cat(spec.negative_features).view(*views.negative_ids.shape,
                                                                   self.aux_item_dim)
        if spec.user_feature is not None:
            user = pooled[spec.user_feature] if pooled is not None else self.orig(features)[spec.user_feature]
            # E_orig belongs to the main model (g_main only): IaCN reads the user as a feature
            views.user = user.detach()
        return views


def attach_iacn(
    model: nn.Module, spec: EBCIaCNSpec, aux_dim: int, delta: float = 0.3, ebc_path: str | None = None
) -> str:
    """Replace the ``EmbeddingBagCollection`` of ``model`` (an instance; its class is not touched) with
    an :class:`IaCNEmbeddingBagCollection` over the same table configs; returns the submodule path.

    Args:
        ebc_path: dotted path of the EBC (e.g. ``"sparse_arch.embedding_bag_collection"`` for DLRM);
            None finds the only ``EmbeddingBagCollection`` in ``model``.

    Tables not named in ``spec.aux_tables`` keep their weights; the split tables are freshly
    initialised (their dims change), so a model is meant to be wrapped before training. A weighted
    EBC (per-id weights) is refused: the wrapper's pooling ignores weights.
    """
    if ebc_path is None:
        found = [n for n, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]
        if len(found) != 1:
            raise ValueError(f"attach_iacn: found {len(found)} EmbeddingBagCollections ({found}); "
                             "pass ebc_path")
        ebc_path = found[0]
    ebc = model.get_submodule(ebc_path)
    if isinstance(ebc, IaCNEmbeddingBagCollection):
        raise ValueError(f"attach_iacn: {ebc_path} already has IaCN")
    if ebc.is_weighted():
        raise ValueError(f"attach_iacn: {ebc_path} is a weighted EmbeddingBagCollection; the IaCN wrapper "
                         "pools without per-id weights")
    device = next(ebc.parameters()).device
    wrapper = IaCNEmbeddingBagCollection(ebc.embedding_bag_configs(), spec, aux_dim, delta, device=device)
    with torch.no_grad():  # the tables IaCN does not split are the model's own, trained or not
        for name, bag in wrapper.orig.embedding_bags.items():
            if name not in spec.aux_tables:
                bag.weight.copy_(ebc.embedding_bags[name].weight)
    parent_path, _, attr = ebc_path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, wrapper)
    return ebc_path


def log_history_length(features: KeyedJaggedTensor, feature: str = "hist_item") -> torch.Tensor:
    """A dense feature from the sparse ones: ``log(1 + n_u)`` ``[B, 1]``."""
    return torch.log1p(features[feature].lengths().float()).unsqueeze(1)


class EBCModelWithIaCN(nn.Module):
    """Trains an EBC model (e.g. TorchRec's ``DLRM``) with IaCN: ``L = BCE + λ·L_IaCN``.

    Args:
        model: the model, its EBC already replaced by :func:`attach_iacn` (or built on an
            :class:`IaCNEmbeddingBagCollection`); called as ``model(dense_features, sparse_features)``
            → logits ``[B, 1]`` or ``[B]`` (DLRM's signature).
        iacn: the IaCN task on ``h = aux_item_dim`` (None: the plain model with the wider tables).
        lam: λ (0 ⇒ IaCN is not run); default ``iacn.config.lam`` (1 without a task). Given with a
            task, it must equal the task's, and so must the IaCN EBC's δ (:func:`attach_iacn`): the
            task's config stays the one record of both, as in :class:`CTRWithIaCN`.
        ebc_path: where the IaCN EBC sits in ``model``; None finds it.
        dense_fn: ``kjt → [B, n]`` dense features when a batch has no ``dense_features``.
        item_log_q: ``[num_items + 1]`` log sampling probability of every item id, for the
            log-uniform sampler's logQ correction (required by that sampler), or None.

    ``forward(batch) -> (loss, (logits, main_loss, iacn_loss))`` as :class:`CTRWithIaCN`;
    ``predict(batch)`` → click probabilities without IaCN.
    """

    def __init__(
        self,
        model: nn.Module,
        iacn: IaCNTask | None,
        lam: float | None = None,
        ebc_path: str | None = None,
        dense_fn: Callable[[KeyedJaggedTensor], torch.Tensor] = log_history_length,
        item_log_q: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if ebc_path is None:
            found = [n for n, m in model.named_modules() if isinstance(m, IaCNEmbeddingBagCollection)]
            if len(found) != 1:
                raise ValueError(f"EBCModelWithIaCN: need exactly one IaCNEmbeddingBagCollection in the "
                                 f"model, found {found}; call attach_iacn first")
            ebc_path = found[0]
        if iacn is not None:
            delta = model.get_submodule(ebc_path).delta
            for name, given in (("lam", lam), ("delta", delta)):
                if given is not None and float(given) != float(getattr(iacn.config, name)):
                    where = "lam" if name == "lam" else f"attach_iacn(delta=...) ({ebc_path})"
                    raise ValueError(f"EBCModelWithIaCN: {where} is {given}, the IaCN task's config has "
                                     f"{name}={getattr(iacn.config, name)}; set it in IaCNConfig")
            lam = iacn.config.lam
        lam = 1.0 if lam is None else lam
        if float(lam) < 0:
            raise ValueError(f"EBCModelWithIaCN: lam must be >= 0, got {lam}")
        if iacn is not None and iacn.config.sampler == "log_uniform" and item_log_q is None:
            raise ValueError("EBCModelWithIaCN: IaCN sampler 'log_uniform' needs item_log_q "
                             "(log Q per item id)")
        self.model, self.iacn, self.lam = model, iacn, float(lam)
        self.ebc_path, self.dense_fn = ebc_path, dense_fn
        self.item_log_q: torch.Tensor | None
        if item_log_q is not None:
            if item_log_q.dim() != 1:
                raise ValueError(f"EBCModelWithIaCN: item_log_q must be [num_items + 1], "
                                 f"got {list(item_log_q.shape)}")
            self.register_buffer("item_log_q", item_log_q.detach().float().clone(), persistent=False)
        else:
            self.item_log_q = None

    @property
    def ebc(self) -> IaCNEmbeddingBagCollection:
        return self.model.get_submodule(self.ebc_path)  # type: ignore[return-value]

    def _logits(self, batch: Any) -> torch.Tensor:
        kjt = batch.sparse_features
        dense = getattr(batch, "dense_features", None)
        if dense is None:
            dense = self.dense_fn(kjt)
        logits = self.model(dense, kjt)
        return logits.squeeze(-1) if logits.dim() == 2 else logits

    def iacn_loss(self, views: IaCNViews, labels: torch.Tensor) -> torch.Tensor:
        assert self.iacn is not None
        target_log_q = neg_log_q = None
        if self.item_log_q is not None:  # as CTRWithIaCN: log Q of targets and negatives, by item id
            target_log_q = self.item_log_q[views.target_ids]
            if views.negative_ids is not None:
                neg_log_q = self.item_log_q[views.negative_ids]
        return self.iacn(views.aux_hist, views.hist_lengths, views.aux_target, labels, user=views.user,
                         aux_negatives=views.aux_negatives, target_ids=views.target_ids,
                         negative_ids=views.negative_ids, negative_rows=views.negative_rows,
                         neg_log_q=neg_log_q, target_log_q=target_log_q)

    def forward(self, batch: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        labels = batch.labels.float()
        logits = self._logits(batch)
        main_loss = F.binary_cross_entropy_with_logits(logits, labels)
        if self.iacn is not None and self.lam != 0.0:
            iacn_loss = self.iacn_loss(self.ebc.iacn_views(batch.sparse_features), labels)
            loss = main_loss + self.lam * iacn_loss
        else:
            self.ebc._last = None
            iacn_loss = torch.zeros((), device=logits.device)
            loss = main_loss
        return loss, (logits.detach(), main_loss.detach(), iacn_loss.detach())

    @torch.no_grad()
    def predict(self, batch: Any) -> torch.Tensor:
        """Click probabilities ``[B]`` (call ``eval()`` first)."""
        return torch.sigmoid(self._logits(batch))


# ================================================================ the framework path (--model dlrm)
@dataclass
class DLRMConfig:
    """DLRM arches on the framework's embeddings.

    Attributes:
        dense_arch_hidden: DenseArch hidden widths (the output width, the feature dim d, is appended).
        over_arch_layer_sizes: OverArch widths, ending in 1.
    """

    dense_arch_hidden: tuple[int, ...] = (32,)
    over_arch_layer_sizes: tuple[int, ...] = field(default_factory=lambda: (200, 80, 1))

    def __post_init__(self) -> None:
        if not self.over_arch_layer_sizes or self.over_arch_layer_sizes[-1] != 1:
            raise ValueError("over_arch_layer_sizes must end in 1 (the logit), "
                             f"got {list(self.over_arch_layer_sizes)}")


class DLRMMain(nn.Module):
    """TorchRec's DLRM arches as a main model of :class:`CTRWithIaCN` (``iacn train --model dlrm``).

    Sparse features (F = 5, each ``[B, d]`` with ``d = D/2 = orig_dim + aux_dim``): user, target item,
    target category, mean of the history's items, mean of its categories — the last four are
    ``E_orig ⊕ E_aux`` per table, as the plug-in emits them. Dense feature: ``log(1 + n_u)`` →
    ``DenseArch`` → d. Then ``InteractionArch`` (pairwise dots) and ``OverArch`` → logit.

    DLRM needs equal dims: when ``user_dim ≠ d`` (e.g. IaCN on with the default emb_dim = user_dim)
    the user embedding goes through a bias-free linear map to d. With ``emb_dim + aux_dim = user_dim``
    (``iacn train --model dlrm --emb-dim 12 --aux-dim 6``, or ``--keep-width --aux-dim 6``) there is
    none: the plug-in's setting.

    Args: ``user_dim`` Du, ``item_dim`` D (``item ⊕ cate``), ``max_len`` L, ``config``.
    """

    num_sparse = 5

    def __init__(self, user_dim: int, item_dim: int, max_len: int, config: DLRMConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DLRMConfig()
        if item_dim % 2:
            raise ValueError(f"DLRMMain: item_dim={item_dim} must be item ⊕ cate (even)")
        self.user_dim, self.item_dim, self.max_len = user_dim, item_dim, max_len
        d = self.d = item_dim // 2
        self.user_proj = nn.Linear(user_dim, d, bias=False) if user_dim != d else None
        self.dense_arch = DenseArch(1, list(config.dense_arch_hidden) + [d])
        self.inter_arch = InteractionArch(num_sparse_features=self.num_sparse)
        over_in = d + choose(self.num_sparse, 2) + self.num_sparse
        self.over_arch = OverArch(over_in, list(config.over_arch_layer_sizes))

    def forward(self, emb: EmbeddedBatch) -> tuple[torch.Tensor, None]:
        """Returns (logits ``[B]``, None)."""
        T = effective_length(emb.hist_lengths, emb.hist.shape[1])
        mask = sequence_mask(emb.hist_lengths, T)
        n = emb.hist_lengths.clamp(min=1).unsqueeze(1).to(emb.hist.dtype)
        hist_mean = masked_sum(emb.hist[:, :T], mask) / n
        user = self.user_proj(emb.user) if self.user_proj is not None else emb.user
        d = self.d
        sparse = torch.stack(
            [user, emb.target[:, :d], emb.target[:, d:], hist_mean[:, :d], hist_mean[:, d:]], dim=1
        )  # [B, 5, d]
        dense = self.dense_arch(torch.log1p(emb.hist_lengths.to(emb.hist.dtype)).unsqueeze(1))
        logits = self.over_arch(self.inter_arch(dense_features=dense, sparse_features=sparse))
        return logits.squeeze(-1), None
