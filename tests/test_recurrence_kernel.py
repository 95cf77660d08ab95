"""DIEN's GRU / AUGRU recurrence through the C++ kernel (csrc/packed_recurrence.cpp) is the Python
``_PackedRecurrence``: the same states and gradients to rounding (the kernel fuses each step's
elementwise ops into loops, so its sums run in another order): 1e-12 in float64, 1e-6 in float32;
only the inputs that need a gradient get one; the uncovered cases keep the Python path."""

from __future__ import annotations

import pytest
import torch
from helpers import count_calls, din_iacn_after_sgd_steps

import iacn_torchrec.models.dien as dien
from iacn_torchrec.models.dien import _PackedRecurrence, packed_recurrence

SIZES = torch.tensor([6, 6, 5, 3, 3, 1, 1])
H = 4
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


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
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    g_ours = torch.autograd.grad((ours * out_w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * out_w).sum(), inputs)
    for a, r in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, r, **TOL[dtype])
    with torch.no_grad():  # inference: the kernel's loop without autograd, the same states bit for bit
        torch.testing.assert_close(packed_recurrence(gi, att, w, b, SIZES), ours.detach(), rtol=0, atol=0)


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


@pytest.mark.parametrize("bad", ["att", "b_hh", "w_hh"])
def test_inputs_of_the_wrong_length_are_refused(bad, kernel_calls):
    """The kernel reads att per packed row and b_hh / w_hh per gate: a wrong length used to be read
    out of bounds without an error (the Python recurrence raises on it too)."""
    gi, att, w, b, _ = _inputs(torch.float64, with_att=True)
    N = gi.shape[0]
    args = {"att": att.detach(), "w_hh": w.detach(), "b_hh": b.detach()}
    wrong = {"att": torch.rand(N - 2), "b_hh": torch.randn(2 * H), "w_hh": torch.randn(2 * H, H)}
    args[bad] = wrong[bad].double()
    for grad in (False, True):
        x = gi.detach().requires_grad_(grad)
        with pytest.raises(RuntimeError, match="packed_recurrence"):
            packed_recurrence(x, args["att"], args["w_hh"], args["b_hh"], SIZES)


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


@pytest.mark.parametrize("with_att", [True, False], ids=["augru", "gru"])
def test_float32_kernel_at_dien_sizes_against_a_float64_reference(with_att, kernel_calls):
    """DIEN's sizes (H = 36, a jagged batch of 128 histories): the float32 kernel, with its own
    vectorised exp, stays within float32 rounding of the float64 Python recurrence."""
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 21, (128,), generator=g).sort(descending=True).values
    sizes = torch.tensor([int((lens > t).sum()) for t in range(int(lens[0]))])
    N, h = int(sizes.sum()), 36
    gi = torch.randn(N, 3 * h, generator=g, dtype=torch.float64) * 3
    att = torch.rand(N, generator=g, dtype=torch.float64) if with_att else None
    w = torch.randn(3 * h, h, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(3 * h, generator=g, dtype=torch.float64)
    out_w = torch.randn(N, h, generator=g, dtype=torch.float64)
    inputs64 = [x.requires_grad_() for x in (gi, att, w, b) if x is not None]
    ref = _PackedRecurrence.apply(gi, att, w, b, sizes.tolist())
    g_ref = torch.autograd.grad((ref * out_w).sum(), inputs64)
    inputs32 = [x.detach().float().requires_grad_() for x in inputs64]
    a32 = inputs32[1] if with_att else None
    ours = packed_recurrence(inputs32[0], a32, inputs32[-2], inputs32[-1], sizes)
    assert kernel_calls == [1]
    g_ours = torch.autograd.grad((ours * out_w.float()).sum(), inputs32)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=2e-6)
    for a, r in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_saturated_gates_stay_finite(kernel_calls):
    """Pre-activations far past float32's exp range saturate the gates to 0 / 1 / ±1 as
    ``torch.sigmoid`` / ``torch.tanh`` do: no inf or NaN in the states or the gradients."""
    sizes = torch.tensor([3, 2])
    gi = torch.tensor([[500.0, -500.0, 300.0], [-500.0, 500.0, -300.0], [90.0, -90.0, 1e-3],
                       [0.0, -1e4, -1e4], [1e4, 0.0, 1e4]]).requires_grad_()
    w, b = torch.zeros(3, 1, requires_grad=True), torch.zeros(3, requires_grad=True)
    ours = packed_recurrence(gi, None, w, b, sizes)
    ref = _PackedRecurrence.apply(gi, None, w, b, sizes.tolist())
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(ours.sum(), [gi, w, b])
    for a, r in zip(grads, torch.autograd.grad(ref.sum(), [gi, w, b]), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
