"""DIEN's GRU / AUGRU recurrence through the C++ kernel (csrc/packed_recurrence.cpp) is the Python
``_PackedRecurrence``: the same ATen ops in the same order, so the same states and gradients (float64
and float32, bit for bit); only the inputs that need a gradient get one; the uncovered cases keep
the Python path."""

from __future__ import annotations

import pytest
import torch
from helpers import count_calls, din_iacn_after_sgd_steps

import iacn_torchrec.models.dien as dien
from iacn_torchrec.models.dien import _PackedRecurrence, packed_recurrence

SIZES = torch.tensor([6, 6, 5, 3, 3, 1, 1])
H = 4


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_calls(monkeypatch, dien._RecurrenceKernel)


def _inputs(dtype, with_att, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = int(SIZES.sum())
    gi = torch.randn(N, 3 * H, generator=g, dtype=dtype).requires_grad_()
    att = torch.rand(N, generator=g, dtype=dtype).requires_grad_() if with_att else None
    w = torch.randn(3 * H, H, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(3 * H, generator=g, dtype=dtype).requires_grad_()
    out_w = torch.randn(N, H, generator=g, dtype=dtype)
    return gi, att, w, b, out_w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_att", [True, False], ids=["augru", "gru"])
def test_kernel_equals_the_python_recurrence(dtype, with_att, kernel_calls):
    gi, att, w, b, out_w = _inputs(dtype, with_att)
    inputs = [x for x in (gi, att, w, b) if x is not None]
    ours = packed_recurrence(gi, att, w, b, SIZES)
    assert kernel_calls == [1]
    ref = _PackedRecurrence.apply(gi, att, w, b, SIZES.tolist())
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    g_ours = torch.autograd.grad((ours * out_w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * out_w).sum(), inputs)
    for a, r in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    with torch.no_grad():  # inference: the kernel's loop without autograd, the same states
        torch.testing.assert_close(packed_recurrence(gi, att, w, b, SIZES), ref, rtol=0, atol=0)


def test_kernel_gradcheck(kernel_calls):
    gi, att, w, b, _ = _inputs(torch.float64, True, seed=1)
    assert torch.autograd.gradcheck(lambda *t: packed_recurrence(*t, SIZES), (gi, att, w, b))
    assert kernel_calls


@pytest.mark.parametrize("frozen", ["att", "w_hh", "b_hh", "gi"])
def test_only_inputs_that_need_a_gradient_get_one(frozen, kernel_calls):
    """The node's edges skip inputs without a gradient (their positions shift when ``att`` is
    absent or frozen); the others' gradients are unchanged."""
    gi, att, w, b, out_w = _inputs(torch.float64, True)
    named = {"gi": gi, "att": att, "w_hh": w, "b_hh": b}
    ref = torch.autograd.grad((packed_recurrence(gi, att, w, b, SIZES) * out_w).sum(), list(named.values()))
    named[frozen] = named[frozen].detach()
    live = [k for k in named if k != frozen]
    out = packed_recurrence(*named.values(), SIZES)
    got = torch.autograd.grad((out * out_w).sum(), [named[k] for k in live])
    for k, g in zip(live, got, strict=True):
        torch.testing.assert_close(g, ref[list(named).index(k)], rtol=0, atol=0, msg=k)


def test_double_backward_is_refused():
    gi, att, w, b, _ = _inputs(torch.float64, True)
    out = packed_recurrence(gi, att, w, b, SIZES)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), gi, create_graph=True)


def test_kernel_off_runs_the_python_recurrence(monkeypatch, kernel_calls):
    python_calls = count_calls(monkeypatch, _PackedRecurrence)
    monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    gi, att, w, b, _ = _inputs(torch.float32, True)
    packed_recurrence(gi, att, w, b, SIZES).sum().backward()
    assert kernel_calls == [] and python_calls == [1]


def test_dien_trains_the_same_with_the_kernel(monkeypatch, kernel_calls):
    """Three SGD steps of DIEN+IaCN: the same parameters with the kernel and with the Python node."""
    with_kernel = din_iacn_after_sgd_steps(model_name="dien")
    assert kernel_calls  # the kernel ran, for the GRU and the AUGRU
    monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    n = len(kernel_calls)
    for a, r in zip(with_kernel, din_iacn_after_sgd_steps(model_name="dien"), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)
    assert len(kernel_calls) == n
