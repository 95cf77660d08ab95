"""Deep Interest Evolution Network (Zhou et al., AAAI'19) with the defaults of its reference code."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iacn_torchrec.kernels import capturing_graph, load_kernel
from iacn_torchrec.models.layers import (
    MLP,
    AttentionUnit,
    effective_length,
    jagged_history,
    masked_sum,
    pack_history,
    segment_ids,
    segment_sum,
    sequence_mask,
)
from iacn_torchrec.modules.embeddings import EmbeddedBatch

__all__ = ["DIENConfig", "DIEN", "AUGRUCell", "AUGRU", "next_behaviour_aux_loss"]


@dataclass
class DIENConfig:
    """DIEN hyper-parameters (defaults: ``Model_DIN_V2_Gru_Vec_attGru_Neg`` of the reference code).

    Attributes:
        hidden_size: H, the hidden size of the interest extractor GRU and the AUGRU (the attention
            projects the target to H). None: the item width D the module is given.
            :func:`~iacn_torchrec.models.framework.build_model` passes the *plain* model's item width
            ``2·emb_dim`` (the reference code's ``HIDDEN_SIZE = 18·2``, a constant), so IaCN's wider
            items (``E_orig ⊕ E_aux``) widen the GRU's input but leave its state as it is.
        att_hidden / att_activation: attention unit over the GRU outputs (80 → 40, sigmoid; ``dice``
            in the padded path: see :class:`~iacn_torchrec.models.layers.AttentionUnit`).
        aux_hidden / aux_activation: auxiliary-loss MLP on ``[h_t, e]`` (100 → 50 → 1, sigmoid). The
            reference's ``auxiliary_net`` starts with a BatchNorm on ``[h_t, e]``; this one has none.
        aux_loss_weight: weight of the next-behaviour auxiliary loss (reference: 1).
        tower_hidden / tower_activation / tower_input_bn / dropout: as :class:`DINConfig`.
    """

    hidden_size: int | None = None
    att_hidden: tuple[int, ...] = (80, 40)
    att_activation: str = "sigmoid"
    aux_hidden: tuple[int, ...] = (100, 50)
    aux_activation: str = "sigmoid"
    aux_loss_weight: float = 1.0
    tower_hidden: tuple[int, ...] = (200, 80)
    tower_activation: str = "dice"
    tower_input_bn: bool = True
    dropout: float = 0.0


class AUGRUCell(nn.Module):
    """GRU with attentional update gate (DIEN eq. 6–7): ``ũ = a·u``, ``h = (1-ũ)·h_prev + ũ·h̃``.

    Parameters use :class:`torch.nn.GRUCell`'s layout and init (``weight_ih [3H, Din]`` with gates
    ordered r, z, n). PyTorch's z is the weight on ``h_prev``, so the update gate is ``u = 1 - z``;
    with ``a = 1`` the cell is exactly ``nn.GRUCell``; with ``a = 0`` the state is carried unchanged.
    (DIEN's TF code scales the *keep* gate instead, ``(1-a)·u_keep``; we follow the paper.)
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    def input_projection(self, x: torch.Tensor) -> torch.Tensor:
        """``x W_ihᵀ + b_ih`` for all steps at once: ``[..., Din] → [..., 3H]``."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def step(self, gi: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """One step from a precomputed input projection ``gi [B, 3H]``, state ``h [B, H]``, ``att [B]``."""
        H = self.hidden_size
        gh = torch.addmm(self.bias_hh, h, self.weight_hh.t())
        # split, not slicing: the backward of a split is one concatenation, that of each slice a
        # zero-filled full-size gradient summed with the others
        gi_rz, gi_n = gi.split((2 * H, H), 1)
        gh_rz, gh_n = gh.split((2 * H, H), 1)
        r, z = torch.sigmoid(gi_rz + gh_rz).split(H, 1)
        n = torch.tanh(gi_n + r * gh_n)
        u = att.unsqueeze(1) * (1.0 - z)
        return h + u * (n - h)

    def forward(self, x: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """``x [B, Din]``, ``h [B, H]``, ``att [B]`` → next state ``[B, H]``."""
        return self.step(self.input_projection(x), h, att)


_SAVED_PER_STEP = 7  # h_{t-1}, n, ũ, 1 - z, r, gh_n, σ'(rz)


def _recurrence_step(
    gi_rz: torch.Tensor, gi_n: torch.Tensor, a: torch.Tensor | None, h: torch.Tensor, w_t: torch.Tensor,
    b_hh: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GRU / AUGRU step of the ``S`` live rows from their input projections ``gi_rz [S, 2H]``,
    ``gi_n [S, H]``, state ``h [S, H]`` and attention ``a [S, 1]`` (None: a plain GRU): ``(h_t, n, ũ,
    1 - z, r, gh_n, rz)``, the next state and what the backward keeps. TorchScript-compatible
    (:func:`_scripted_recurrence` runs it in an export)."""
    H = h.shape[1]
    gh_rz, gh_n = torch.addmm(b_hh, h, w_t).split([2 * H, H], 1)
    rz = torch.sigmoid(gi_rz + gh_rz)
    r, z = rz.split(H, 1)
    n = torch.tanh(torch.addcmul(gi_n, r, gh_n))
    one_minus_z = torch.rsub(z, 1.0)
    u = one_minus_z if a is None else a * one_minus_z  # ũ
    return torch.lerp(h, n, u), n, u, one_minus_z, r, gh_n, rz


def _recurrence_steps(
    gi: torch.Tensor, att: torch.Tensor | None, w_hh: torch.Tensor, b_hh: torch.Tensor, sizes: list[int],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The forward of :class:`_PackedRecurrence`: ``(states [N, H], what the backward needs)``,
    :data:`_SAVED_PER_STEP` packed tensors ``[N, ·]`` (seven to save, not seven a step). Without a
    backward to feed, :func:`_recurrence_states` runs the same steps."""
    H = w_hh.shape[1]
    w_t = w_hh.t()
    # per-step views made once (one split each), not sliced in the loop
    gi_rz, gi_n = (x.split(sizes) for x in gi.split((2 * H, H), 1))
    a = att.unsqueeze(1).split(sizes) if att is not None else None
    h = gi.new_zeros(sizes[0], H)
    kept: list[list[torch.Tensor]] = [[] for _ in range(_SAVED_PER_STEP)]
    outs = []
    for t, size in enumerate(sizes):
        if size < h.shape[0]:
            h = h[:size]
        h_next, n, u, one_minus_z, r, gh_n, rz = _recurrence_step(
            gi_rz[t], gi_n[t], None if a is None else a[t], h, w_t, b_hh)
        for store, x in zip(kept, (h, n, u, one_minus_z, r, gh_n, torch.addcmul(rz, rz, rz, value=-1.0))):
            store.append(x)
        outs.append(h_next)
        h = h_next
    return torch.cat(outs), [torch.cat(x) for x in kept]


def _recurrence_states(
    gi: torch.Tensor, att: torch.Tensor | None, w_hh: torch.Tensor, b_hh: torch.Tensor,
    batch_sizes: torch.Tensor,
) -> torch.Tensor:
    """:func:`_recurrence_steps`' states, nothing saved for a backward (autograd's, if any): the
    path without the kernel when no gradient is needed, and, in TorchScript
    (:func:`_scripted_recurrence`), an export's, which reads the step sizes from ``batch_sizes`` when
    it runs (a trace would keep the example's as constants). Sizes of 0 (a traced packing's steps
    past the longest history) end it."""
    H = w_hh.shape[1]
    sizes: list[int] = batch_sizes.tolist()
    w_t = w_hh.t()
    h = gi.new_zeros(sizes[0] if len(sizes) > 0 else 0, H)
    outs: list[torch.Tensor] = []
    start = 0
    for size in sizes:
        if size == 0:
            break
        h = h[:size]
        g = gi[start: start + size]
        a: torch.Tensor | None = None
        if att is not None:
            a = att[start: start + size].unsqueeze(1)
        h = _recurrence_step(g[:, : 2 * H], g[:, 2 * H:], a, h, w_t, b_hh)[0]
        outs.append(h)
        start += size
    if len(outs) == 0:
        return gi.new_zeros(0, H)
    return torch.cat(outs)


@functools.cache
def _scripted_recurrence() -> torch.jit.ScriptFunction:
    return torch.jit.script(_recurrence_states)


class _PackedRecurrence(torch.autograd.Function):
    """The GRU / AUGRU recurrence over packed steps, with a hand-written backward.

    At DIEN's sizes (T ≈ 20 steps of ≤ 128 rows, H = 36) each op is tiny, so a step costs what
    its ops cost to dispatch. Autograd over a per-step loop (and ``nn.GRU`` on a
    ``PackedSequence``, whose per-step cell ops run in C++ but are recorded the same way) keeps a
    node per op and runs each in backward. Here the forward records nothing and saves seven
    packed tensors; the backward walks the steps once and forms the recurrent weight's gradient as
    one matmul over all N entries. A DIEN step: ×0.87 (docs/results/performance-log.md, round 9).

    ``gi [N, 3H]`` the input projections ``x W_ihᵀ + b_ih`` (gates r, z, n), ``att [N]`` or None
    (None: a plain GRU, i.e. a = 1), ``w_hh [3H, H]``, ``b_hh [3H]``, ``sizes`` the rows live
    at each step (non-increasing). Returns every step's state ``[N, H]`` in packed order:
    ``h' = h + ũ ⊙ (n - h)`` with ``ũ = a·(1 - z)`` (``torch.nn.GRU``'s update when a = 1).
    """

    @staticmethod
    def forward(ctx, gi, att, w_hh, b_hh, sizes):  # noqa: D102
        out, saved = _recurrence_steps(gi, att, w_hh, b_hh, sizes)
        ctx.sizes = sizes
        ctx.save_for_backward(att, w_hh, *saved)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        att, w_hh, *saved = ctx.saved_tensors
        sizes = ctx.sizes
        prev = saved[0]
        steps = list(zip(*(x.split(sizes) for x in saved), strict=True))
        a = att.unsqueeze(1).split(sizes) if att is not None else None
        grads = grad_out.split(sizes)
        d_gh, d_pre_n, d_att = [], [], []
        want_att = a is not None and ctx.needs_input_grad[1]
        carry = None  # ∂L/∂h_t flowing back from step t + 1 (its live rows: the first ones)
        for t in range(len(sizes) - 1, -1, -1):
            h, n, u, one_minus_z, r, gh_n, ds = steps[t]
            if carry is None:
                dh = grads[t]
            elif carry.shape[0] == sizes[t]:
                dh = grads[t] + carry
            else:
                dh = grads[t].clone()
                dh[: carry.shape[0]] += carry
            dn = dh * u
            d_u = dh * (n - h)
            dp_n = torch.addcmul(dn, dn, n * n, value=-1.0)  # through tanh: dn (1 - n²)
            d_z = -d_u if a is None else d_u * -a[t]  # ũ = a (1 - z)
            if want_att:
                d_att.append(torch.linalg.vecdot(d_u, one_minus_z))
            dp_rz = torch.cat([dp_n * gh_n, d_z], 1) * ds  # through the sigmoids
            d_gh_t = torch.cat([dp_rz, dp_n * r], 1)
            d_gh.append(d_gh_t)
            d_pre_n.append(dp_n)
            carry = torch.addmm(dh - dn, d_gh_t, w_hh)  # dh (1 - ũ) + ∂gh W_hh
        d_gh.reverse()
        d_pre_n.reverse()
        d_gh_all = torch.cat(d_gh)
        d_gi = torch.cat([d_gh_all[:, : 2 * w_hh.shape[1]], torch.cat(d_pre_n)], 1)
        d_w = None
        if ctx.needs_input_grad[2]:
            d_w = d_gh_all.t().mm(prev)  # Σ_t ∂gh_tᵀ h_{t-1}
        d_b = d_gh_all.sum(0) if ctx.needs_input_grad[3] else None
        d_a = torch.cat(d_att[::-1]) if want_att else None
        return d_gi, d_a, d_w, d_b, None


def packed_recurrence(
    gi: torch.Tensor, att: torch.Tensor | None, w_hh: torch.Tensor, b_hh: torch.Tensor,
    batch_sizes: torch.Tensor,
) -> torch.Tensor:
    """Every step's state ``[N, H]`` of a GRU (``att=None``) or AUGRU over packed input projections
    ``gi [N, 3H]`` (see :class:`_PackedRecurrence`; first-order gradients only, ``batch_sizes`` as
    in a ``PackedSequence``).

    The inputs are computed in their promoted dtype with autocast off (under autocast ``gi`` may be
    bfloat16 while the weights and attention are float32); without gradients nothing is saved."""
    if torch.is_autocast_enabled(gi.device.type):
        with torch.autocast(gi.device.type, enabled=False):
            return packed_recurrence(gi, att, w_hh, b_hh, batch_sizes)
    tensors = [x for x in (gi, att, w_hh, b_hh) if x is not None]
    dtype = functools.reduce(torch.promote_types, [x.dtype for x in tensors])
    gi, w_hh, b_hh = gi.to(dtype), w_hh.to(dtype), b_hh.to(dtype)
    att = att.to(dtype) if att is not None else None
    if torch.jit.is_tracing():  # an export: the step sizes are read when the artefact runs
        return _scripted_recurrence()(gi, att, w_hh, b_hh, batch_sizes)
    sizes = batch_sizes.tolist()
    ext = _recurrence_kernel(gi, att, w_hh, b_hh)
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        if ext is not None:
            return _RecurrenceKernel.apply(ext, gi, att, w_hh, b_hh, sizes)
        return _PackedRecurrence.apply(gi, att, w_hh, b_hh, sizes)
    if ext is not None:
        return ext.steps(gi, att, w_hh, b_hh, sizes)
    return _recurrence_states(gi, att, w_hh, b_hh, batch_sizes)


class _RecurrenceKernel:
    """:class:`_PackedRecurrence` in C++ (``csrc/packed_recurrence.cpp``): a step is one matrix
    product and one loop over its rows for the gates (with a vectorised float exp), written straight
    into packed buffers, where the Python node dispatches ~15 ops a step and ``cat`` s them; equal to
    rounding (1e-12 in float64). The autograd node is C++ too, so the backward runs without the GIL
    (which the IaCN worker thread's Python holds).
    ``create_graph=True`` raises (first-order gradients only, as ``once_differentiable``)."""

    @staticmethod
    def apply(ext, gi, att, w_hh, b_hh, sizes):
        return ext.apply(gi, att, w_hh, b_hh, sizes)


def _recurrence_kernel(gi: torch.Tensor, att: torch.Tensor | None, w_hh: torch.Tensor, b_hh: torch.Tensor):
    """The compiled recurrence kernel where it applies (CPU float32 / float64 inputs, eager mode),
    else None: :class:`_PackedRecurrence` then runs the same ops from Python."""
    tensors = [x for x in (gi, att, w_hh, b_hh) if x is not None]
    if (capturing_graph(*tensors)
            or any(x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) for x in tensors)):
        return None

    return load_kernel("packed_recurrence")


def packed_gru(gru: nn.GRU, inputs: torch.Tensor, batch_sizes: torch.Tensor) -> torch.Tensor:
    """``gru(PackedSequence(inputs, batch_sizes))[0].data`` (zero initial state) for a one-layer,
    unidirectional ``nn.GRU`` with biases, through :func:`packed_recurrence`: ``[N, Din] → [N, H]``."""
    if gru.num_layers != 1 or gru.bidirectional or not gru.bias or gru.proj_size:
        raise ValueError("packed_gru: needs a one-layer, unidirectional nn.GRU with biases")
    gi = F.linear(inputs, gru.weight_ih_l0, gru.bias_ih_l0)  # one matmul for all N behaviours
    return packed_recurrence(gi, None, gru.weight_hh_l0, gru.bias_hh_l0, batch_sizes)


class AUGRU(nn.Module):
    """Runs :class:`AUGRUCell` over a sequence; attention 0 at padded steps leaves the state untouched,
    so the result is each user's state after its last real behaviour (zero for an empty history).

    Shapes: inputs ``[B, T, Din]``, att ``[B, T]`` (zero past the history length) → ``[B, H]``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.cell = AUGRUCell(input_size, hidden_size)

    def forward(self, inputs: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        B, T, _ = inputs.shape
        gi = self.cell.input_projection(inputs)  # one matmul for all T steps
        h = inputs.new_zeros(B, self.cell.hidden_size)
        # unbind, not gi[:, t]: its backward is one stack instead of T full-size zero-filled scatters
        for gi_t, a_t in zip(gi.unbind(1), att.unbind(1), strict=True):
            h = self.cell.step(gi_t, h, a_t)
        return h

    def forward_packed(
        self, inputs: torch.Tensor, att: torch.Tensor, batch_sizes: torch.Tensor, num_rows: int
    ) -> torch.Tensor:
        """The same recurrence on packed inputs ``[N, Din]`` and attention ``[N]`` (the order of
        :func:`~iacn_torchrec.models.layers.pack_history`, ``batch_sizes [T]``): each step updates
        only the rows still running, so the work is ∝ N, not B·T.

        Returns the final states ``[num_rows, H]`` by rank (longest history first), zero for a rank
        without behaviours. Read with tensor ops only, so that a traced export reads them at run time.
        """
        gi = self.cell.input_projection(inputs)  # one matmul for all N behaviours
        states = packed_recurrence(gi, att, self.cell.weight_hh, self.cell.bias_hh, batch_sizes)
        # rank r with n_r behaviours ends at step n_r - 1: its final state is entry starts[n_r - 1] + r,
        # row 1 + that below; a rank without behaviours reads the zero row put first
        sizes = batch_sizes.to(device=states.device, dtype=torch.long)
        ranks = torch.arange(num_rows, device=states.device)
        n_steps = (sizes.unsqueeze(0) > ranks.unsqueeze(1)).sum(1)
        starts = torch.cumsum(sizes, 0) - sizes
        last = starts.index_select(0, (n_steps - 1).clamp_min(0)) + ranks + 1
        last = torch.where(n_steps > 0, last, 0)
        return torch.cat([states.new_zeros(1, states.shape[1]), states]).index_select(0, last)


def next_behaviour_aux_loss(
    net: nn.Module,
    states: torch.Tensor,
    hist: torch.Tensor,
    neg_hist: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """DIEN's auxiliary loss: the state after behaviour t must tell the next real behaviour t+1 from a
    sampled negative at t+1.

    ``L_aux = (1/V) Σ_{b, t < n_b - 1} [-log σ(f(h_t, e_{t+1})) - log(1 - σ(f(h_t, ê_{t+1})))]`` with V the
    number of such positions (padding never counts; DIEN's code averages over padded slots too).

    Shapes: states ``[B, T, H]``, hist / neg_hist ``[B, T, D]``, mask ``[B, T]`` (real positions).
    """
    valid = mask[:, 1:]  # position t is used iff t+1 is a real behaviour
    # only valid rows reach the MLP
    return _next_behaviour_loss(net, states[:, :-1][valid], hist[:, 1:][valid], neg_hist[:, 1:][valid])


def _next_behaviour_loss(
    net: nn.Module, h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> torch.Tensor:
    """:func:`next_behaviour_aux_loss` on its V selected triples: states ``h [V, H]``, next real
    behaviours ``pos [V, D]``, sampled negatives ``neg [V, D]``."""
    if h.shape[0] == 0:
        return h.sum() * 0.0
    fused = _fused_next_behaviour_loss(net, h, pos, neg)
    if fused is not None:
        return fused
    logits = net(torch.cat([torch.cat([h, pos], 1), torch.cat([h, neg], 1)], 0)).squeeze(-1)  # [2V]
    V = h.shape[0]
    targets = torch.cat([logits.new_ones(V), logits.new_zeros(V)])
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / V


class _NextBehaviourLossKernel:
    """:func:`_next_behaviour_loss` through ``csrc/next_behaviour_loss.cpp``: the MLP's first layer
    split as ``W_h h + W_e e + b`` (``W_h h`` once for the positive and the negative, no ``[h, e]``
    concatenations), the later layers as DIN's attention kernel runs them (``csrc/sigmoid_mlp.h``);
    forward, backward and autograd node in C++ (the main backward runs it without the GIL).
    ``create_graph=True`` raises."""

    @staticmethod
    def apply(ext, h, pos, neg, weights, biases):
        return ext.apply(h, pos, neg, weights, biases)


def _fused_next_behaviour_loss(
    net: nn.Module, h: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
) -> torch.Tensor | None:
    """The loss through the fused kernel, or None where it does not apply (an MLP other than
    Linear → sigmoid → … → Linear(·, 1), e.g. with dropout or input BN; non-CPU or mixed dtypes;
    autocast; a graph being captured, :func:`~iacn_torchrec.kernels.capturing_graph`): the caller
    then runs the ATen ops."""
    layers = list(getattr(net, "net", ()))
    linears, acts = layers[0::2], layers[1::2]
    tensors = [h, pos, neg]
    if (not layers or len(layers) % 2 != 1 or not all(isinstance(m, nn.Linear) for m in linears)
            or not all(isinstance(m, nn.Sigmoid) for m in acts) or linears[-1].out_features != 1
            or len(linears) < 2 or any(m.bias is None for m in linears)
            or capturing_graph(*tensors) or torch.is_autocast_enabled("cpu")):
        return None
    weights, biases = [m.weight for m in linears], [m.bias for m in linears]
    everything = tensors + weights + biases
    if any(x.device.type != "cpu" or x.dtype != h.dtype for x in everything) or h.dtype not in (
            torch.float32, torch.float64):
        return None
    ext = load_kernel("next_behaviour_loss")
    if ext is None:
        return None
    return _NextBehaviourLossKernel.apply(ext, h.contiguous(), pos.contiguous(), neg.contiguous(),
                                          weights, biases)


class DIEN(nn.Module):
    """DIEN on an :class:`EmbeddedBatch`.

    Interest extractor: ``nn.GRU`` (hidden H, ``DIENConfig.hidden_size``) over the history. The GRU
    is causal and histories are left-aligned (oldest first), so the outputs at real positions never
    see padding; outputs past the length are zeroed. Next-behaviour auxiliary loss on the extractor
    states (needs ``emb.neg_hist``; computed in training mode only). Interest evolution: attention of
    the target over the extractor states (masked softmax) drives an :class:`AUGRU`; its final state
    ``h'`` joins the tower input ``[user, e_t, Σ e_i, e_t·Σ e_i, h']`` → BN → 200 → 80 → 1.

    With the lookups' jagged values (``emb.hist_values``, as in training and evaluation) all of it
    runs on the N real behaviours in packed order (:func:`~iacn_torchrec.models.layers.pack_history`);
    the padded views give the same function (hand-built batches; serving passes the jagged values).

    ``forward`` returns (logits ``[B]``, ``aux_loss_weight · L_aux`` or None).
    """

    #: reads ``hist_values`` when given (the padded ``hist`` only without behaviours in eager
    #: mode): an export passes only the former, and its trace keeps the jagged path
    reads_jagged_history = True

    def __init__(self, user_dim: int, item_dim: int, max_len: int, config: DIENConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DIENConfig()
        self.user_dim, self.item_dim, self.max_len = user_dim, item_dim, max_len
        H = item_dim if config.hidden_size is None else config.hidden_size
        if H <= 0:
            raise ValueError(f"DIEN: hidden_size must be positive, got {config.hidden_size}")
        self.hidden_size = H
        self.gru = nn.GRU(item_dim, H, batch_first=True)
        self.aux_net = MLP(H + item_dim, config.aux_hidden, 1, activation=config.aux_activation)
        self.attention = AttentionUnit(item_dim, H, config.att_hidden, config.att_activation,
                                       softmax=True, query_proj=True)
        self.augru = AUGRU(H, H)
        self.tower = MLP(user_dim + 3 * item_dim + H, config.tower_hidden, 1,
                         activation=config.tower_activation, input_bn=config.tower_input_bn,
                         dropout=config.dropout)

    def forward(self, emb: EmbeddedBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The lookups' jagged values: both recurrences, the attention and the auxiliary loss run on
        # the N real behaviours. A padded-only batch (hand-built), one without any
        # behaviour, or torch.compile (the packed steps are data-dependent) takes the padded path.
        if emb.hist_values is not None and emb.hist_values.shape[0] and not torch.compiler.is_compiling():
            final, hist_sum, aux_loss = self._evolve_jagged(emb)
        else:
            final, hist_sum, aux_loss = self._evolve_padded(emb)
        x = torch.cat([emb.user, emb.target, hist_sum, emb.target * hist_sum, final], dim=1)
        return self.tower(x).squeeze(-1), aux_loss

    def _needs_aux_loss(self, emb: EmbeddedBatch) -> bool:
        if not self.training or self.config.aux_loss_weight == 0:
            return False
        if emb.neg_hist_values is None and emb.neg_hist is None:
            raise ValueError(
                f"{__file__}: DIEN's auxiliary loss needs EmbeddedBatch.neg_hist "
                "(build the embeddings with with_neg_hist=True and a loader with with_neg_hist=True), "
                "or set DIENConfig.aux_loss_weight=0"
            )
        return True

    def _evolve_padded(
        self, emb: EmbeddedBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(h' [B, H], Σ e_i [B, D], weighted L_aux or None)`` from the padded ``[B, L, D]`` views."""
        T = effective_length(emb.hist_lengths, emb.hist.shape[1])
        hist = emb.hist[:, :T]
        mask = sequence_mask(emb.hist_lengths, T)
        states, _ = self.gru(hist)
        states = states * mask.unsqueeze(-1)  # [B, T, H], zero past n

        aux_loss = None
        if self._needs_aux_loss(emb):
            aux_loss = self.config.aux_loss_weight * next_behaviour_aux_loss(
                self.aux_net, states, hist, emb.neg_hist[:, :T], mask
            )
        _, att = self.attention(emb.target, states, mask)  # att [B, T], zero at padding
        return self.augru(states, att), masked_sum(hist, mask), aux_loss

    def _evolve_jagged(
        self, emb: EmbeddedBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The same function on the jagged ``hist_values [N, D]``, in packed (time-major) order:
        the GRU (``self.gru``'s parameters through :func:`packed_gru`, not its forward: module
        hooks on it run on the padded path only; first-order gradients), the attention's segment
        softmax, the AUGRU on the live rows only; each row's final state is scattered back (zero
        for a row without behaviours)."""
        values, lengths = emb.hist_values, emb.hist_lengths
        B = lengths.shape[0]
        packed = pack_history(lengths, emb.hist_offsets)
        # [N, H] = nn.GRU on the PackedSequence; causal, so each state has seen only its row's behaviours
        states = packed_gru(self.gru, values.index_select(0, packed.index), packed.batch_sizes)

        aux_loss = None
        if self._needs_aux_loss(emb):
            neg = emb.neg_hist_values
            if neg is None:
                neg, _ = jagged_history(emb.neg_hist, lengths)
            following = packed.index[packed.has_next] + 1  # jagged position of behaviour t+1
            aux_loss = self.config.aux_loss_weight * _next_behaviour_loss(
                self.aux_net, states[packed.has_next], values.index_select(0, following),
                neg.index_select(0, following),
            )
        # the attention in row-major order (each row's states contiguous, as the fused attention
        # kernel reads them); its weights back in packed order for the AUGRU
        N = values.shape[0]
        to_row_major = torch.empty_like(packed.index).index_copy_(
            0, packed.index, torch.arange(N, device=packed.index.device))
        segments = segment_ids(lengths, N)
        _, att = self.attention.forward_jagged(emb.target, states.index_select(0, to_row_major), segments, B,
                                               offsets=emb.hist_offsets)
        att = att.index_select(0, packed.index)  # [N], packed order
        by_rank = self.augru.forward_packed(states, att, packed.batch_sizes, B)
        final = torch.empty_like(by_rank).index_copy_(0, packed.order, by_rank)
        hist_sum = segment_sum(values, segments, B, emb.hist_offsets)
        return final, hist_sum, aux_loss
