"""Dice through the C++ kernel (csrc/dice.cpp) is the ATen path's Dice: output, gradients for the
input and α, BatchNorm's running statistics and batch count, in training (batch statistics) and in
eval (running ones), in float64 to rounding and float32; gradcheck; the cases the kernel does not
cover keep the ATen path."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import din_iacn_after_sgd_steps

import iacn_torchrec.models.layers as layers
from iacn_torchrec.models.layers import MLP, Dice

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.fixture
def kernel_calls(monkeypatch):
    """One entry per Dice forward: True where the kernel ran, False where the ATen path did."""
    calls: list[bool] = []
    fused = layers._fused_dice
    monkeypatch.setattr(layers, "_fused_dice", lambda *a: calls.append((r := fused(*a)) is not None) or r)
    return calls


def _dice(dtype, H=7, seed=0, momentum=0.1):
    torch.manual_seed(seed)
    d = Dice(H).to(dtype)
    d.bn.momentum = momentum
    with torch.no_grad():
        d.alpha.copy_(torch.randn(H, dtype=dtype))  # α initialises to 0; exercise both of its terms
    return d


def _step(dice, x, g):
    x = x.clone().requires_grad_()
    dice.alpha.grad = None
    y = dice(x)
    y.backward(g)
    return [y.detach(), x.grad, dice.alpha.grad.clone()]


def _state(dice):
    return [dice.bn.running_mean.clone(), dice.bn.running_var.clone(), dice.bn.num_batches_tracked.clone()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("shape", [(13, 7), (4, 5, 7)], ids=["2d", "3d"])
def test_kernel_equals_aten_over_training_and_eval_steps(dtype, momentum, shape, kernel_calls, monkeypatch):
    """Three training steps (batch statistics; running statistics updated each step), then two eval
    steps (running statistics), with ∂x and ∂α each time."""
    fused, aten = _dice(dtype, momentum=momentum), None
    aten = copy.deepcopy(fused)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        train = step < 3
        fused.train(train)
        aten.train(train)
        x = 3 * torch.randn(*shape, generator=g, dtype=dtype) + 1
        grad = torch.randn(*shape, generator=g, dtype=dtype)
        got = _step(fused, x, grad)
        with monkeypatch.context() as mp:
            mp.setenv("IACN_FUSED_KERNEL", "0")
            want = _step(aten, x, grad)
        for a, b in zip(got + _state(fused), want + _state(aten), strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype])
    assert kernel_calls == [True, False] * 5
    assert int(fused.bn.num_batches_tracked) == 3
    assert not torch.equal(fused.bn.running_mean, torch.zeros(7, dtype=dtype))


@pytest.mark.parametrize("train", [True, False], ids=["batch-statistics", "running-statistics"])
def test_kernel_gradcheck(train, kernel_calls):
    d = _dice(torch.float64, H=4, seed=2)
    with torch.no_grad():
        d.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64))
        d.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64))
    d.train(train)
    x = (2 * torch.randn(6, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a: layers._fused_dice(_with_alpha(d, a), x), (x, d.alpha))
    assert all(kernel_calls)


def _with_alpha(d, alpha):
    """``d`` with ``alpha`` as its α (a tensor gradcheck perturbs), sharing its BatchNorm."""
    out = copy.copy(d)
    out._parameters = dict(d._parameters, alpha=alpha)
    return out


def test_kernel_at_tower_sizes_in_float32_against_float64(kernel_calls):
    """DIN's tower layer ([128, 200], pre-activations over several units of scale) with the kernel's
    float sigmoid: within float32 rounding of the float64 ATen path."""
    d64 = _dice(torch.float64, H=200, seed=3)
    d32 = copy.deepcopy(d64).float()
    x = 4 * torch.randn(128, 200, dtype=torch.float64)
    grad = torch.randn(128, 200, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IACN_FUSED_KERNEL", "0")
        want = _step(d64, x, grad)
    got = _step(d32, x.float(), grad.float())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_evaluation_without_grad_equals_the_autograd_path(kernel_calls):
    """Without a gradient to record the kernel saves nothing (another code path): the same values."""
    d = _dice(torch.float32, H=33, seed=4)
    d(torch.randn(50, 33))  # one training step: running statistics off their start
    d.eval()
    x = torch.randn(2048, 33) * 2
    with torch.no_grad():
        fast = d(x)
    slow = d(x.requires_grad_())
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
    assert all(kernel_calls)


def test_one_row_in_training_raises_batchnorms_error(kernel_calls):
    d = _dice(torch.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        d(torch.randn(1, 7))
    assert kernel_calls == [False]
    d.eval()
    assert d(torch.randn(1, 7)).shape == (1, 7)  # eval: running statistics, any batch size
    assert kernel_calls == [False, True]


def test_uncovered_cases_take_the_aten_path(kernel_calls, monkeypatch):
    """autocast, a BatchNorm without running statistics, TorchScript tracing (a traced graph cannot
    hold the kernel's call: its output would be baked in as a constant) and ``IACN_FUSED_KERNEL=0``."""
    d = _dice(torch.float32)
    x, other = torch.randn(9, 7), torch.randn(9, 7)
    d(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d(x)
    no_stats = Dice(7)
    no_stats.bn = torch.nn.BatchNorm1d(7, eps=1e-8, affine=False, track_running_stats=False)
    no_stats(x)
    d.eval()
    traced = torch.jit.trace(d, x, check_trace=False)
    assert kernel_calls == [True, False, False, False]
    torch.testing.assert_close(traced(other), d(other))  # a new input: computed, not a constant
    monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    d(x)
    assert kernel_calls == [True, False, False, False, True, False]


def test_double_backward_is_refused():
    d = _dice(torch.float64)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(d(x).sum(), x, create_graph=True)


def test_tower_uses_the_kernel_and_din_trains_the_same(kernel_calls, monkeypatch):
    """DIN's tower (BN → 200 → Dice → 80 → Dice → 1) runs both Dice layers through the kernel, and
    three SGD steps of DIN+IaCN give the same parameters (BatchNorm buffers aside: not parameters)
    with the kernel and with the ATen Dice."""
    tower = MLP(20, (200, 80), 1, activation="dice", input_bn=True)
    tower(torch.randn(16, 20))
    assert kernel_calls == [True, True]
    with_kernel = din_iacn_after_sgd_steps()
    monkeypatch.setattr(layers, "_fused_dice", lambda *a: None)
    without = din_iacn_after_sgd_steps()
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
