"""DIEN's next-behaviour auxiliary loss through the C++ kernel (csrc/next_behaviour_loss.cpp) is the
ATen path's ``_next_behaviour_loss``: the same loss and gradients for h, the positives, the negatives
and every MLP parameter (1e-12 in float64, 1e-5 in float32); gradcheck; saturated logits stay
finite; MLPs the kernel does not cover, and ``IACN_FUSED_KERNEL=0``, keep the ATen path."""

from __future__ import annotations

import pytest
import torch
from helpers import count_calls, din_iacn_after_sgd_steps

import iacn_torchrec.models.dien as dien
from iacn_torchrec.models.layers import MLP

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_calls(monkeypatch, dien._NextBehaviourLossKernel)


def _inputs(dtype, V=23, H=5, D=7, hidden=(9, 6), seed=0, scale=1.0):
    torch.manual_seed(seed)
    net = MLP(H + D, hidden, 1, activation="sigmoid").to(dtype)
    h, pos, neg = (scale * torch.randn(V, k, dtype=dtype) for k in (H, D, D))
    return net, h.requires_grad_(), pos.requires_grad_(), neg.requires_grad_()


def _loss_and_grads(net, h, pos, neg):
    inputs = [h, pos, neg, *net.parameters()]
    loss = dien._next_behaviour_loss(net, h, pos, neg)
    return loss.detach(), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", [(9, 6), (4,), (8, 5, 3)], ids=["two", "one", "three"])
def test_kernel_equals_the_aten_loss(dtype, hidden, kernel_calls, monkeypatch):
    net, h, pos, neg = _inputs(dtype, hidden=hidden)
    loss, grads = _loss_and_grads(net, h, pos, neg)
    assert kernel_calls == [1]
    monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    ref, ref_grads = _loss_and_grads(net, h, pos, neg)
    assert kernel_calls == [1]
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, **TOL[dtype])


def test_kernel_at_dien_sizes_in_float32_against_float64(kernel_calls):
    """DIEN's sizes (V = 700 pairs, [h 36, e 72] → 100 → 50 → 1) with the kernel's float exp: the
    float32 loss and gradients within float32 rounding of the float64 ATen path."""
    net, h, pos, neg = _inputs(torch.float64, V=700, H=36, D=72, hidden=(100, 50), seed=2, scale=2.0)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # pre-activations of several units, so the sigmoids are not all near 0.5
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IACN_FUSED_KERNEL", "0")
        ref, ref_grads = _loss_and_grads(net, h, pos, neg)
    net32 = MLP(36 + 72, (100, 50), 1, activation="sigmoid")
    net32.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    x32 = [x.detach().float().requires_grad_() for x in (h, pos, neg)]
    loss, grads = _loss_and_grads(net32, *x32)
    assert kernel_calls == [1]
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_kernel_gradcheck(kernel_calls):
    net, h, pos, neg = _inputs(torch.float64, V=6, H=3, D=4, hidden=(5, 4), seed=1)
    params = list(net.parameters())

    assert torch.autograd.gradcheck(lambda h, pos, neg: dien._next_behaviour_loss(net, h, pos, neg),
                                    (h, pos, neg))
    # the parameters' gradients against finite differences of the kernel's own loss
    eps = 1e-6
    grads = torch.autograd.grad(dien._next_behaviour_loss(net, h, pos, neg), params)
    for p, g in zip(params, grads, strict=True):
        flat, num = p.data.view(-1), torch.empty(p.numel(), dtype=p.dtype)
        for i in range(p.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            up = float(dien._next_behaviour_loss(net, h, pos, neg))
            flat[i] = old - eps
            down = float(dien._next_behaviour_loss(net, h, pos, neg))
            flat[i] = old
            num[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(g.reshape(-1), num, rtol=1e-6, atol=1e-8)
    assert kernel_calls


def test_saturated_logits_stay_finite(kernel_calls, monkeypatch):
    """Inputs that drive the logits past ±100: softplus and its gradient stay finite and equal the
    ATen path's (float32, the kernel's own exp clamps at float's range)."""
    net, h, pos, neg = _inputs(torch.float32, scale=1.0)
    with torch.no_grad():
        net.net[-1].weight.mul_(400.0)
        net.net[-1].bias.fill_(-50.0)
    loss, grads = _loss_and_grads(net, h, pos, neg)
    assert torch.isfinite(loss) and float(loss) > 10.0  # the positives' logits are pushed far below 0
    monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    ref, ref_grads = _loss_and_grads(net, h, pos, neg)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for a, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    assert kernel_calls == [1]


@pytest.mark.parametrize("variant", ["relu", "dropout", "input_bn"])
def test_mlps_the_kernel_does_not_cover_take_the_aten_path(variant, kernel_calls):
    kw = {"relu": dict(activation="relu"), "dropout": dict(activation="sigmoid", dropout=0.1),
          "input_bn": dict(activation="sigmoid", input_bn=True)}[variant]
    torch.manual_seed(0)
    net = MLP(5 + 7, (9, 6), 1, **kw)
    h, pos, neg = torch.randn(23, 5), torch.randn(23, 7), torch.randn(23, 7)
    assert dien._fused_next_behaviour_loss(net, h, pos, neg) is None
    dien._next_behaviour_loss(net, h, pos, neg)
    assert kernel_calls == []


def test_kernel_off_and_mixed_dtypes_take_the_aten_path(monkeypatch, kernel_calls):
    net, h, pos, neg = _inputs(torch.float32)
    assert dien._fused_next_behaviour_loss(net, h.double(), pos, neg) is None
    monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    dien._next_behaviour_loss(net, h, pos, neg).backward()
    assert kernel_calls == []


def test_double_backward_is_refused(kernel_calls):
    net, h, pos, neg = _inputs(torch.float64)
    loss = dien._next_behaviour_loss(net, h, pos, neg)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_dien_trains_the_same_with_the_kernel(monkeypatch, kernel_calls):
    """Three SGD steps of DIEN+IaCN: the same parameters with the kernel and with the ATen ops."""
    with_kernel = din_iacn_after_sgd_steps(model_name="dien")
    assert kernel_calls  # the auxiliary loss ran through the kernel
    n = len(kernel_calls)
    monkeypatch.setattr(dien, "_fused_next_behaviour_loss", lambda *a: None)
    for a, r in zip(with_kernel, din_iacn_after_sgd_steps(model_name="dien"), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)
    assert len(kernel_calls) == n
