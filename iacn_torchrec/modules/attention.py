"""MIND label-aware attention: the target item picks among the user's interest capsules.

``v_u = Σ_j softmax_j(pow(V_j · e_t, p)) V_j`` over the live capsules ``j < K_u``, with the
sign-preserving power ``pow(s, p) = sign(s) · |s|^p`` (a plain even power would turn a strongly
negative score into a large weight). p = 1 is ordinary dot-product attention. A larger p sharpens
the weights only where the scores' magnitudes exceed 1: for |s| < 1, the usual case early in
training (squash keeps short capsules short), |s|^p shrinks towards 0 and the weights flatten
towards uniform. ``p = inf`` is hard attention (the best-matching live capsule); it is the limit
of finite p only for scores above 1 in magnitude. This project's default is p = 2
(``IaCNConfig.pow_p``, MIND's choice), which keeps a gradient for every live capsule; the paper
leaves p open. Scores whose power would overflow the dtype are capped first (an infinite score
would make the softmax NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# |s| is clamped to this (or the dtype's smallest normal number, if larger: fp16's 1e-12 is 0)
# before |s|^p when p < 1, whose derivative is infinite at 0.
_POW_EPS = 1e-12


def signed_pow(s: torch.Tensor, p: float) -> torch.Tensor:
    """``sign(s) · |s|^p`` elementwise (|s| capped where the power would overflow); p a positive
    Python float."""
    if p == 1.0:
        return s
    mag = s.abs()
    info = torch.finfo(s.dtype)
    if p < 1.0:
        mag = mag.clamp_min(max(_POW_EPS, info.tiny))
    elif p > 1.0:
        # |s|^p overflows for large p (p = 40: |s| > 9.2 in float32), and an inf score makes the
        # softmax NaN: cap |s| where |s|^p and its derivative p·|s|^(p-1) are still finite
        mag = mag.clamp_max((info.max / (2.0 * p)) ** (1.0 / p))
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
        argmax of ``V_j · e_t`` when p = inf).
    """
    _check(capsules, capsule_mask, target, p)
    scores = (capsules * target.unsqueeze(1)).sum(-1)  # V_j · e_t (elementwise: cheaper than a K=1 bmm)
    if p == math.inf:  # a comparison, not math.isinf: torch.compile traces it without a graph break
        best = scores.masked_fill(~capsule_mask, float("-inf")).argmax(dim=1)
        return F.one_hot(best, capsules.size(1)).to(capsules.dtype)
    return torch.softmax(signed_pow(scores, float(p)).masked_fill(~capsule_mask, float("-inf")), dim=1)


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
