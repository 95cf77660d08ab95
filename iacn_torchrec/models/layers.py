"""Building blocks shared by the main models: Dice, MLPs, the DIN attention unit, masked pooling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from iacn_torchrec.kernels import capturing_graph, load_kernel

__all__ = [
    "Dice",
    "MLP",
    "AttentionUnit",
    "activation_layer",
    "masked_sum",
    "sequence_mask",
    "effective_length",
    "jagged_history",
    "segment_ids",
    "segment_sum",
    "PackedHistory",
    "pack_history",
    "MASK_FILL",
]

#: score given to padded positions before the softmax (DIEN's code uses -2**32 + 1: finite, so a row
#: with no real behaviour yields no NaN).
MASK_FILL = -(2.0**32) + 1


class Dice(nn.Module):
    """Data-adaptive activation of DIN (Zhou et al., KDD'18, eq. 8).

    ``f(s) = p(s)·s + (1 - p(s))·α·s`` with ``p(s) = sigmoid(BN(s))``; BN without affine terms and
    ``eps = 1e-8`` (DIEN's code has 1e-9: a negligible difference next to the variances here), α
    initialised to 0 (so Dice starts as a smooth ReLU). DIEN's TF
    code normalises with the batch statistics even at inference; here BatchNorm keeps running
    statistics for eval, as DeepCTR-Torch does.

    Shapes: ``[B, H]`` or ``[B, T, H]`` (statistics over every axis but the last).
    """

    def __init__(self, num_features: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        fused = _fused_dice(self, flat)
        if fused is not None:
            return fused.view_as(x)
        p = torch.sigmoid(self.bn(flat)).view_as(x)
        return x * (p + (1.0 - p) * self.alpha)


def _fused_dice(dice: Dice, flat: torch.Tensor) -> torch.Tensor | None:
    """``dice`` on ``flat [M, H]`` through ``csrc/dice.cpp`` (the same function, BatchNorm's running
    statistics updated as ``nn.BatchNorm1d`` updates them), or None where the kernel does not apply:
    non-CPU or mixed dtypes, autocast, a graph being captured (``torch.compile``, fx or TorchScript
    tracing: :func:`~iacn_torchrec.kernels.capturing_graph`), a BatchNorm without running
    statistics, or a training batch of one row (the ATen path then raises BatchNorm's error)."""
    bn = dice.bn
    if (capturing_graph(flat) or torch.is_autocast_enabled("cpu")
            or bn.running_mean is None or bn.num_batches_tracked is None
            or flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64)
            or any(t.device.type != "cpu" or t.dtype != flat.dtype
                   for t in (dice.alpha, bn.running_mean, bn.running_var))
            or (bn.training and flat.shape[0] <= 1)):
        return None
    ext = load_kernel("dice")
    if ext is None:
        return None
    # in training the kernel counts the batch in num_batches_tracked; momentum None (< 0 there) is
    # BatchNorm's cumulative average
    momentum = -1.0 if bn.momentum is None else float(bn.momentum)
    return ext.apply(flat.contiguous(), dice.alpha, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                     bn.training, momentum, float(bn.eps))


def activation_layer(name: str, num_features: int) -> nn.Module:
    """``dice`` | ``prelu`` (per-channel, α init 0.25 as PyTorch; the DIEN code's ``prelu`` starts
    at 0.1) | ``relu`` | ``sigmoid`` | ``none``."""
    name = name.lower()
    if name == "dice":
        return Dice(num_features)
    if name == "prelu":
        return nn.PReLU(num_features)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name in ("none", "linear", "identity"):
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; expected dice, prelu, relu, sigmoid or none")


class _PReLULast(nn.PReLU):
    """PReLU whose channel axis is the last one (nn.PReLU uses axis 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return super().forward(x)
        return torch.where(x >= 0, x, self.weight * x)


class MLP(nn.Module):
    """``[BN] → (Linear → act)×len(hidden) → Linear(out_dim)`` (no activation on the output).

    Args:
        in_dim: input width.
        hidden: hidden widths, e.g. ``(200, 80)``.
        out_dim: output width (1 for a logit); None ⇒ no output layer.
        activation: see :func:`activation_layer`.
        input_bn: BatchNorm1d on the input (DIEN's tower starts with one).
        dropout: dropout after each hidden activation.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = 1,
        activation: str = "relu",
        input_bn: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if input_bn:
            layers.append(nn.BatchNorm1d(in_dim))
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            act = activation_layer(activation, h)
            if isinstance(act, nn.PReLU):
                act = _PReLULast(h)
            layers.append(act)
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        self.out_dim = d
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim] → [..., out_dim]`` (input BN needs a 2-D ``[B, in_dim]`` input)."""
        return self.net(x)


def sequence_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B]`` lengths → ``[B, max_len]`` bool, True at real positions ``t < n``."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def masked_sum(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_t mask[b,t]·seq[b,t]``: ``[B, L, D], [B, L] → [B, D]`` (padded slots never count)."""
    return torch.bmm(mask.unsqueeze(1).to(seq.dtype), seq).squeeze(1)


def segment_ids(lengths: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``[B]`` lengths → ``[N]`` int64 row index of each jagged value (``N = Σ lengths``)."""
    rows = torch.arange(lengths.shape[0], device=lengths.device)
    return torch.repeat_interleave(rows, lengths, output_size=total)


def segment_sum(
    values: torch.Tensor, segments: torch.Tensor, num_rows: int, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """``Σ`` of the jagged ``values [N, ...]`` per row: ``[num_rows, ...]`` (``segments [N]``: the row
    of each value, any order; a row without values gets 0). The jagged twin of :func:`masked_sum`.

    ``offsets [num_rows + 1]``, given when the values are row-major, lets a ``[N, D]`` sum without a
    gradient to record (evaluation) run as ``embedding_bag`` over the values: the same sums in the
    same order, ~6x faster than ``index_add`` on 2,048 rows (whose backward, though, is slow)."""
    if (offsets is not None and values.dim() == 2 and values.dtype in (torch.float32, torch.float64)
            and not (torch.is_grad_enabled() and values.requires_grad)):
        idx = torch.arange(values.shape[0], device=values.device)
        return nn.functional.embedding_bag(idx, values, offsets, mode="sum", include_last_offset=True)
    return values.new_zeros((num_rows, *values.shape[1:])).index_add(0, segments, values)


def jagged_history(hist: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real positions of a padded history ``[B, L, D]`` as jagged values: ``(values [N, D],
    segments [N])``, ``N = Σ min(n_b, L)``, row-major; padded slots (whatever they hold) are dropped."""
    lengths = lengths.clamp(0, hist.shape[1])
    return hist[sequence_mask(lengths, hist.shape[1])], segment_ids(lengths)


class PackedHistory(NamedTuple):
    """A jagged history in :class:`torch.nn.utils.rnn.PackedSequence` order, for recurrences that
    step only the rows still running (see :func:`pack_history`).

    order: ``[B]`` the rows sorted by length, longest first (stable); rank r is row ``order[r]``.
    batch_sizes: ``[T]`` int64 on the CPU: at step t the ranks ``< batch_sizes[t]`` are live
        (``T`` = the longest history; rows with no behaviour are never live).
    index: ``[N]`` the jagged (sample-major) position of each packed entry: packed ``x`` =
        ``values[index]``.
    rows: ``[N]`` the row of each packed entry.
    has_next: ``[N]`` bool, the entry is not its row's last behaviour.
    """

    order: torch.Tensor
    batch_sizes: torch.Tensor
    index: torch.Tensor
    rows: torch.Tensor
    has_next: torch.Tensor


def pack_history(lengths: torch.Tensor, offsets: torch.Tensor) -> PackedHistory:
    """Time-major packing of a jagged history with ``lengths [B]`` and ``offsets [B + 1]``: step
    t holds, longest row first, the t-th behaviour of every row longer than t. A recurrence over it
    does work ∝ ``N = Σ n_b``, not ``B·T`` (Beauty: ~6.6 real behaviours of 20)."""
    lengths = lengths.long()
    sorted_lengths, order = torch.sort(lengths, descending=True, stable=True)
    steps = torch.arange(int(sorted_lengths[0]) if lengths.numel() else 0, device=lengths.device)
    live = steps.unsqueeze(1) < sorted_lengths.unsqueeze(0)  # [T, B], time-major
    starts = offsets[:-1].index_select(0, order)
    index = (starts.unsqueeze(0) + steps.unsqueeze(1))[live]
    rows = order.unsqueeze(0).expand_as(live)[live]
    has_next = (steps.unsqueeze(1) + 1 < sorted_lengths.unsqueeze(0))[live]
    return PackedHistory(order, live.sum(1).cpu(), index, rows, has_next)


def effective_length(hist_lengths: torch.Tensor, max_len: int) -> int:
    """Longest history in the batch (CPU: saves the work on all-padding columns); L on accelerators,
    where reading the max would stall the stream."""
    if hist_lengths.device.type == "cpu" and hist_lengths.numel() > 0:
        return max(1, min(max_len, int(hist_lengths.max())))
    return max_len


class AttentionUnit(nn.Module):
    """DIN's local activation unit, as in the DIEN reference code (``din_attention`` /
    ``din_fcn_attention``).

    ``score_t = MLP([q, k_t, q-k_t, q·k_t])`` (hidden 80 → 40, sigmoid, → 1), masked to real
    positions, normalised with a softmax over t (DIEN's code default ``softmax_stag=1``; DIN's paper
    leaves the scores unnormalised, ``softmax=False`` gives that), output ``Σ_t a_t k_t``.
    ``query_proj=True`` first maps the query to the key width with Linear + PReLU (DIEN's
    ``din_fcn_attention``, used for interest evolution).

    Shapes: query ``[B, Dq]``, keys ``[B, T, Dk]``, mask ``[B, T]`` → (output ``[B, Dk]``,
    weights ``[B, T]``, zero at padded positions; a row without real positions gets all-zero weights).

    With ``activation="dice"`` (not the default) the padded :meth:`forward` in training feeds Dice's
    batch statistics every position, padded ones included; :meth:`forward_jagged` (eager training's
    path) only real ones. Evaluation uses the running statistics, the same in both.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        hidden: Sequence[int] = (80, 40),
        activation: str = "sigmoid",
        softmax: bool = True,
        query_proj: bool = False,
    ) -> None:
        super().__init__()
        if not query_proj and query_dim != key_dim:
            raise ValueError(f"AttentionUnit: query_dim {query_dim} != key_dim {key_dim} needs query_proj")
        self.query_proj = (
            nn.Sequential(nn.Linear(query_dim, key_dim), nn.PReLU(key_dim)) if query_proj else None
        )
        self.mlp = MLP(4 * key_dim, hidden, 1, activation=activation)
        self.softmax = softmax

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.query_proj(query) if self.query_proj is not None else query
        h_q, w_k, w_p = self._first_layer(q, keys.shape[-1])
        # one matmul on [k, q·k]: the padded path keeps the summation order it always had
        h_k = torch.cat([keys, q.unsqueeze(1) * keys], dim=-1) @ torch.cat([w_k, w_p], 1).t()
        scores = self.mlp.net[1:](h_k + h_q.unsqueeze(1)).squeeze(-1)  # [B, T]
        if self.softmax:
            weights = torch.softmax(scores.masked_fill(~mask, MASK_FILL), dim=1) * mask
        else:
            weights = scores * mask
        out = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        return out, weights

    def _first_layer(
        self, q: torch.Tensor, key_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """First layer ``W·[q, k, q-k, q·k] + b = (W_q + W_d)·q + b  +  (W_k - W_d)·k + W_p·(q·k)``:
        the query part once per row instead of once per position (same function and parameters,
        ~half the FLOPs, no ``[·, 4D]`` concatenation).

        Returns ``(h_q [B, H1], W_k - W_d [H1, D], W_p [H1, D])``."""
        first = self.mlp.net[0]
        w_q, w_k, w_d, w_p = first.weight.split(key_dim, dim=1)
        return torch.addmm(first.bias, q, (w_q + w_d).t()), w_k - w_d, w_p

    def forward_jagged(
        self, query: torch.Tensor, values: torch.Tensor, segments: torch.Tensor, num_rows: int,
        offsets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same function on a jagged history: work ∝ ``N = Σ n_b`` real positions, not ``B·T``.

        Args:
            query: ``[B, Dq]``. values: ``[N, Dk]`` the keys of every row, row-major (oldest first).
            segments: ``[N]`` int64 row index of each value (in any order). num_rows: B.
            offsets: ``[B + 1]`` the rows' offsets into ``values`` when the values are row-major
                (``segments`` sorted); given, the fused CPU kernel (``csrc/din_attention.cpp``)
                computes the same function where it applies (see :func:`_fused_attention`).

        Returns ``(output [B, Dk], weights [N])``: per row the (softmax-normalised) weights over its
        own positions; a row without positions gets a zero output, as in :meth:`forward`.
        """
        if offsets is not None:
            fused = _fused_attention(self, query, values, offsets)
            if fused is not None:
                return fused
        q = self.query_proj(query) if self.query_proj is not None else query
        h_q, w_k, w_p = self._first_layer(q, values.shape[-1])
        q_rows = q.index_select(0, segments)  # [N, Dk]
        # two matmuls accumulating in place into the gathered query part, instead of one on
        # cat([k, q·k]) plus an add: no [N, 2Dk] concatenation and no [N, H1] copies (out-of-place
        # addmm copies its input first). Autograd-safe: addmm's backward needs only its two factors.
        h = h_q.index_select(0, segments)
        h.addmm_(values, w_k.t())
        h.addmm_(q_rows * values, w_p.t())
        scores = self.mlp.net[1:](h).squeeze(-1)  # [N]
        if self.softmax:
            # segment softmax: subtract each row's max (a constant per row: no gradient needed)
            row_max = scores.new_full((num_rows,), float("-inf")).scatter_reduce(
                0, segments, scores.detach(), "amax", include_self=True)
            e = torch.exp(scores - row_max.index_select(0, segments))
            denom = segment_sum(e, segments, num_rows)
            weights = e / denom.index_select(0, segments)
        else:
            weights = scores
        out = segment_sum(weights.unsqueeze(-1) * values, segments, num_rows)
        return out, weights


class _FusedAttention:
    """:meth:`AttentionUnit.forward_jagged` through ``csrc/din_attention.cpp``: forward, hand-written
    backward and the autograd node itself in C++ (``DinAttention``), so the main backward runs it
    without the GIL, which the IaCN worker thread's Python holds (``create_graph=True`` raises:
    the kernel's backward has no graph). Inputs: query, values, then the MLP's weights and biases."""

    @staticmethod
    def apply(ext, offsets, layers, query, values, *params):
        out, weights = ext.apply(query, values, offsets, list(params[:layers]), list(params[layers:]))
        return out, weights


def _fused_attention(
    unit: AttentionUnit, query: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``unit.forward_jagged`` through the fused kernel, or None where the kernel does not apply
    (activations other than sigmoid, no softmax, dropout, non-CPU or mixed dtypes, autocast, a graph
    being captured: :func:`~iacn_torchrec.kernels.capturing_graph`): the caller then runs the ATen
    ops. A query projection (DIEN's) runs first as the module it is; the kernel takes its output."""
    layers = list(unit.mlp.net)
    linears, acts = layers[0::2], layers[1::2]
    if (not unit.softmax or capturing_graph(query, values) or torch.is_autocast_enabled("cpu")
            or len(layers) % 2 != 1 or not all(isinstance(m, nn.Linear) for m in linears)
            or not all(isinstance(m, nn.Sigmoid) for m in acts) or linears[-1].out_features != 1):
        return None
    params = [m.weight for m in linears] + [m.bias for m in linears]
    proj = [] if unit.query_proj is None else list(unit.query_proj.parameters())
    if any(t.device.type != "cpu" or t.dtype != values.dtype for t in [query, *proj]):
        return None
    if unit.query_proj is not None:
        query = unit.query_proj(query)
    tensors = [query, values, *params]
    if (any(t is None or t.device.type != "cpu" or t.dtype != values.dtype for t in tensors)
            or values.dtype not in (torch.float32, torch.float64) or offsets.device.type != "cpu"
            or offsets.dtype.is_floating_point or query.dim() != 2 or values.dim() != 2
            or query.shape[1] != values.shape[1] or offsets.shape != (query.shape[0] + 1,)
            or linears[0].in_features != 4 * values.shape[1]):
        return None
    ext = load_kernel("din_attention")
    if ext is None:
        return None
    return _FusedAttention.apply(ext, offsets.long().contiguous(), len(linears), query.contiguous(),
                                 values.contiguous(), *params)
