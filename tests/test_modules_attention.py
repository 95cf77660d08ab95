"""Label-aware attention vs a per-user reference; sign-preserving pow; hard attention."""

from __future__ import annotations

import math

import pytest
import torch

from iacn_torchrec.modules.attention import label_aware_attention, label_aware_attention_weights


def ref_attention(capsules, mask, target, p):
    B, K, h = capsules.shape
    out, weights = [], []
    for b in range(B):
        live = [j for j in range(K) if bool(mask[b, j])]
        scores = {j: float(torch.dot(capsules[b, j], target[b])) for j in live}
        if math.isinf(p):
            best = max(live, key=lambda j: scores[j])
            w = {j: float(j == best) for j in live}
        else:
            powed = {j: math.copysign(abs(s) ** p, s) for j, s in scores.items()}
            top = max(powed.values())
            z = sum(math.exp(v - top) for v in powed.values())
            w = {j: math.exp(powed[j] - top) / z for j in live}
        weights.append([w.get(j, 0.0) for j in range(K)])
        out.append(sum(w[j] * capsules[b, j] for j in live))
    return torch.stack(out), torch.tensor(weights, dtype=capsules.dtype)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    capsules = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return capsules, mask, target


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, math.inf])
def test_matches_reference(p: float) -> None:
    capsules, mask, target = _inputs()
    capsules[~mask] = 50.0  # dead capsules with a huge score must still get no weight
    v, w_out = label_aware_attention(capsules, mask, target, p)
    w = label_aware_attention_weights(capsules, mask, target, p)
    ref_v, ref_w = ref_attention(capsules, mask, target, p)
    assert torch.allclose(w, ref_w, atol=1e-12)
    assert torch.allclose(v, ref_v, atol=1e-12) and torch.equal(w_out, w)
    assert torch.all(w[~mask] == 0)
    assert torch.allclose(w.sum(1), torch.ones(4, dtype=w.dtype))


def test_negative_score_never_becomes_a_large_weight() -> None:
    # Scores -3 and 1: a plain square would give the -3 capsule weight softmax(9, 1) ≈ 0.9997.
    capsules = torch.tensor([[[-3.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = label_aware_attention_weights(capsules, mask, target, p=2.0)
    assert torch.allclose(w, torch.softmax(torch.tensor([[-9.0, 1.0]], dtype=torch.float64), 1))
    assert w[0, 0] < 1e-4


def test_hard_attention_picks_argmax_and_routes_gradient_to_it() -> None:
    capsules, mask, target = _inputs(1)
    capsules.requires_grad_(True)
    v, _ = label_aware_attention(capsules, mask, target, math.inf)
    scores = torch.einsum("bkh,bh->bk", capsules.detach(), target).masked_fill(~mask, -math.inf)
    best = scores.argmax(1)
    assert torch.equal(v, capsules.detach()[torch.arange(4), best])
    v.sum().backward()
    chosen = torch.zeros(4, 3, dtype=torch.bool)
    chosen[torch.arange(4), best] = True
    assert torch.all(capsules.grad[chosen] == 1) and torch.all(capsules.grad[~chosen] == 0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_gradcheck(p: float) -> None:
    capsules, mask, target = _inputs(2)
    capsules.requires_grad_(True)
    target.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, t: label_aware_attention(c, mask, t, p)[0], (capsules, target))


def test_zero_scores_give_finite_gradients_for_small_p() -> None:
    capsules = torch.zeros(2, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    label_aware_attention(capsules, mask, target, 0.5)[0].sum().backward()
    assert torch.isfinite(capsules.grad).all() and torch.isfinite(target.grad).all()


def test_large_p_overflow_gives_the_exact_one_hot_and_fp16_small_p_is_finite() -> None:
    """Where the leading live score's |s|^p overflows float32, the weights are what float64 computes
    exactly (one-hot at the leader), not a tie among capped scores; a non-leading score's overflow
    changes nothing. fp16's smallest normal number guards p < 1 at zero scores (1e-12 is 0 there)."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    target = torch.tensor([[1.0, 0.0]])
    cases = [([10.0, 9.0, -20.0], [1.0, 0.0, 0.0]),  # 10^40 against 9^40: far past exp's range
             ([-100.0, -99.0, -120.0], [0.0, 1.0, 0.0]),  # every power overflows, the least negative leads
             ([-100.0, 0.5, 0.4], [0.0, 0.5, 0.5])]  # only a trailing score overflows: still soft
    for scores, want in cases:
        capsules = torch.tensor([[[x, 0.0] for x in scores]], requires_grad=True)
        for p in (38.0, 40.0, 200.0):
            v, w = label_aware_attention(capsules, mask, target, p)
            exact = label_aware_attention_weights(capsules.detach().double(), mask, target.double(), p)
            assert torch.isfinite(exact).all(), (scores, p)  # float64's range holds these powers
            torch.testing.assert_close(w, exact.float(), atol=1e-6, rtol=0)
            torch.testing.assert_close(w, torch.tensor([want]), atol=1e-6, rtol=0)
            v.sum().backward()
            assert torch.isfinite(capsules.grad).all()
    half = torch.tensor([[[0.5, 0.2], [0.0, 0.0]]], dtype=torch.float16, requires_grad=True)
    v, _ = label_aware_attention(half, torch.tensor([[True, False]]), torch.tensor([[1.0, 1.0]],
                                 dtype=torch.float16), 0.5)
    v.float().sum().backward()
    assert torch.isfinite(half.grad).all()


def test_larger_p_flattens_scores_below_one() -> None:
    """Documented behaviour: for |s| < 1 a larger finite p moves the weights towards uniform."""
    capsules = torch.tensor([[[0.5, 0.0], [0.1, 0.0]]], dtype=torch.float64)
    mask, target = torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    first = [float(label_aware_attention_weights(capsules, mask, target, p)[0, 0]) for p in (1.0, 2.0, 8.0)]
    assert first[0] > first[1] > first[2] > 0.5


def test_bad_inputs() -> None:
    capsules, mask, target = _inputs()
    with pytest.raises(ValueError, match="p must be"):
        label_aware_attention(capsules, mask, target, 0.0)
    with pytest.raises(ValueError, match="capsule_mask"):
        label_aware_attention(capsules, mask[:, :2], target, 2.0)
    with pytest.raises(ValueError, match="target"):
        label_aware_attention(capsules, mask, target[:, :3], 2.0)


@pytest.mark.parametrize("p", [40.0, 200.0])
def test_a_dead_capsule_does_not_make_a_row_hard(p):
    """Whether a row's power overflows (hard, one-hot weights) is decided over its live capsules: a
    dead capsule with a huge score must leave the live ones' soft weights as they are without it."""
    capsules = torch.tensor([[[0.5, 0.0], [0.4, 0.0], [100.0, 0.0]]])
    target = torch.tensor([[1.0, 0.0]])
    w = label_aware_attention_weights(capsules, torch.tensor([[True, True, False]]), target, p)
    alone = label_aware_attention_weights(capsules[:, :2], torch.tensor([[True, True]]), target, p)
    torch.testing.assert_close(w[:, :2], alone, atol=1e-6, rtol=0)
    assert 0.0 < float(w[0, 1]) < 1.0 and float(w[0, 2]) == 0.0
