"""IaCN's loss in one fused CPU kernel (``csrc/iacn_fused.cpp``), forward and backward.

The same function as :meth:`IaCNTask.forward`'s ATen path (routing → user-profile layer →
label-aware attention → sampled softmax) for the common case: a jagged history, finite p, sampled
(not in-batch) negatives, CPU float tensors and a user embedding that takes no gradient. At IaCN's
sizes (h = 36, n_u ≤ 20, K ≤ 5) the ATen path's cost is the ~300 small ops it dispatches per
training step; the kernel runs the per-row maths as loops and hands only the matrix products to
ATen (see docs/results/performance-log.md, round 11).

The kernel is built by :mod:`iacn_torchrec.kernels` (when it cannot be, a warning says why once and
IaCN runs on the ATen path; ``IACN_FUSED_KERNEL=0`` turns it off).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from iacn_torchrec.kernels import capturing_graph, load_kernel

__all__ = ["fused_kernel", "fused_iacn_loss"]


def fused_kernel() -> ModuleType | None:
    """The compiled IaCN kernel (:func:`iacn_torchrec.kernels.load_kernel`), or None."""
    return load_kernel("iacn_fused")


class _FusedIaCNLoss(torch.autograd.Function):
    """``L_IaCN`` from the kernel; its backward gives the gradients of the aux history values,
    the targets, the negatives, ``S`` and the user-profile layer."""

    @staticmethod
    def forward(ctx, values, target, negatives, bilinear, w1, b1, w2, b2,  # type: ignore[override]
                ext, offsets, rows, init_logits, user, by_position, neg_log_q, target_log_q,
                target_ids, negative_ids, p, k_max, max_len, iters):
        out = ext.forward(values, offsets, rows, init_logits, bilinear, w1, b1, w2, b2, user, target,
                          negatives, by_position, neg_log_q, target_log_q, target_ids, negative_ids,
                          p, k_max, max_len, iters)
        ctx.ext, ctx.by_position, ctx.p = ext, by_position, p
        ctx.save_for_backward(*out, values, bilinear, w1, w2, user, target, negatives)
        return out[0]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if torch.is_grad_enabled():  # backward(create_graph=True): the kernel's backward has no graph
            raise RuntimeError(
                "IaCN's fused kernel has no double backward; set `task.fused = False` (or "
                "IACN_FUSED_KERNEL=0) to differentiate L_IaCN's gradients")
        *saved, values, bilinear, w1, w2, user, target, negatives = ctx.saved_tensors
        d = ctx.ext.backward(grad, saved, values, bilinear, w1, w2, user, target, negatives,
                             ctx.by_position, ctx.p)
        return (*d, *([None] * 14))


def _float_cpu(*tensors: torch.Tensor | None) -> bool:
    dtypes = {t.dtype for t in tensors if t is not None}
    return (len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}
            and all(t.device.type == "cpu" for t in tensors if t is not None))


def fused_iacn_loss(
    task: torch.nn.Module,
    aux_hist: JaggedTensor,
    rows: torch.Tensor,
    aux_target: torch.Tensor,
    aux_negatives: torch.Tensor | None,
    negative_rows: torch.Tensor | None,
    user: torch.Tensor | None,
    neg_log_q: torch.Tensor | None,
    target_log_q: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    negative_ids: torch.Tensor | None,
    init_logits: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor | None:
    """``L_IaCN`` of ``task`` (an :class:`~iacn_torchrec.modules.iacn.IaCNTask`) through the kernel,
    or None when the case is not one it covers (the caller then runs the ATen path, which also
    raises the errors for malformed inputs).

    Args: as :meth:`IaCNTask.forward` (``aux_hist`` jagged: values ``[N, h]``), with ``rows [P]`` the
    label-1 rows (P ≥ 1).
    """
    values, offsets = aux_hist.values(), aux_hist.offsets()
    cfg, routing = task.config, task.routing
    B, h = aux_target.shape[0], routing.item_dim
    if (cfg.sampler == "in_batch" or not 0 < cfg.pow_p < math.inf or aux_negatives is None
            or capturing_graph(values, aux_target) or torch.is_autocast_enabled("cpu")):
        return None
    profile = routing.user_profile
    params = [routing.bilinear] + ([profile[0].weight, profile[0].bias, profile[2].weight, profile[2].bias]
                                   if profile is not None else [])
    if not _float_cpu(values, aux_target, aux_negatives, neg_log_q, target_log_q, *params):
        return None
    data = (neg_log_q, target_log_q, init_logits)
    indices = (offsets, rows, target_ids, negative_ids)
    if (any(t is not None and (t.requires_grad or t.device.type != "cpu") for t in data)  # logQ as data
            or any(t is not None and (t.device.type != "cpu" or t.dtype.is_floating_point
                                      or t.dtype == torch.bool) for t in indices)
            or rows.dim() != 1 or routing.k_max > 62):
        return None
    if profile is not None and (user is None or user.requires_grad or user.shape != (B, routing.user_dim)
                                or not _float_cpu(user, values)):
        return None
    R = B if negative_rows is None else rows.numel()
    S = aux_negatives.shape[1] if aux_negatives.dim() == 3 else -1
    if (values.dim() != 2 or values.shape[1] != h or aux_target.shape != (B, h)
            or aux_negatives.shape != (R, S, h) or offsets.shape != (B + 1,)
            or any(t is not None and t.shape != (R, S) for t in (neg_log_q, negative_ids))
            or any(t is not None and t.shape != (B,) for t in (target_log_q, target_ids))
            or (negative_ids is not None and target_ids is None)):
        return None
    offsets = offsets.long()
    if B and int(aux_hist.lengths().max()) > routing.max_len:
        return None  # the ATen path names the over-long history
    if init_logits is not None and (not init_logits.dtype.is_floating_point or init_logits.shape not in (
            (B, routing.k_max, routing.max_len), (routing.k_max, routing.max_len))):
        return None
    ext = fused_kernel()
    if ext is None:
        return None
    if init_logits is None:  # the draw the ATen path makes: [B, K_max, L_max] for a jagged history
        init_logits = (routing.training_logits(aux_hist, generator) if routing.training
                       else routing.eval_logits)
    ints = [None if t is None else t.long().contiguous() for t in (target_ids, negative_ids)]
    return _FusedIaCNLoss.apply(
        values.contiguous(), aux_target.contiguous(), aux_negatives.contiguous(), *params[:1],
        *(params[1:] if profile is not None else [None] * 4),
        ext, offsets.contiguous(), rows.long().contiguous(),
        init_logits.detach().to(values.dtype).contiguous(),
        None if user is None or profile is None else user.detach().contiguous(),
        negative_rows is not None,
        None if neg_log_q is None else neg_log_q.detach().contiguous(),
        None if target_log_q is None else target_log_q.detach().contiguous(),
        *ints, float(cfg.pow_p), routing.k_max, routing.max_len, routing.routing_iters)
