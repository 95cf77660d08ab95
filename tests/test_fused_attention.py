"""DIN's attention unit through the fused kernel (csrc/din_attention.cpp) is the ATen path's function:
output, weights and every gradient, in float64 to rounding; uncovered configurations keep the ATen
path."""

from __future__ import annotations

import pytest
import torch
from helpers import count_calls, din_iacn_after_sgd_steps

import iacn_torchrec.models.layers as layers
from iacn_torchrec.models.layers import AttentionUnit, segment_ids

B, D = 13, 5


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_calls(monkeypatch, layers._FusedAttention)


def _case(dtype, seed=0, hidden=(80, 40)):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 7, (B,), generator=g)
    lengths[:3] = torch.tensor([0, 1, 6])  # a row without behaviours gets a zero output
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    N = int(lengths.sum())
    torch.manual_seed(seed)
    unit = AttentionUnit(D, D, hidden).to(dtype)
    q = torch.randn(B, D, generator=g, dtype=dtype)
    v = torch.randn(N, D, generator=g, dtype=dtype)
    # a loss reading both outputs, so the weights' own gradient path is checked too
    w_out = torch.randn(B, D, generator=g, dtype=dtype)
    w_att = torch.randn(N, generator=g, dtype=dtype)
    return unit, q, v, lengths, offsets, w_out, w_att


def _run(unit, q, v, lengths, offsets, w_out, w_att, fused):
    q, v = q.clone().requires_grad_(), v.clone().requires_grad_()
    for p in unit.parameters():
        p.grad = None
    seg = segment_ids(lengths, v.shape[0])
    out, att = unit.forward_jagged(q, v, seg, B, offsets=offsets if fused else None)
    ((out * w_out).sum() + (att * w_att).sum()).backward()
    return [out.detach(), att.detach(), q.grad, v.grad] + [p.grad for p in unit.parameters()]


