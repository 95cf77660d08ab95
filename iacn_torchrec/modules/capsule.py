"""MIND Behaviour-to-Interest (B2I) dynamic routing: a user's history → K interest capsules.

Symbols follow MIND (Li et al., CIKM'19) and IaCN (Jaiswal & Xiong, RecSys'23):

- ``c_i`` ``[h]``: the aux representation of history item i (``E_aux(item) ⊕ E_aux(cate)``);
- ``S`` ``[h, h]``: one bilinear map shared by all capsules (B2I, unlike the per-capsule maps of
  the original capsule networks);
- ``b_ij``: routing logit of item i to capsule j, ``w_ij = softmax_j(b_ij)`` over the live capsules;
- ``u_j = squash(Σ_i w_ij S c_i)``: interest capsule j; ``b_ij += u_j · S c_i`` between iterations;
- ``K_u = clamp(ceil(log2 n_u), 1, K_max)``: number of live capsules of a user with n_u items.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from iacn_torchrec.modules.embeddings import pad_jagged


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Capsule non-linearity ``squash(s) = |s|² / (1 + |s|²) · s / |s|``; ``squash(0) = 0`` with a
    finite (zero) gradient.

    Args:
        s: ``[..., h, ...]``; squashed along ``dim``.

    Returns:
        a tensor shaped like ``s`` whose vectors along ``dim`` have norm in ``[0, 1)``.
    """
    # |s|²/(1+|s|²) · s/|s| = s · |s|/(1+|s|²): no division by |s|, so squash(0) = 0 with a zero
    # gradient (the 2-norm's gradient at 0 is taken as 0), and 5 ops instead of 8
    if s.dtype in (torch.float16, torch.bfloat16):  # |s|² overflows half from |s| ≈ 256: the factor
        return squash(s.float(), dim).to(s.dtype)  # would be 0 (or the norm inf, and NaN)
    norm = torch.linalg.vector_norm(s, dim=dim, keepdim=True)
    return s * (norm / (1.0 + norm * norm))


def ceil_log2(n: int) -> int:
    """``ceil(log2 n)`` for a positive int, exactly (no floating point); 0 for n ≤ 1."""
    return max(int(n) - 1, 0).bit_length()


class RoutingOutput(NamedTuple):
    """Result of :meth:`InterestCapsuleRouting.route`.

    capsules: ``[B, K_max, h]`` interest capsules ``u_j`` (after the user-profile layer when there
        is one); dead capsules (``j ≥ K_u``) are zero.
    capsule_mask: ``[B, K_max]`` bool, True for the first ``K_u`` (live) capsules.
    routing_weights: ``[B, K_max, L]`` the last iteration's ``w_ij`` (zero for dead capsules and
        padded items); for each real item the weights over live capsules sum to 1.
    """

    capsules: torch.Tensor
    capsule_mask: torch.Tensor
    routing_weights: torch.Tensor


