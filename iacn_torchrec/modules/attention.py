"""MIND label-aware attention: the target item picks among the user's interest capsules.

``v_u = Σ_j softmax_j(pow(V_j · e_t, p)) V_j`` over the live capsules ``j < K_u``, with the
sign-preserving power ``pow(s, p) = sign(s) · |s|^p`` (a plain even power would turn a strongly
negative score into a large weight). p = 1 is ordinary dot-product attention. A larger p sharpens
the weights only where the scores' magnitudes exceed 1: for |s| < 1, the usual case early in
training (squash keeps short capsules short), |s|^p shrinks towards 0 and the weights flatten
towards uniform. ``p = inf`` is hard attention (the best-matching live capsule); it is the limit
of finite p only for scores above 1 in magnitude. This project's default is p = 2
(``IaCNConfig.pow_p``, MIND's choice), which keeps a gradient for every live capsule; the paper
leaves p open. Where the largest live score's power would overflow the dtype (p = 40: |s| > 8.2 in
float32), the row's exact weights are one-hot at that capsule to the dtype's precision, and the row
takes the hard-attention branch; the other scores' powers are capped (an infinite score would make
the softmax NaN, and a capped score that does not lead keeps a weight of 0 either way).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# |s| is clamped to this (or the dtype's smallest normal number, if larger: fp16's 1e-12 is 0)
# before |s|^p when p < 1, whose derivative is infinite at 0.
_POW_EPS = 1e-12


def pow_cap(dtype: torch.dtype, p: float) -> float:
    """The largest |s| whose ``|s|^p`` and derivative ``p·|s|^(p-1)`` are finite in ``dtype`` (p > 1)."""
    return (torch.finfo(dtype).max / (2.0 * p)) ** (1.0 / p)


def signed_pow(s: torch.Tensor, p: float) -> torch.Tensor:
    """``sign(s) · |s|^p`` elementwise (|s| capped at :func:`pow_cap` where the power would
    overflow); p a positive Python float."""
    if p == 1.0:
        return s
    mag = s.abs()
    if p < 1.0:
        mag = mag.clamp_min(max(_POW_EPS, torch.finfo(s.dtype).tiny))
    elif p > 1.0:
        # an inf score would make the softmax NaN
        mag = mag.clamp_max(pow_cap(s.dtype, p))
    return torch.sign(s) * mag.pow(p)


def _check(capsules: torch.Tensor, capsule_mask: torch.Tensor, target: torch.Tensor, p: float) -> None:
    if capsules.dim() != 3:
        raise ValueError(f"label_aware_attention: capsules must be [B, K, h], got {list(capsules.shape)}")
    if capsule_mask.shape != capsules.shape[:2]:
        raise ValueError(
            f"label_aware_attention: capsule_mask must be [B, K]={list(capsules.shape[:2])}, "
            f"got {list(capsule_mask.shape)}"
        )
    if target.shape != (capsules.size(0), capsules.size(2)):
        raise ValueError(
            f"label_aware_attention: target must be [B, h]={[capsules.size(0), capsules.size(2)]}, "
            f"got {list(target.shape)}"
        )
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not p > 0:  # `not >`: NaN fails too
        raise ValueError(f"label_aware_attention: p must be a positive float or inf, got {p!r}")


def label_aware_attention_weights(
    capsules: torch.Tensor, capsule_mask: torch.Tensor, target: torch.Tensor, p: float = 2.0
) -> torch.Tensor:
    """Attention of the target over the capsules.

    Args:
        capsules: ``[B, K, h]`` interest capsules V.
        capsule_mask: ``[B, K]`` bool, True for live capsules (each row needs at least one).
        target: ``[B, h]`` the target item's aux embedding e_t.
        p: the power (> 0, ``math.inf`` for hard attention).

    Returns:
        ``[B, K]`` weights: zero on dead capsules, summing to 1 over the live ones (one-hot at the
        argmax of ``V_j · e_t`` when p = inf, and in rows whose largest live |score|^p overflows).
    """
    _check(capsules, capsule_mask, target, p)
    scores = (capsules * target.unsqueeze(1)).sum(-1)  # V_j · e_t (elementwise: cheaper than a K=1 bmm)
    live = scores.masked_fill(~capsule_mask, float("-inf"))
    hard = F.one_hot(live.argmax(dim=1), capsules.size(1)).to(capsules.dtype)
    if p == math.inf:  # a comparison, not math.isinf: torch.compile traces it without a graph break
        return hard
    soft = torch.softmax(signed_pow(scores, float(p)).masked_fill(~capsule_mask, float("-inf")), dim=1)
    if p <= 1.0:
        return soft
    # signed_pow is increasing, so the leader's power exceeding the dtype's range means a gap to every
    # other live capsule far beyond exp's range (bar an exact tie): the exact weights are one-hot. The
    # capped powers would instead tie, spreading the weight evenly over every capped capsule.
    lead = live.amax(dim=1, keepdim=True).abs()
    return torch.where(lead > pow_cap(scores.dtype, float(p)), hard, soft)


def label_aware_attention(
    capsules: torch.Tensor, capsule_mask: torch.Tensor, target: torch.Tensor, p: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``v_u = Σ_j softmax_j(sign(V_j·e_t)|V_j·e_t|^p) V_j`` over the live capsules.

    Args: as :func:`label_aware_attention_weights`.

    Returns:
        ``(v_u [B, h], weights [B, K])``: the user vector and the attention weights. With p = inf
        the gradient flows to the chosen capsule only (and not through the choice).
    """
    weights = label_aware_attention_weights(capsules, capsule_mask, target, p)
    return (weights.unsqueeze(-1) * capsules).sum(1), weights
