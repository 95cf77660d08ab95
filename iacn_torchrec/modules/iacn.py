"""The IaCN auxiliary task: capsule routing → label-aware attention → sampled softmax.

IaCN (Jaiswal & Xiong, RecSys'23) reads a user's history through the aux item table ``E_aux``,
routes it into K_u interest capsules (MIND B2I), lets the target item attend over them and scores
the target against sampled negatives. Its loss ``L_IaCN`` (positives only) is added to the CTR loss
as ``L = L_main + λ·L_IaCN``; the δ gradient split lives on the lookup outputs
(:mod:`iacn_torchrec.modules.gradient_split`), so this module only sees ``E_aux`` views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from iacn_torchrec.modules.attention import label_aware_attention
from iacn_torchrec.modules.capsule import InterestCapsuleRouting
from iacn_torchrec.modules.fused_iacn import fused_iacn_loss
from iacn_torchrec.modules.sampled_softmax import sampled_softmax_loss

SAMPLERS = ("uniform", "log_uniform", "in_batch")


@dataclass
class IaCNConfig:
    """IaCN hyper-parameters.

    Attributes:
        enabled: add the IaCN task (and the aux tables) to the model.
        lam: λ, the weight of ``L_IaCN`` in the total loss (≥ 0; 0 is the "no IaCN loss" control).
        delta: δ ∈ [0, 1], the main model's share of the gradient into ``E_aux`` (1 - δ is IaCN's).
        pow_p: p of the label-aware attention (> 0; ``math.inf`` = hard attention). A larger finite
            p sharpens the weights only for scores above 1 in magnitude and flattens them below 1
            (see :mod:`iacn_torchrec.modules.attention`).
        k_max: K_max, the most interests per user; None = ``ceil(log2 max_len)``.
        routing_iters: r, dynamic-routing iterations.
        aux_dim: dimension of each aux table (h = 2·aux_dim: item ⊕ category).
        keep_width: the main model keeps its plain width: ``E_orig`` gets ``emb_dim - aux_dim`` per
            table, so ``E_orig ⊕ E_aux`` is as wide as the plain model's tables (the DLRM plug-in's
            rule). False (the paper's setting): ``E_orig`` keeps ``emb_dim`` and the main model reads
            ``emb_dim + aux_dim`` per item-side feature, which costs step time (matrix products, a
            second set of table updates) beside what the capsule network costs.
        sampler: negatives for the sampled softmax: ``uniform``, ``log_uniform`` (needs logQ
            correction: ``neg_log_q``), or ``in_batch`` (other positive rows' targets).
        num_negatives: S, sampled negatives per row (not used by ``in_batch``).
        user_profile_layer: add MIND's H-layer (capsule ⊕ user → ReLU MLP → h) when a user feature exists.
        seed: seeds the eval-mode routing logits (fixed, so evaluation is deterministic). The
            training loop's negative samplers and the training-mode routing logits follow the
            run's seed (``TrainConfig.seed``), not this one.
    """

    enabled: bool = False
    lam: float = 1.0
    delta: float = 0.3
    pow_p: float = 2.0
    k_max: int | None = None
    routing_iters: int = 3
    aux_dim: int = 18
    keep_width: bool = False
    sampler: str = "uniform"
    num_negatives: int = 10
    user_profile_layer: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, want: str) -> ValueError:
            return ValueError(f"IaCNConfig.{field} must be {want}, got {getattr(self, field)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

        for field in ("enabled", "keep_width", "user_profile_layer"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "a bool")
        if not is_num(self.lam) or not math.isfinite(self.lam) or self.lam < 0:
            raise bad("lam", "a finite float ≥ 0")
        if not is_num(self.delta) or not 0.0 <= self.delta <= 1.0:
            raise bad("delta", "a float in [0, 1]")
        if not is_num(self.pow_p) or self.pow_p <= 0:
            raise bad("pow_p", "a float > 0 (inf for hard attention)")
        if self.k_max is not None and (not is_int(self.k_max) or self.k_max < 1):
            raise bad("k_max", "None or an int ≥ 1")
        if not is_int(self.routing_iters) or self.routing_iters < 1:
            raise bad("routing_iters", "an int ≥ 1")
        if not is_int(self.aux_dim) or self.aux_dim < 1:
            raise bad("aux_dim", "an int ≥ 1")
        if self.sampler not in SAMPLERS:
            raise bad("sampler", f"one of {', '.join(SAMPLERS)}")
        if not is_int(self.num_negatives) or self.num_negatives < 1:
            raise bad("num_negatives", "an int ≥ 1")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:  # the run's seed range
            raise bad("seed", "an int in [0, 2**32)")
        self.lam = float(self.lam)
        self.delta = float(self.delta)
        self.pow_p = float(self.pow_p)


def _select_jagged_rows(jt: JaggedTensor, rows: torch.Tensor) -> JaggedTensor:
    """The rows ``rows`` (int64 ``[P]``) of a jagged tensor, in that order (any dtype; gradients
    flow back to the selected values)."""
    lengths = jt.lengths().index_select(0, rows)
    starts = jt.offsets()[:-1].index_select(0, rows)
    n = int(lengths.sum())
    new_starts = torch.ops.fbgemm.asynchronous_exclusive_cumsum(lengths)
    index = torch.repeat_interleave(starts - new_starts, lengths, output_size=n) + torch.arange(
        n, device=lengths.device)
    return JaggedTensor(values=jt.values().index_select(0, index), lengths=lengths)


class IaCNInterests(NamedTuple):
    """Intermediate results of :meth:`IaCNTask.interests`, for inspection and the explain tool.

    capsules ``[B, K, h]``, capsule_mask ``[B, K]`` bool, routing_weights ``[B, K, L]`` (last routing
    iteration), attention_weights ``[B, K]`` and user_vec ``[B, h]`` (both None without a target).
    """

    capsules: torch.Tensor
    capsule_mask: torch.Tensor
    routing_weights: torch.Tensor
    attention_weights: torch.Tensor | None
    user_vec: torch.Tensor | None


class IaCNTask(nn.Module):
    """The IaCN auxiliary task on aux embeddings.

    Args:
        config: :class:`IaCNConfig`.
        item_dim: h, dimension of the aux item representation ``c = E_aux(item) ⊕ E_aux(cate)``.
        max_len: L_max, the history length of the batches (fixes K_max's default and the eval
            routing logits).
        user_dim: Du of the user embedding; the user-profile layer is built when this is given and
            ``config.user_profile_layer`` is True.

    Example::

        task = IaCNTask(IaCNConfig(enabled=True), item_dim=36, max_len=20, user_dim=18)
        loss = task(aux_hist, hist_lengths, aux_target, labels, user, aux_negatives)
    """

    def __init__(self, config: IaCNConfig, item_dim: int, max_len: int, user_dim: int | None = None) -> None:
        super().__init__()
        if not isinstance(config, IaCNConfig):
            raise TypeError(f"IaCNTask: config must be an IaCNConfig, got {type(config).__name__}")
        self.config = config
        #: compute the loss with the fused CPU kernel where it applies (:mod:`.fused_iacn`: jagged
        #: history, finite p, sampled negatives, CPU floats); False: always the ATen ops below. The
        #: same function either way (tests/test_fused_iacn.py), so this is an execution choice.
        self.fused = True
        self.item_dim = item_dim
        self.max_len = max_len
        self.routing = InterestCapsuleRouting(
            item_dim=item_dim,
            max_len=max_len,
            k_max=config.k_max,
            routing_iters=config.routing_iters,
            user_dim=user_dim if config.user_profile_layer else None,
            seed=config.seed,
        )

    @property
    def k_max(self) -> int:
        return self.routing.k_max

    def interests(
        self,
        aux_hist: torch.Tensor | JaggedTensor,
        hist_lengths: torch.Tensor | None,
        aux_target: torch.Tensor | None = None,
        user: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        init_logits: torch.Tensor | None = None,
    ) -> IaCNInterests:
        """Capsules, masks and weights for a batch (routing, then attention when a target is given).

        Args: as :meth:`forward`; ``aux_target`` ``[B, h]`` optional.
        """
        if isinstance(aux_hist, JaggedTensor):  # jagged values [N, h]: lengths come with them
            if hist_lengths is not None and hist_lengths.shape != aux_hist.lengths().shape:
                raise ValueError("IaCNTask: hist_lengths must match the JaggedTensor aux_hist's lengths")
            hist_lengths = None
        routed = self.routing.route(aux_hist, hist_lengths, user=user, generator=generator,
                                    init_logits=init_logits)
        attention = user_vec = None
        if aux_target is not None:
            user_vec, attention = label_aware_attention(
                routed.capsules, routed.capsule_mask, aux_target, self.config.pow_p
            )
        return IaCNInterests(
            routed.capsules, routed.capsule_mask, routed.routing_weights, attention, user_vec
        )

    def forward(
        self,
        aux_hist: torch.Tensor | JaggedTensor,
        hist_lengths: torch.Tensor | None,
        aux_target: torch.Tensor,
        labels: torch.Tensor,
        user: torch.Tensor | None = None,
        aux_negatives: torch.Tensor | None = None,
        neg_log_q: torch.Tensor | None = None,
        target_log_q: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
        negative_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        init_logits: torch.Tensor | None = None,
        negative_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The IaCN loss ``L_IaCN = mean over label-1 rows of -log P(e_t | v_u)``.

        Args:
            aux_hist: ``[B, L, h]`` aux history ``c_i``, zero/garbage past ``hist_lengths``; or a
                ``JaggedTensor`` (values ``[N, h]``, its own lengths; the bilinear map then runs on
                the N real behaviours only).
            hist_lengths: ``[B]`` int history lengths n_u.
            aux_target: ``[B, h]`` aux embedding of the target item e_t.
            labels: ``[B]`` click labels; only label-1 rows are scored.
            user: ``[B, Du]`` user embedding (required iff the user-profile layer exists).
            aux_negatives: ``[B, S, h]`` sampled negatives, or ``[P, S, h]`` for the P label-1 rows
                with ``negative_rows`` (required unless ``sampler == "in_batch"`` or no row has
                label 1).
            neg_log_q: ``[B, S]`` log sampling probabilities of the negatives (required for
                ``log_uniform``; optional otherwise).
            target_log_q: ``[B]`` log sampling probabilities of the targets (optional).
            target_ids, negative_ids: ``[B]``, ``[B, S]`` item ids to drop accidental hits (optional).
            generator: RNG for the training-mode routing logits (default: global RNG).
            init_logits: ``[B, K_max, L]`` routing logits to use instead of drawing them (see
                :meth:`InterestCapsuleRouting.training_logits`).
            negative_rows: None when ``aux_negatives`` / ``neg_log_q`` / ``negative_ids`` hold every
                row (``[B, S, ·]``); else the ``[P]`` rows they belong to, which must be the label-1
                rows in order (the loader samples negatives for positives only: ``[P, S, ·]``).

        Returns:
            a scalar; 0 (attached to the graph) when no row has label 1.
        """
        sampler = self.config.sampler
        # L_IaCN scores label-1 rows only, and no part of IaCN couples rows except through positive
        # rows (in-batch candidates are positive rows' targets): route the positive rows alone.
        # The same loss and gradients, for half the routing / attention / loss work on batches
        # with one negative per positive (the din protocol).
        rows = torch.nonzero(labels > 0.5).squeeze(1)
        if sampler == "in_batch":
            if aux_negatives is not None:
                raise ValueError(
                    "IaCNTask: sampler='in_batch' takes no aux_negatives (in-batch negatives are used)"
                )
        elif rows.numel() == 0:  # nothing to score: the loss is 0 whatever the negatives are
            aux_negatives = aux_target.new_zeros(labels.shape[0], 0, aux_target.shape[-1])
            neg_log_q = negative_ids = negative_rows = None
        else:
            if aux_negatives is None:
                raise ValueError(f"IaCNTask: sampler={sampler!r} needs aux_negatives [B, S, h]")
            if sampler == "log_uniform" and neg_log_q is None:
                raise ValueError(
                    "IaCNTask: sampler='log_uniform' needs neg_log_q [B, S] for the logQ correction"
                )
        if negative_rows is not None and not torch.equal(negative_rows, rows):
            neg_only = sorted(set(negative_rows.tolist()) - set(rows.tolist()))
            pos_only = sorted(set(rows.tolist()) - set(negative_rows.tolist()))
            raise ValueError(
                f"IaCNTask: the negatives belong to {negative_rows.numel()} rows, the label-1 rows are "
                f"{rows.numel()} (rows with negatives but label 0: {neg_only[:5]}; label-1 rows without "
                f"negatives: {pos_only[:5]}): sample negatives for exactly the positive rows, or for "
                "every row"
            )
        if (self.fused and rows.numel() > 0 and isinstance(aux_hist, JaggedTensor)
                and labels.shape == aux_target.shape[:1]
                and (hist_lengths is None or hist_lengths.shape == aux_hist.lengths().shape)):
            loss = fused_iacn_loss(self, aux_hist, rows, aux_target, aux_negatives, negative_rows, user,
                                   neg_log_q, target_log_q, target_ids, negative_ids, init_logits, generator)
            if loss is not None:
                return loss
        if 0 < rows.numel() < labels.numel():
            if init_logits is None and self.routing.training:  # drawn for every row, as without the selection
                init_logits = self.routing.training_logits(aux_hist, generator)
            if isinstance(aux_hist, JaggedTensor):
                aux_hist = _select_jagged_rows(aux_hist, rows)
            else:
                aux_hist = aux_hist.index_select(0, rows)
            if init_logits is not None and init_logits.dim() == 3:
                init_logits = init_logits.index_select(0, rows)
            hist_lengths, aux_target, labels, user, target_log_q, target_ids = (
                None if x is None else x.index_select(0, rows)
                for x in (hist_lengths, aux_target, labels, user, target_log_q, target_ids))
            if negative_rows is None:  # per-row negatives: keep the positive rows'
                aux_negatives, neg_log_q, negative_ids = (
                    None if x is None else x.index_select(0, rows)
                    for x in (aux_negatives, neg_log_q, negative_ids))
        out = self.interests(aux_hist, hist_lengths, aux_target, user=user, generator=generator,
                             init_logits=init_logits)
        return sampled_softmax_loss(
            out.user_vec,
            aux_target,
            aux_negatives,
            labels,
            neg_log_q=neg_log_q,
            target_log_q=target_log_q,
            in_batch=sampler == "in_batch",
            target_ids=target_ids,
            negative_ids=negative_ids,
        )
