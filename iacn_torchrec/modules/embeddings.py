"""Interest-aware embeddings: every item-side feature gets an ``E_orig`` and an ``E_aux`` table.

The main model sees ``E = E_orig ⊕ E_aux`` (the aux half with its gradient scaled by δ); IaCN sees
``E_aux`` alone (gradient scaled by 1-δ). With the two scalings the gradient reaching ``E_aux`` is
``(1-δ)·g_IaCN + δ·g_main`` while ``E_orig`` only ever gets ``g_main`` (DESIGN.md, "Gradient split").

Both halves live in TorchRec :class:`~torchrec.modules.embedding_modules.EmbeddingCollection` s
(``self.orig``: ``uid``, ``item_orig``, ``cate_orig``; ``self.aux``: ``item_aux``, ``cate_aux``) so
the planner can place them independently and fused optimizers update them inside backward: the
gradient split is an autograd op on the lookup output, not an optimizer trick.

Initialisation: TorchRec's default for every table, ``U(-sqrt(1/N), sqrt(1/N))`` with N the number
of rows (the same distribution the sharded, fused kernels draw from, so a model initialises alike
sharded or not); ``init_bound=a`` switches to ``U(-a, a)`` for all tables. Draws come from torch's
global RNG in table order (``uid``, ``item_orig``, ``cate_orig``, ``item_aux``, ``cate_aux``), so a
seeded ``torch.manual_seed`` gives the same tables; with ``aux_dim=0`` the ``orig`` tables are
drawn exactly as in the plain model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from iacn_torchrec.kernels import capturing_graph, load_kernel
from iacn_torchrec.modules.gradient_split import scale_grad

__all__ = ["DetachedAuxViews", "EmbeddedBatch", "InterestAwareEmbeddings", "TABLE_NAMES",
           "accumulate_row_grads", "fixed_length_ids"]

#: every table this module can hold, in creation order.
TABLE_NAMES: tuple[str, ...] = ("uid", "item_orig", "cate_orig", "item_aux", "cate_aux")
#: the features only IaCN reads (its sampled negatives), looked up only with aux views.
IACN_NEGATIVE_KEYS: tuple[str, ...] = ("iacn_neg_item", "iacn_neg_cate")


class _PaddedView:
    """An :class:`EmbeddedBatch` history view ``name`` (``[B, L, d]``): set directly, or padded from
    the jagged ``<name>_values`` (offsets ``hist_offsets``) on first access and kept."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.cached, self.values = f"_{name}", f"{name}_values"

    def __get__(self, batch: EmbeddedBatch | None, owner: type | None = None) -> torch.Tensor | None:
        if batch is None:
            return self  # type: ignore[return-value]  # class access: the descriptor itself
        if getattr(batch, self.cached) is None and getattr(batch, self.values) is not None:
            padded = pad_jagged(getattr(batch, self.values), batch.hist_offsets, batch._max_len)
            setattr(batch, self.cached, padded)
        return getattr(batch, self.cached)

    def __set__(self, batch: EmbeddedBatch, value: torch.Tensor | None) -> None:
        setattr(batch, self.cached, value)