class InterestCapsuleRouting(nn.Module):
    """MIND B2I dynamic routing with a dynamic number of interests and an optional user-profile layer.

    Args:
        item_dim: h, the dimension of the behaviour vectors ``c_i`` and of the capsules.
        max_len: L_max, the longest history this module accepts (fixes the eval logits buffer).
        k_max: K_max, the most interests per user; default ``ceil(log2 L_max)`` (at least 1).
        routing_iters: r, the number of routing iterations (MIND: 3).
        user_dim: Du; when given, MIND's H-layer is added: each capsule is concatenated with the
            user embedding and mapped back to h by a ReLU MLP ``Linear(h+Du, 2h) → ReLU → Linear(2h, h)``.
        seed: seeds the fixed routing logits used in eval mode (``[K_max, L_max]`` drawn once from
            N(0, 1)): eval is deterministic, and the capsules still differ from each other, which
            all-zero logits would not allow (every capsule would receive the same weights).

    In training mode the initial logits are drawn from N(0, 1) on every call, from the ``generator``
    passed to :meth:`forward` or else the global RNG (seeded by the trainer).

    Example::

        routing = InterestCapsuleRouting(item_dim=36, max_len=20)
        capsules, capsule_mask = routing(hist, lengths)    # [B, 20, 36], [B] -> [B, 5, 36], [B, 5]
    """

    def __init__(
        self,
        item_dim: int,
        max_len: int,
        k_max: int | None = None,
        routing_iters: int = 3,
        user_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("item_dim", item_dim), ("max_len", max_len), ("routing_iters", routing_iters)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"InterestCapsuleRouting: {name} must be a positive int, got {value!r}")
        if k_max is None:
            k_max = max(ceil_log2(max_len), 1)
        if not isinstance(k_max, int) or isinstance(k_max, bool) or k_max < 1:
            raise ValueError(f"InterestCapsuleRouting: k_max must be a positive int or None, got {k_max!r}")
        if user_dim is not None and (not isinstance(user_dim, int) or user_dim < 1):
            raise ValueError(
                f"InterestCapsuleRouting: user_dim must be a positive int or None, got {user_dim!r}"
            )
        self.item_dim = item_dim
        self.max_len = max_len
        self.k_max = k_max
        self.routing_iters = routing_iters
        self.user_dim = user_dim

        # S: x ↦ x @ S.T, i.e. S c_i. Scaled so that |S c| ≈ |c| at initialisation (MIND's N(0, 1)
        # would blow the capsules up by sqrt(h) and saturate squash).
        self.bilinear = nn.Parameter(torch.empty(item_dim, item_dim))
        nn.init.normal_(self.bilinear, std=item_dim**-0.5)

        self.user_profile: nn.Module | None = None
        if user_dim is not None:
            self.user_profile = nn.Sequential(
                nn.Linear(item_dim + user_dim, 2 * item_dim),
                nn.ReLU(),
                nn.Linear(2 * item_dim, item_dim),
            )

        gen = torch.Generator().manual_seed(int(seed))
        # Not persistent: a pure function of the seed, so checkpoints need not carry it.
        self.register_buffer("eval_logits", torch.randn(k_max, max_len, generator=gen), persistent=False)
        # Index buffers, so that no tensor is created from Python on every call.
        self.register_buffer("_positions", torch.arange(max_len), persistent=False)
        self.register_buffer("_capsule_ids", torch.arange(k_max), persistent=False)
        # K_u = #{j < K_max : n_u > 2^j} equals ceil(log2 n_u) clamped to K_max, exactly, in ints.
        # (at most 62 powers: 2^63 overflows int64, and no history is that long)
        self.register_buffer("_pow2", 2 ** torch.arange(min(k_max, 62)), persistent=False)

    def num_interests(self, lengths: torch.Tensor) -> torch.Tensor:
        """``K_u = clamp(ceil(log2 n_u), 1, K_max)`` for ``lengths`` ``[B]`` (int) → ``[B]`` int64."""
        return (lengths.unsqueeze(-1) > self._pow2).sum(-1).clamp_min(1)

    def _check_padded(
        self, hist: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validates a padded ``hist [B, L, h]`` with ``lengths [B]`` (jagged input goes through
        :meth:`_map_jagged`)."""
        if lengths is None:
            raise ValueError("InterestCapsuleRouting: lengths [B] is required with a padded hist [B, L, h]")
        if hist.dim() != 3 or hist.size(-1) != self.item_dim:
            raise ValueError(
                f"InterestCapsuleRouting: hist must be [B, L, {self.item_dim}], got {list(hist.shape)}"
            )
        if hist.size(1) > self.max_len:
            raise ValueError(
                f"InterestCapsuleRouting: history length L={hist.size(1)} exceeds max_len={self.max_len}"
            )
        if lengths.shape != hist.shape[:1]:
            raise ValueError(
                f"InterestCapsuleRouting: lengths must be [B]={list(hist.shape[:1])}, "
                f"got {list(lengths.shape)}"
            )
        return hist, lengths

    def _map_jagged(
        self, hist: JaggedTensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``S c_i`` of a jagged history (values ``[N, h]``) → padded ``[B, L_max, h]``, lengths ``[B]``."""
        if lengths is not None:
            raise ValueError(
                "InterestCapsuleRouting: pass lengths only with a padded tensor, not with a JaggedTensor"
            )
        values = hist.values()
        if values.dim() != 2 or values.size(-1) != self.item_dim:
            raise ValueError(
                f"InterestCapsuleRouting: jagged hist values must be [N, {self.item_dim}], "
                f"got {list(values.shape)}"
            )
        lengths = hist.lengths()
        # a data-dependent check: eager CPU only (no device sync, no torch.compile graph break)
        if lengths.device.type == "cpu" and not torch.compiler.is_compiling() and lengths.numel() \
                and int(lengths.max()) > self.max_len:
            raise ValueError(
                f"InterestCapsuleRouting: a history of length {int(lengths.max())} exceeds "
                f"max_len={self.max_len}; truncate it first"
            )
        mapped = pad_jagged(values @ self.bilinear.t(), hist.offsets(), self.max_len)
        return mapped, lengths

    def training_logits(
        self, hist: torch.Tensor | JaggedTensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The training-mode initial logits :meth:`route` would draw for ``hist``: ``[B, K_max, L]``
        from N(0, 1) (L = max_len for a jagged history, which is padded to it)."""
        if isinstance(hist, JaggedTensor):
            return self._draw_logits(hist.lengths().numel(), self.max_len, hist.values(), generator)
        return self._draw_logits(hist.shape[0], hist.shape[1], hist, generator)

    def _draw_logits(
        self, batch: int, seq_len: int, like: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        # no generator=None keyword: torch.compile cannot trace randn(generator=None) on symbolic sizes
        extra = {} if generator is None else {"generator": generator}
        return torch.randn(batch, self.k_max, seq_len, device=like.device, dtype=like.dtype, **extra)

    def route(
        self,
        hist: torch.Tensor | JaggedTensor,
        lengths: torch.Tensor | None = None,
        user: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        init_logits: torch.Tensor | None = None,
    ) -> RoutingOutput:
        """Route a batch of histories into interest capsules.

        Args:
            hist: ``[B, L, h]`` padded behaviour vectors ``c_i`` (L ≤ L_max, oldest first, real items
                first), or a ``JaggedTensor`` with values ``[N, h]`` (then ``lengths`` must be None; it is
                padded to L_max, so histories must already be truncated to the last L_max items).
                Values past a user's length are ignored (no weight, zero gradient) as long as they and
                their ``S c`` are finite (lookups and ``to_padded_dense`` put zeros there).
            lengths: ``[B]`` int, the (truncated) history lengths n_u; clamped to ``[0, L]``.
            user: ``[B, Du]`` user embedding, required iff the module has a user-profile layer.
            generator: RNG for the training-mode initial logits (default: the global RNG).
            init_logits: ``[B, K_max, L]`` or ``[K_max, L]`` initial routing logits overriding both
                the random (train) and the fixed (eval) ones; for tests and explanations.

        Returns:
            :class:`RoutingOutput` (capsules ``[B, K_max, h]``, capsule_mask ``[B, K_max]``,
            routing_weights ``[B, K_max, L]``).
        """
        if isinstance(hist, JaggedTensor):
            # S c_i on the N real behaviours only, then padded (S·0 = 0, so this equals padding first):
            # ~1/3 of the padded [B·L, h] x [h, h] work on Beauty-like histories.
            mapped, lengths = self._map_jagged(hist, lengths)
        else:
            hist, lengths = self._check_padded(hist, lengths)
            mapped = torch.matmul(hist, self.bilinear.t())  # S c_i: [B, L, h]
        batch, seq_len, _ = mapped.shape
        lengths = lengths.clamp(0, seq_len)

        item_mask = self._positions[:seq_len].unsqueeze(0) < lengths.unsqueeze(-1)  # [B, L]
        capsule_mask = self._capsule_ids.unsqueeze(0) < self.num_interests(lengths).unsqueeze(-1)  # [B, K]
        mapped_sg = mapped.detach()  # logits updates carry no gradient (MIND's stop-gradient)

        if init_logits is not None:
            if init_logits.shape[-2:] != (self.k_max, seq_len):
                raise ValueError(
                    f"InterestCapsuleRouting: init_logits must be [B, {self.k_max}, {seq_len}] or "
                    f"[{self.k_max}, {seq_len}], got {list(init_logits.shape)}"
                )
            logits = init_logits.detach().to(mapped.dtype).expand(batch, self.k_max, seq_len)
        elif self.training:
            logits = self._draw_logits(batch, seq_len, mapped, generator)
        else:
            logits = self.eval_logits[:, :seq_len].to(mapped.dtype).expand(batch, self.k_max, seq_len)

        # Dead capsules start at -inf and stay there (the updates are finite), so the softmax over
        # capsules gives them no weight; K_u ≥ 1, so a column is never all -inf. Padded items get
        # weight 0 after the softmax: whatever finite values the padding holds, it adds exact zeros to
        # the capsules and receives a zero gradient (masking the [B, K, L] weights, not the 7x larger
        # [B, L, h] history). The weights carry no gradient (the logits are detached), so all but the
        # last iteration run on the detached S c_i and record nothing for autograd.
        dead = ~capsule_mask.unsqueeze(-1)  # [B, K, 1]
        real = item_mask.unsqueeze(1)  # [B, 1, L]; where(), not a product: padded logits may overflow
        logits = logits.masked_fill(dead, float("-inf"))
        for _ in range(self.routing_iters - 1):
            weights = torch.where(real, torch.softmax(logits, dim=1), 0.0)
            capsules = squash(torch.bmm(weights, mapped_sg))  # u_j = squash(Σ_i w_ij S c_i)
            logits = logits + torch.bmm(capsules, mapped_sg.transpose(1, 2))  # b_ij += u_j · S c_i
        weights = torch.where(real, torch.softmax(logits, dim=1), 0.0)
        capsules = squash(torch.bmm(weights, mapped))  # [B, K, h]

        if self.user_profile is not None:
            if user is None:
                raise ValueError(
                    "InterestCapsuleRouting: this module has a user-profile layer; pass user [B, Du]"
                )
            if user.shape != (batch, self.user_dim):
                raise ValueError(
                    f"InterestCapsuleRouting: user must be [{batch}, {self.user_dim}], got {list(user.shape)}"
                )
            # Linear(u_j ⊕ user) = W_u u_j + (W_user user + b): the user half once per user, no concat.
            first, act, last = self.user_profile
            w = first.weight
            per_user = F.linear(user, w[:, self.item_dim :], first.bias).unsqueeze(1)  # [B, 1, 2h]
            hidden = F.linear(capsules, w[:, : self.item_dim]) + per_user  # [B, K, 2h]
            capsules = last(act(hidden)).masked_fill(dead, 0.0)
        return RoutingOutput(capsules, capsule_mask, weights)

    def forward(
        self,
        hist: torch.Tensor | JaggedTensor,
        lengths: torch.Tensor | None = None,
        user: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route ``hist [B, L, h]`` (or a JaggedTensor) with ``lengths [B]``.

        Returns ``(capsules [B, K_max, h], capsule_mask [B, K_max])``; see :meth:`route` for the arguments.
        """
        out = self.route(hist, lengths, user=user, generator=generator)
        return out.capsules, out.capsule_mask