@pytest.mark.parametrize("hidden", [(80, 40), (7,), (6, 5, 4)])
def test_fused_attention_equals_aten_in_float64(hidden, kernel_calls):
    case = _case(torch.float64, hidden=hidden)
    got, want = _run(*case, fused=True), _run(*case, fused=False)
    assert kernel_calls == [1]
    assert all(g is not None and g.abs().sum() > 0 for g in want[2:])
    assert float(want[0][0].abs().sum()) == 0  # the empty row
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_attention_equals_aten_in_float32(kernel_calls):
    case = _case(torch.float32, seed=1)
    for a, b in zip(_run(*case, fused=True), _run(*case, fused=False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert kernel_calls == [1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_attention_with_a_query_projection(dtype, kernel_calls):
    """DIEN's unit (Linear + PReLU from the target's width to the keys'): the projection runs as its
    module, the kernel takes its output; the same output, weights and gradients (the projection's
    parameters and the unprojected query included) as the ATen path."""
    unit, _, v, lengths, offsets, w_out, w_att = _case(dtype, seed=3)
    torch.manual_seed(3)
    unit = AttentionUnit(D + 3, D, (80, 40), query_proj=True).to(dtype)
    q = torch.randn(B, D + 3, dtype=dtype)
    got, want = _run(unit, q, v, lengths, offsets, w_out, w_att, True), \
        _run(unit, q, v, lengths, offsets, w_out, w_att, False)
    assert kernel_calls == [1]
    assert len(got) == 4 + len(list(unit.parameters())) and all(g.abs().sum() > 0 for g in want[2:])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_fused_attention_gradcheck():
    unit, q, v, lengths, offsets, *_ = _case(torch.float64, seed=2, hidden=(4, 3))
    seg = segment_ids(lengths, v.shape[0])
    assert torch.autograd.gradcheck(
        lambda q, v: unit.forward_jagged(q, v, seg, B, offsets=offsets),
        [q.clone().requires_grad_(), v.clone().requires_grad_()])


@pytest.mark.parametrize("case", ["relu", "no_softmax", "env_off"])
def test_uncovered_configurations_take_the_aten_path(case, monkeypatch, kernel_calls):
    unit, q, v, lengths, offsets, w_out, w_att = _case(torch.float32)
    if case == "relu":
        unit = AttentionUnit(D, D, (80, 40), activation="relu")
    if case == "no_softmax":
        unit.softmax = False
    if case == "env_off":
        monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    got = _run(unit, q, v, lengths, offsets, w_out, w_att, fused=True)
    assert kernel_calls == []
    for a, b in zip(got, _run(unit, q, v, lengths, offsets, w_out, w_att, fused=False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [[0, 2, 9], [0, 2, 4], [1, 3, 5], [0, 4, 3]],
                         ids=["past-the-end", "short", "not-from-0", "decreasing"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "eval"])
def test_offsets_that_do_not_cover_the_values_are_refused(bad, grad, kernel_calls):
    """5 behaviours for 2 rows: offsets must run 0 .. 5 without decreasing. Before the check, offsets
    past the end read and wrote out of bounds (a segfault) and short ones left rows of the
    gradient uninitialised."""
    torch.manual_seed(0)
    unit = AttentionUnit(4, 4, (8,)).double()
    q = torch.randn(2, 4, dtype=torch.float64)
    v = torch.randn(5, 4, dtype=torch.float64, requires_grad=grad)
    seg = segment_ids(torch.tensor([2, 3]), 5)
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="din_attention: offsets"):
        unit.forward_jagged(q, v, seg, 2, offsets=torch.tensor(bad))
    out, _ = unit.forward_jagged(q, v, seg, 2, offsets=torch.tensor([0, 2, 5]))  # the right ones still work
    assert out.shape == (2, 4)


def test_double_backward_is_refused():
    unit, q, v, lengths, offsets, *_ = _case(torch.float64)
    q = q.clone().requires_grad_()
    out, _ = unit.forward_jagged(q, v, segment_ids(lengths, v.shape[0]), B, offsets=offsets)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_din_trains_the_same_with_the_kernel(monkeypatch, kernel_calls):
    """Three SGD steps of DIN+IaCN through the real embeddings, attention kernel on vs off: the same
    parameters up to float32 rounding (the kernel did run in the first)."""
    params = []
    for env in ("1", "0"):
        monkeypatch.setenv("IACN_FUSED_KERNEL", env)  # both kernels off in the second run
        params.append(din_iacn_after_sgd_steps())
        if env == "1":
            assert len(kernel_calls) == 3
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", [(80, 40), (13, 5), (100, 3), (200,), (8,)],
                         ids=["din", "tail", "12-blocks-and-tail", "several-passes", "one-block"])
def test_evaluation_path_equals_the_training_forward(dtype, hidden, kernel_calls):
    """Without a gradient to record the kernel forms M_b = (W_k - W_d)ᵀ + diag(q_b) W_pᵀ per row and
    runs one product per behaviour (its AVX2 row kernel: widths of whole 8-column blocks, a tail,
    more than one 12-block pass); the same outputs and weights as the training forward (which
    computes the two products separately) and as the ATen path, empty rows included."""
    unit, q, v, lengths, offsets, *_ = _case(dtype, seed=4, hidden=hidden)
    seg = segment_ids(lengths, v.shape[0])
    with torch.no_grad():
        got = unit.forward_jagged(q, v, seg, B, offsets=offsets)
        aten = unit.forward_jagged(q, v, seg, B)
    train = unit.forward_jagged(q, v, seg, B, offsets=offsets)
    assert kernel_calls == [1, 1] and train[0].requires_grad and not got[0].requires_grad
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b, c in zip(got, train, aten, strict=True):
        torch.testing.assert_close(a, b.detach(), **tol)
        torch.testing.assert_close(a, c, **tol)
    assert float(got[0][0].abs().sum()) == 0  # the empty row
    assert float(got[1].sum()) == pytest.approx(int((lengths > 0).sum()))  # each row's weights sum to 1


@pytest.mark.parametrize("model_name", ["din", "dien"])
def test_predict_is_the_same_with_the_kernels(model_name, monkeypatch, kernel_calls):
    """DIN+IaCN / DIEN+IaCN after two SGD steps, in eval mode, score a batch the same (float32
    rounding) with every kernel on (the merged attention, DIEN's after its query projection; Dice
    on running statistics; the history sum as an embedding bag) and off."""
    from helpers import planted_batch

    from iacn_torchrec.models.framework import build_model
    from iacn_torchrec.modules.iacn import IaCNConfig

    torch.manual_seed(0)
    dien = model_name == "dien"
    model = build_model(model_name, 20, 60, 6, 8, IaCNConfig(enabled=True, aux_dim=4, num_negatives=5),
                        emb_dim=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):  # moves Dice's running statistics off their initial values
        loss, _ = model(planted_batch(32, step, 20, 60, 6, 8, num_negatives=5, neg_hist=dien))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():  # Dice's α barely leaves 0 in two steps; give both of its terms weight
        for m in model.modules():
            if isinstance(m, layers.Dice):
                m.alpha.uniform_(-1, 1)
    batch = planted_batch(64, 7, 20, 60, 6, 8, num_negatives=5, neg_hist=dien)
    with torch.no_grad():
        before = len(kernel_calls)
        on = model.predict(batch)
        assert len(kernel_calls) == before + 1  # the attention kernel's evaluation path
        monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
        off = model.predict(batch)
    assert len(kernel_calls) == before + 1 and on.std() > 0
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-6)


def test_a_traced_graph_runs_the_aten_path(kernel_calls):
    """Under ``torch.jit.trace`` (as under fx tracing and ``torch.compile``: ``capturing_graph``) the
    kernel is not called, since a trace would keep its output as a constant: the traced function
    computes the right values for new inputs."""
    from iacn_torchrec.kernels import capturing_graph

    unit, q, v, lengths, offsets, *_ = _case(torch.float32, seed=5)
    seg = segment_ids(lengths, v.shape[0])
    assert not capturing_graph(q)

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unit = unit

        def forward(self, q, v):
            assert capturing_graph(q)
            return self.unit.forward_jagged(q, v, seg, B, offsets=offsets)[0]

    with torch.no_grad():
        traced = torch.jit.trace(Attend(), (q, v), check_trace=False)
        assert kernel_calls == []
        q2, v2 = torch.randn_like(q), torch.randn_like(v)
        torch.testing.assert_close(traced(q2, v2), unit.forward_jagged(q2, v2, seg, B, offsets=offsets)[0],
                                   rtol=1e-5, atol=1e-6)
    assert kernel_calls == [1]  # the eager call after the trace