class EmbeddedBatch:
    """Dense views of one batch (docs/architecture.md, "Embeddings").

    Attributes:
        user: ``[B, Du]`` user embedding.
        target: ``[B, D]`` target item ``item ⊕ cate``, each ``E_orig ⊕ E_aux`` (aux grad × δ);
            ``D = 2·(orig_dim + aux_dim)``.
        hist: ``[B, L, D]`` behaviour sequence, oldest first, zero past ``hist_lengths``. When the
            batch was built from jagged values (``hist_values``) it is padded on first access only,
            so a main model that works on the jagged values never pays for the padding.
        hist_lengths: ``[B]`` int64 number of real behaviours ``n_u ≤ L``.
        neg_hist: ``[B, L, D]`` DIEN's sampled negative behaviours (zero past ``hist_lengths``) or None;
            padded on first access from ``neg_hist_values`` when those exist.
        aux_target: ``[B, h]`` ``c_t = E_aux(item) ⊕ E_aux(cate)`` (grad × (1-δ)), ``h = 2·aux_dim``;
            None without aux tables or when aux views were not requested.
        aux_hist: ``[B, L, h]`` ``c_i`` of the history (grad × (1-δ)), zero past ``hist_lengths``, or None;
            padded on first access from ``aux_hist_values`` (``[N, h]``) when those exist.
        aux_negatives: ``[R, S, h]`` sampled-softmax negatives (grad × (1-δ)) of the R rows that
            have negatives (every row, or the label-1 rows as the loader samples them), or None.
        target_ids: ``[B]`` target item ids (IaCN collision masking / logQ lookup).
        negative_ids: ``[R, S]`` sampled negative item ids, or None.
        negative_rows: ``[R]`` int64, the rows of ``negative_ids`` / ``aux_negatives``; None when every
            row has negatives (R = B).
        hist_values: ``[N, D]`` the history's jagged values (``N = Σ n_u``, sample-major, oldest
            first), or None when only the padded view exists.
        hist_offsets: ``[B + 1]`` offsets of ``hist_values`` (with ``hist_values``), or None.
        neg_hist_values: ``[N, D]`` the negative behaviours' jagged values (offsets ``hist_offsets``),
            or None.
    """

    # padded lazily from hist_values / neg_hist_values / aux_hist_values (or set directly)
    hist = _PaddedView()
    neg_hist = _PaddedView()
    aux_hist = _PaddedView()

    def __init__(
        self,
        user: torch.Tensor,
        target: torch.Tensor,
        hist: torch.Tensor | None,
        hist_lengths: torch.Tensor,
        neg_hist: torch.Tensor | None = None,
        aux_target: torch.Tensor | None = None,
        aux_hist: torch.Tensor | None = None,
        aux_negatives: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
        negative_ids: torch.Tensor | None = None,
        *,
        hist_values: torch.Tensor | None = None,
        hist_offsets: torch.Tensor | None = None,
        max_len: int | None = None,
    ) -> None:
        if hist is None and (hist_values is None or hist_offsets is None or max_len is None):
            raise ValueError("EmbeddedBatch: give hist [B, L, D] or hist_values, hist_offsets and max_len")
        self.user, self.target, self.hist_lengths = user, target, hist_lengths
        self._hist = hist
        self._neg_hist, self.aux_target, self._aux_hist = neg_hist, aux_target, aux_hist
        self.aux_negatives = aux_negatives
        self.target_ids, self.negative_ids = target_ids, negative_ids
        self.hist_values, self.hist_offsets, self._max_len = hist_values, hist_offsets, max_len
        self.aux_hist_values: torch.Tensor | None = None
        self.neg_hist_values: torch.Tensor | None = None
        self.negative_rows: torch.Tensor | None = None

    def aux_hist_jagged(self) -> JaggedTensor | torch.Tensor | None:
        """IaCN's history view without padding: a ``JaggedTensor`` (values ``[N, h]``) when the
        jagged aux values exist, else the padded ``aux_hist`` (or None)."""
        if self.aux_hist_values is not None:
            return JaggedTensor(values=self.aux_hist_values, lengths=self.hist_lengths,
                                offsets=self.hist_offsets)
        return self.aux_hist

    def __repr__(self) -> str:
        shapes = {k: (list(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in (
            ("user", self.user), ("target", self.target), ("hist", self._hist),
            ("hist_values", self.hist_values), ("neg_hist", self._neg_hist),
            ("neg_hist_values", self.neg_hist_values), ("aux_hist", self._aux_hist),
            ("aux_negatives", self.aux_negatives))}
        return f"EmbeddedBatch({shapes})"


@dataclass
class DetachedAuxViews:
    """IaCN's views of a batch read straight from the plain (unsharded) ``E_aux`` tables, outside
    every autograd graph: what the IaCN worker thread reads
    (:meth:`InterestAwareEmbeddings.detached_aux_views`).

    Each aux table's looked-up rows form one leaf (``rows[t]`` ``[n_t, d]``, ids ``ids[t]``: the
    batch's targets, then its behaviours, then its sampled negatives); the views are slices of their
    concatenation, so the gradients of a loss w.r.t. ``rows`` are the tables' gradients row by row
    (:func:`accumulate_row_grads`), as the lookup's own backward would give.

    Attributes:
        target: ``[B, h]`` ``c_t``. hist_values: ``[N, h]`` the behaviours' ``c_i`` (row-major).
        negatives: ``[R, S, h]`` the sampled negatives of the R rows that have them, or None.
        target_ids: ``[B]``. negative_ids: ``[R, S]`` or None. negative_rows: ``[R]`` or None (R = B).
        tables: the aux tables' weights (``item_aux``, ``cate_aux``). ids: their looked-up row ids.
        rows: the looked-up rows, leaves that require grad.
    """

    target: torch.Tensor
    hist_values: torch.Tensor
    negatives: torch.Tensor | None
    target_ids: torch.Tensor
    negative_ids: torch.Tensor | None
    negative_rows: torch.Tensor | None
    tables: list[torch.Tensor]
    ids: list[torch.Tensor]
    rows: list[torch.Tensor]


def accumulate_row_grads(
    tables: list[torch.Tensor], ids: list[torch.Tensor], grad_rows: list[torch.Tensor], scale: float = 1.0
) -> None:
    """``tables[t].grad.index_add_(0, ids[t], scale · grad_rows[t])`` for every table (a zero ``.grad``
    first where there is none): the gradients of :class:`DetachedAuxViews`' rows into their tables.

    One ``concat_lookup`` kernel call for dense CPU float gradients (``index_add_`` costs ~15 ns a
    row here, and the IaCN join adds ~2k rows a step), ``index_add_`` otherwise. Not recorded by
    autograd."""
    with torch.no_grad():
        for t in tables:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        grads = [t.grad for t in tables]
        ext = load_kernel("concat_lookup") if grads else None
        if ext is not None and all(
                g.layout == torch.strided and g.device.type == "cpu" and g.dim() == 2 and g.is_contiguous()
                and g.dtype in (torch.float32, torch.float64) and r.dtype == g.dtype
                and r.device.type == "cpu"
                for g, r in zip(grads, grad_rows)):
            ext.accumulate_rows(grads, [i.long() for i in ids], list(grad_rows), float(scale))
            return
        for g, i, r in zip(grads, ids, grad_rows):
            g.index_add_(0, i, r if scale == 1.0 else r * scale)


def _table(
    name: str, num_embeddings: int, dim: int, features: list[str], init_bound: float | None
) -> EmbeddingConfig:
    if init_bound is None:
        return EmbeddingConfig(name=name, num_embeddings=num_embeddings, embedding_dim=dim,
                               feature_names=features)
    return EmbeddingConfig(
        name=name, num_embeddings=num_embeddings, embedding_dim=dim, feature_names=features,
        weight_init_min=-init_bound, weight_init_max=init_bound,
        init_fn=partial(nn.init.uniform_, a=-init_bound, b=init_bound),
    )


class InterestAwareEmbeddings(nn.Module):
    """Looks up ``E_orig`` / ``E_aux`` for a batch and returns padded dense views.

    Args:
        num_users, num_items, num_cates: largest id of each kind (ids are ``1..n``, 0 = padding), so
            each table has ``n + 1`` rows.
        max_len: L, the padded history length (the loader truncates histories to at most L).
        orig_dim: per-table dimension of ``E_orig`` (the main model's own embedding).
        aux_dim: per-table dimension of ``E_aux``; 0 ⇒ no aux tables (the plain main model).
        user_dim: dimension of the ``uid`` table. TorchRec requires equal dims within one
            ``EmbeddingCollection``: when ``user_dim != orig_dim`` the ``uid`` table moves to its own
            collection ``self.user`` (otherwise it sits in ``self.orig`` as the contract says).
        with_neg_hist: also embed ``neg_hist_item`` / ``neg_hist_cate`` (DIEN's auxiliary loss).
        with_iacn_negatives: also embed ``iacn_neg_item`` / ``iacn_neg_cate`` into the aux tables.
        init_bound: None ⇒ TorchRec's default init; ``a`` ⇒ ``U(-a, a)`` for every table.
        device: where the tables are allocated.
        after_orig_tables: called once the user and ``E_orig`` tables are drawn, before the aux
            tables (``build_model`` records the RNG state there to pair seeds).

    Example::

        emb = InterestAwareEmbeddings(100, 500, 20, max_len=20, aux_dim=18)
        out = emb(batch.sparse_features, delta=0.5)   # EmbeddedBatch; out.hist: [B, 20, 72]
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        num_cates: int,
        max_len: int,
        orig_dim: int = 18,
        aux_dim: int = 0,
        user_dim: int = 18,
        with_neg_hist: bool = False,
        with_iacn_negatives: bool = False,
        device: torch.device | None = None,
        init_bound: float | None = None,
        *,
        after_orig_tables: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        for field_name, value in (("num_users", num_users), ("num_items", num_items),
                                  ("num_cates", num_cates), ("max_len", max_len),
                                  ("orig_dim", orig_dim), ("user_dim", user_dim)):
            if int(value) < 1:
                raise ValueError(f"InterestAwareEmbeddings: {field_name} must be >= 1, got {value}")
        if aux_dim < 0:
            raise ValueError(f"InterestAwareEmbeddings: aux_dim must be >= 0, got {aux_dim}")
        if with_iacn_negatives and aux_dim == 0:
            raise ValueError("InterestAwareEmbeddings: with_iacn_negatives=True needs aux_dim > 0")
        self.num_users, self.num_items, self.num_cates = num_users, num_items, num_cates
        self.max_len = max_len
        self.orig_dim, self.aux_dim, self.user_dim = orig_dim, aux_dim, user_dim
        self.with_neg_hist = with_neg_hist
        self.with_iacn_negatives = with_iacn_negatives

        item_feats = ["item", "hist_item"] + (["neg_hist_item"] if with_neg_hist else [])
        cate_feats = ["cate", "hist_cate"] + (["neg_hist_cate"] if with_neg_hist else [])
        uid_table = _table("uid", num_users + 1, user_dim, ["uid"], init_bound)
        orig_tables = [
            _table("item_orig", num_items + 1, orig_dim, list(item_feats), init_bound),
            _table("cate_orig", num_cates + 1, orig_dim, list(cate_feats), init_bound),
        ]
        # Table creation order fixes the RNG draw order: uid, item_orig, cate_orig, then aux.
        self.user: EmbeddingCollection | None = None
        if user_dim == orig_dim:
            self.orig = EmbeddingCollection(tables=[uid_table] + orig_tables, device=device)
        else:
            self.user = EmbeddingCollection(tables=[uid_table], device=device)
            self.orig = EmbeddingCollection(tables=orig_tables, device=device)
        if after_orig_tables is not None:
            after_orig_tables()
        self.aux: EmbeddingCollection | None = None
        if aux_dim > 0:
            extra_i = ["iacn_neg_item"] if with_iacn_negatives else []
            extra_c = ["iacn_neg_cate"] if with_iacn_negatives else []
            self.aux = EmbeddingCollection(
                tables=[
                    _table("item_aux", num_items + 1, aux_dim, item_feats + extra_i, init_bound),
                    _table("cate_aux", num_cates + 1, aux_dim, cate_feats + extra_c, init_bound),
                ],
                device=device,
            )

    # ----------------------------------------------------------------------------------- metadata
    @property
    def item_dim(self) -> int:
        """D: dimension of the main model's item representation ``item ⊕ cate``."""
        return 2 * (self.orig_dim + self.aux_dim)

    @property
    def aux_item_dim(self) -> int:
        """h: dimension of IaCN's item representation ``c = E_aux(item) ⊕ E_aux(cate)``."""
        return 2 * self.aux_dim

    def collections(self) -> dict[str, EmbeddingCollection]:
        """The ``EmbeddingCollection`` submodules by attribute name ([``user``], ``orig``, [``aux``])."""
        out: dict[str, EmbeddingCollection] = {"user": self.user} if self.user is not None else {}
        out["orig"] = self.orig
        if self.aux is not None:
            out["aux"] = self.aux
        return out

    def table_configs(self) -> list[EmbeddingConfig]:
        """Every table's ``EmbeddingConfig`` (names from :data:`TABLE_NAMES`) for planners/sharders."""
        return [cfg for ec in self.collections().values() for cfg in ec.embedding_configs()]

    def table_names(self) -> list[str]:
        return [cfg.name for cfg in self.table_configs()]

    def feature_names(self) -> list[str]:
        """KJT keys this module reads."""
        names: list[str] = []
        for cfg in self.table_configs():
            names += [f for f in cfg.feature_names if f not in names]
        return names

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self, kjt: KeyedJaggedTensor, delta: float = 1.0, aux_views: bool = True
    ) -> EmbeddedBatch:
        """Embeds ``kjt`` (keys in docs/architecture.md, "Batches").

        Args:
            kjt: ``uid, item, cate`` (length 1), ``hist_item, hist_cate`` (length n ≤ L) [,
                ``neg_hist_item, neg_hist_cate``] [, ``iacn_neg_item, iacn_neg_cate`` (length S)].
            delta: δ, the share of the main model's gradient reaching ``E_aux``; IaCN's views carry
                1-δ.
            aux_views: build ``aux_target`` / ``aux_hist`` / ``aux_negatives`` (skip at eval or when
                no IaCN task reads them, or reads them itself: :meth:`detached_aux_views`). Without
                them an unsharded collection does not look up IaCN's sampled negatives either.

        The collections are called on ``kjt`` itself and everything after the lookups is one
        ``torch.fx.wrap``-ed function, so TorchRec's train pipelines can trace this module and
        pipeline the (sharded) collections' input distribution.
        """
        _check_features(kjt, self.feature_names())
        features = _key_slices(kjt)
        main_views = None
        if not aux_views or self.aux is None:
            main_views = self._main_views_kernel(kjt, features, delta)
        if main_views is not None:  # the item-side tables in one kernel call; uid on its own
            uid = (self.user if self.user is not None else self.orig).embeddings["uid"]
            user_out = {"uid": uid(features["uid"][0])}
            return _assemble(
                kjt, features, {}, user_out, None, float(delta), False, self.max_len, self.aux_dim,
                self.with_neg_hist, self.with_iacn_negatives, main_views,
            )
        orig = _collection_lookup(self.orig, kjt, features)
        user = _collection_lookup(self.user, kjt, features) if self.user is not None else orig
        skip = () if aux_views else IACN_NEGATIVE_KEYS
        aux = _collection_lookup(self.aux, kjt, features, skip) if self.aux is not None else None
        return _assemble(
            kjt, features, orig, user, aux, float(delta), bool(aux_views), self.max_len, self.aux_dim,
            self.with_neg_hist, self.with_iacn_negatives,
        )

    def _main_views_kernel(
        self, kjt: KeyedJaggedTensor, features: dict[str, tuple[torch.Tensor, torch.Tensor]], delta: float
    ) -> Callable[[list[str]], list[torch.Tensor]] | None:
        """The main model's views through ``csrc/concat_lookup.cpp``: ``views(item_keys)`` returns,
        per item key (``item``, ``hist_item``, ...), ``E_orig(item) ⊕ E_aux(item)·δ-grad ⊕
        E_orig(cate) ⊕ E_aux(cate)·δ-grad`` ``[n, D]`` from one kernel call, one autograd node.
        None where it does not apply (sharded collections; a graph being captured: fx or TorchScript
        tracing, ``torch.compile``; tables that are not plain CPU float ``nn.Embedding``s; no compiled
        kernel): the ATen path runs."""
        if capturing_graph(kjt):
            return None
        collections = [self.orig] + [c for c in (self.user, self.aux) if c is not None]
        if any(type(c) is not EmbeddingCollection for c in collections):
            return None
        names = ["item_orig", "item_aux", "cate_orig", "cate_aux"] if self.aux is not None else [
            "item_orig", "cate_orig"]
        tables = [(self.aux if n.endswith("_aux") else self.orig).embeddings[n] for n in names]
        weights = [t.weight for t in tables]
        if (any(type(t) is not nn.Embedding or t.padding_idx is not None or t.max_norm is not None
                or t.sparse or t.scale_grad_by_freq for t in tables)
                or any(w.device.type != "cpu" or w.dtype != weights[0].dtype or not w.is_contiguous()
                       for w in weights)
                or weights[0].dtype not in (torch.float32, torch.float64)):
            return None
        ext = load_kernel("concat_lookup")
        if ext is None:
            return None
        scales = [float(delta) if n.endswith("_aux") else 1.0 for n in names]
        kinds = [0 if n.startswith("item") else 1 for n in names]

        def views(item_keys: list[str]) -> list[torch.Tensor]:
            ids = [features[k][0] for key in item_keys for k in (key, key.replace("item", "cate"))]
            ids = [i.long().contiguous() for i in ids]  # no copy for the loader's int64 slices
            return _ConcatLookup.apply(ext, weights, ids, scales, kinds)

        return views

    def reads_aux_tables_directly(self) -> bool:
        """Whether :meth:`detached_aux_views` applies: the aux tables are a plain (unsharded)
        ``EmbeddingCollection`` on the CPU."""
        return type(self.aux) is EmbeddingCollection and all(
            t.weight.device.type == "cpu" for t in self.aux.embeddings.values())

    def detached_aux_views(self, kjt: KeyedJaggedTensor) -> DetachedAuxViews:
        """IaCN's views of ``kjt`` (the batch :meth:`forward` embeds) read from the aux tables'
        weights without recording autograd: one ``index_select`` per table into a leaf of rows.

        The values equal :meth:`forward`'s ``aux_target`` / ``aux_hist_values`` / ``aux_negatives``
        (the same rows, not scaled: apply the 1-δ share to the rows' gradients). For the IaCN worker
        thread, which reads them beside the main model's backward and hands its gradients to the
        tables itself; plain collections only (:meth:`reads_aux_tables_directly`).
        """
        if not self.reads_aux_tables_directly():
            raise TypeError(f"{type(self).__name__}.detached_aux_views needs plain CPU aux tables "
                            f"(an unsharded EmbeddingCollection), got {type(self.aux).__name__}")
        assert self.aux is not None
        features = _key_slices(kjt)
        negatives = self.with_iacn_negatives and features["iacn_neg_item"][0].numel() > 0
        negative_ids, negative_rows = _negative_ids(features) if negatives else (None, None)
        tables, ids, rows = [], [], []
        for kind in ("item", "cate"):
            keys = [kind, f"hist_{kind}"] + ([f"iacn_neg_{kind}"] if negatives else [])
            weight = self.aux.embeddings[f"{kind}_aux"].weight
            row_ids = torch.cat([features[k][0] for k in keys])
            tables.append(weight)
            ids.append(row_ids)
            rows.append(weight.detach().index_select(0, row_ids).requires_grad_())
        B, N = features["item"][0].numel(), features["hist_item"][0].numel()
        target, hist_values, neg = torch.cat(rows, dim=1).split([B, N, ids[0].numel() - B - N])
        return DetachedAuxViews(
            target=target, hist_values=hist_values,
            negatives=neg.view(*negative_ids.shape, -1) if negative_ids is not None else None,
            target_ids=features["item"][0], negative_ids=negative_ids, negative_rows=negative_rows,
            tables=tables, ids=ids, rows=rows,
        )


def _key_slices(kjt: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{key: (ids [n_key], lengths [B])}``: views into the KJT's values and lengths at its
    ``offset_per_key`` (which the loader passes in).

    What this module reads of a batch, without TorchRec's ``kjt.to_dict()``: that builds a
    ``JaggedTensor`` per key, and with the per-table outputs those constructions were about half of
    an unsharded forward's Python time (profiled). Variable-stride KJTs go through ``to_dict``.
    """
    if kjt.variable_stride_per_key():
        return {k: (jt.values(), jt.lengths()) for k, jt in kjt.to_dict().items()}
    offsets, values, lengths, B = kjt.offset_per_key(), kjt.values(), kjt.lengths(), kjt.stride()
    return {
        k: (values[offsets[i] : offsets[i + 1]], lengths[i * B : (i + 1) * B])
        for i, k in enumerate(kjt.keys())
    }


def _collection_lookup(
    ec: nn.Module, kjt: KeyedJaggedTensor, features: dict[str, tuple[torch.Tensor, torch.Tensor]],
    skip: tuple[str, ...] = (),
) -> dict[str, JaggedTensor | torch.Tensor]:
    """``ec(kjt)`` (embedding name → ``JaggedTensor``); for a plain (unsharded)
    ``EmbeddingCollection``, the same lookups with one embedding call per *table* instead of one per
    feature, returning the embedded values ``[n, dim]`` only (the lengths are the batch's).

    TorchRec's unsharded collection looks up every feature separately, so a table read by F features
    gets F dense ``[rows, dim]`` gradients (each zero-filled, then summed) in backward; concatenating
    the table's ids first gives one lookup and one dense gradient: the same values and the same
    summed gradient, at 1/F of the whole-table work. Sharded collections (not this class) are called
    as they are. ``skip``: features not to look up (a plain collection only; a sharded one looks up
    every feature of the batch).
    """
    if type(ec) is not EmbeddingCollection or isinstance(kjt, torch.fx.Proxy):
        return ec(kjt)  # sharded, or fx-traced (TorchRec pipelines keep the collections as leaves)
    feature_names, embedding_names = ec._feature_names, ec.embedding_names_by_table()
    if skip:
        kept = [[(f, e) for f, e in zip(fs, es) if f not in skip]
                for fs, es in zip(feature_names, embedding_names)]
        feature_names = [[f for f, _ in k] for k in kept]
        embedding_names = [[e for _, e in k] for k in kept]
    return _table_lookups(features, list(ec.embeddings.values()), feature_names, embedding_names)


def _table_lookups(
    features: dict[str, tuple[torch.Tensor, torch.Tensor]], tables: list[nn.Module],
    feature_names: list[list[str]], embedding_names: list[list[str]],
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for table, feats, names in zip(tables, feature_names, embedding_names):
        ids = [features[f][0] for f in feats]
        if not ids:
            continue
        if len(ids) == 1:
            pieces = [table(ids[0])]
        else:
            pieces = table(torch.cat(ids)).split([i.numel() for i in ids])
        out.update(zip(names, pieces))
    return out


class _ConcatLookup:
    """The ``concat_lookup`` kernel's call (its autograd node is C++), a class so that tests can
    count which path ran."""

    @staticmethod
    def apply(ext, weights: list[torch.Tensor], ids: list[torch.Tensor], scales: list[float],
              kinds: list[int]) -> list[torch.Tensor]:
        return ext.apply(weights, ids, scales, kinds)


def _values(x: JaggedTensor | torch.Tensor) -> torch.Tensor:
    """Embedded values of a lookup output (a sharded collection's ``JaggedTensor`` or ours)."""
    return x if isinstance(x, torch.Tensor) else x.values()


def _check_features(kjt: KeyedJaggedTensor, names: list[str]) -> None:
    missing = [k for k in names if k not in kjt.keys()]
    if missing:
        raise KeyError(f"{__file__}: InterestAwareEmbeddings: the batch KJT lacks feature(s) {missing} "
                       f"(keys: {kjt.keys()})")


def pad_jagged(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[N, d]`` jagged values (row b: ``values[offsets[b]:offsets[b + 1]]``) → ``[B, max_len, d]``,
    zero-padded and truncated to ``max_len``: one fbgemm kernel; float64, which that kernel lacks
    (gradient checks use it), by a gather."""
    if values.dtype != torch.float64:
        return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], 0.0)
    pos = torch.arange(max_len, device=values.device)
    live = pos < (offsets[1:] - offsets[:-1]).unsqueeze(1)  # [B, L]
    # padding gathers an appended zero row: the result stays in values' graph even when N = 0
    idx = (offsets[:-1].unsqueeze(1) + pos).masked_fill(~live, values.shape[0])
    return torch.cat([values, values.new_zeros(1, values.shape[1])])[idx]


def fixed_length_ids(
    values: torch.Tensor, lengths: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ids of a feature with S ids for some samples and none for the others (the loader's sampled
    negatives: label-1 rows only) → ``(ids [R, S], rows [R])`` for the R samples that have any;
    ``rows`` is None when every sample has S ids."""
    has = lengths > 0
    R = int(has.sum())
    if R == 0 or values.numel() % R:
        raise ValueError(f"{__file__}: feature {name!r} must have the same length S for every sample "
                         f"that has any ({R} such samples, {values.numel()} ids)")
    S = values.numel() // R
    bad = has & (lengths != S)
    if lengths.device.type == "cpu" and bool(bad.any()):  # data-dependent: checked on CPU only
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{__file__}: feature {name!r} must have the same length S={S} for every sample "
                         f"that has any (sample {i} has {int(lengths[i])})")
    return values.view(R, S), (None if R == lengths.numel() else torch.nonzero(has).squeeze(1))


def _negative_ids(
    features: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """IaCN's sampled negatives ``(ids [R, S], rows [R] or None)`` (see :func:`fixed_length_ids`)."""
    ids_rows = fixed_length_ids(*features["iacn_neg_item"], "iacn_neg_item")
    if not torch.equal(features["iacn_neg_cate"][1], features["iacn_neg_item"][1]):
        raise ValueError(f"{__file__}: feature 'iacn_neg_cate' must have the lengths of 'iacn_neg_item'")
    return ids_rows


def _assemble(
    kjt: KeyedJaggedTensor,
    features: dict[str, tuple[torch.Tensor, torch.Tensor]],
    orig: dict[str, JaggedTensor | torch.Tensor],
    user_out: dict[str, JaggedTensor | torch.Tensor],
    aux: dict[str, JaggedTensor | torch.Tensor] | None,
    delta: float,
    aux_views: bool,
    max_len: int,
    aux_dim: int,
    with_neg_hist: bool,
    with_iacn_negatives: bool,
    main_views: Callable[[list[str]], list[torch.Tensor]] | None = None,
) -> EmbeddedBatch:
    """Lookups → :class:`EmbeddedBatch`: concatenation, δ / 1-δ gradient scaling, padding.

    ``main_views`` (:meth:`InterestAwareEmbeddings._main_views_kernel`): the main model's views from
    one kernel call instead of ``orig`` / ``aux`` (which are then not read; no aux views).

    All features sharing the history lengths are concatenated on the jagged values first
    (``[N, D]``) and padded once per view, not once per feature or table.
    """
    B = kjt.stride()
    ids = {k: v for k, (v, _) in features.items()}
    for key in ("uid", "item", "cate"):
        n = ids[key].numel()
        if n != B:
            raise ValueError(f"{__file__}: feature {key!r} must have exactly one id per sample "
                             f"(batch {B}, got {n} ids)")
    hist_lengths = features["hist_item"][1].long()
    hist_offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(hist_lengths)
    n_hist = ids["hist_item"].numel()
    if hist_lengths.device.type == "cpu" and hist_lengths.numel() and int(hist_lengths.max()) > max_len:
        raise ValueError(
            f"{__file__}: feature 'hist_item' has a history of length {int(hist_lengths.max())} > "
            f"max_len={max_len}; truncate histories in the loader"
        )
    # length-0 placeholders (an evaluation loader's): the keys exist, no view is built from them
    if with_neg_hist and n_hist and not ids["neg_hist_item"].numel() and not ids["neg_hist_cate"].numel():
        with_neg_hist = False
    if with_iacn_negatives and not ids["iacn_neg_item"].numel() and not ids["iacn_neg_cate"].numel():
        with_iacn_negatives = False
    for key in ("hist_cate",) + (("neg_hist_item", "neg_hist_cate") if with_neg_hist else ()):
        if ids[key].numel() != n_hist:
            raise ValueError(f"{__file__}: feature {key!r} must have the lengths of 'hist_item'")

    fused: dict[str, torch.Tensor] = {}
    if main_views is not None:  # every main view in one call (one zero-filled gradient per table)
        keys = ["item", "hist_item"] + (["neg_hist_item"] if with_neg_hist else [])
        fused = dict(zip(keys, main_views(keys)))

    def main_values(item_f: str, cate_f: str) -> torch.Tensor:
        # [N, D] = item_orig ⊕ item_aux ⊕ cate_orig ⊕ cate_aux, aux halves with grad × δ
        if item_f in fused:
            return fused[item_f]
        if aux is None:
            return torch.cat([_values(orig[item_f]), _values(orig[cate_f])], dim=1)
        return torch.cat([
            _values(orig[item_f]), scale_grad(_values(aux[item_f]), delta),
            _values(orig[cate_f]), scale_grad(_values(aux[cate_f]), delta),
        ], dim=1)

    def aux_values(item_f: str, cate_f: str) -> torch.Tensor:
        # [N, h] = item_aux ⊕ cate_aux with grad × (1-δ)
        assert aux is not None
        return scale_grad(torch.cat([_values(aux[item_f]), _values(aux[cate_f])], dim=1), 1.0 - delta)

    # The padded ``hist`` is built lazily from the jagged values: DIN reads the jagged values.
    out = EmbeddedBatch(
        user=_values(user_out["uid"]),
        target=main_values("item", "cate"),
        hist=None,
        hist_lengths=hist_lengths,
        target_ids=ids["item"],
        hist_values=main_values("hist_item", "hist_cate"),
        hist_offsets=hist_offsets,
        max_len=max_len,
    )
    if with_neg_hist:
        # padded on first .neg_hist access (DIEN reads the jagged values)
        out.neg_hist_values = main_values("neg_hist_item", "neg_hist_cate")
    if with_iacn_negatives and aux_views:
        out.negative_ids, out.negative_rows = _negative_ids(features)
    if aux is not None and aux_views:
        out.aux_target = aux_values("item", "cate")
        out.aux_hist_values = aux_values("hist_item", "hist_cate")  # padded on first .aux_hist access
        if with_iacn_negatives:
            out.aux_negatives = aux_values("iacn_neg_item", "iacn_neg_cate").view(
                *out.negative_ids.shape, 2 * aux_dim)
    return out


# One call_function node under torch.fx: TorchRec's pipeline tracer never runs the checks on proxies.
torch.fx.wrap("_assemble")
torch.fx.wrap("_check_features")
torch.fx.wrap("_table_lookups")
torch.fx.wrap("_key_slices")
