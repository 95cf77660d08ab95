"""The fused IaCN kernel (csrc/iacn_fused.cpp) is the ATen path's function: loss and every gradient,
in float64 to rounding, on the cases it covers; the cases it does not cover go to the ATen path."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import planted_batch
from torchrec.sparse.jagged_tensor import JaggedTensor

import iacn_torchrec.modules.fused_iacn as fused_iacn
from iacn_torchrec.models.framework import build_model
from iacn_torchrec.modules.iacn import IaCNConfig, IaCNTask

B, L, H, DU, S = 14, 9, 6, 5, 4



def test_the_kernel_builds():
    """`make install` provides g++ and ninja: the kernel must build (a failure here means every
    IaCN step runs the slower ATen path)."""
    assert fused_iacn.fused_kernel() is not None, fused_iacn._STATE.get("error")


def _pad(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Jagged → padded [B, L, h] by masked_scatter (fbgemm's jagged_to_padded_dense has no float64)."""
    mask = torch.arange(L) < lengths.unsqueeze(1)
    return values.new_zeros(len(lengths), L, values.shape[1]).masked_scatter(mask.unsqueeze(-1), values)


def _inputs(dtype, seed=0, by_position=True, ids=True, log_q=True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[:4] = torch.tensor([0, L, 1, 2])  # empty history (K_u = 1 on zero capsules), full, short
    labels = (torch.rand(B, generator=g) > 0.4).float()
    labels[:4] = 1
    labels[4] = 0
    rows = labels.nonzero().squeeze(1)
    R = rows.numel() if by_position else B
    target_ids = torch.randint(0, 4, (B,), generator=g)  # few ids: accidental hits happen
    negative_ids = torch.randint(0, 4, (R, S), generator=g)
    negative_ids[0] = target_ids[0]  # row 0: every negative is a hit (its loss is 0)
    return dict(
        values=torch.randn(int(lengths.sum()), H, generator=g, dtype=dtype),
        lengths=lengths, labels=labels, rows=rows,
        target=torch.randn(B, H, generator=g, dtype=dtype),
        negatives=torch.randn(R, S, H, generator=g, dtype=dtype),
        user=torch.randn(B, DU, generator=g, dtype=dtype),
        init=torch.randn(B, math.ceil(math.log2(L)), L, generator=g, dtype=dtype),
        target_ids=target_ids if ids else None, negative_ids=negative_ids if ids else None,
        neg_log_q=torch.randn(R, S, generator=g, dtype=dtype) if log_q else None,
        target_log_q=torch.randn(B, generator=g, dtype=dtype) if log_q else None,
        by_position=by_position,
    )


def _loss_and_grads(task, x, fused, padded=False, init=True, **overrides):
    """L_IaCN and the gradients of (values, target, negatives, *task.parameters())."""
    task.fused = fused
    leaves = [x[k].clone().requires_grad_() for k in ("values", "target", "negatives")]
    for p in task.parameters():
        p.grad = None
    jt = JaggedTensor(values=leaves[0], lengths=x["lengths"])
    hist, lengths = (_pad(leaves[0], x["lengths"]), x["lengths"]) if padded else (jt, None)
    kwargs = dict(user=x["user"], aux_negatives=leaves[2], neg_log_q=x["neg_log_q"],
                  target_log_q=x["target_log_q"], target_ids=x["target_ids"],
                  negative_ids=x["negative_ids"], init_logits=x["init"] if init else None,
                  negative_rows=x["rows"] if x["by_position"] else None)
    kwargs.update(overrides)
    loss = task(hist, lengths, leaves[1], x["labels"], **kwargs)
    loss.backward()
    grads = [t.grad for t in leaves] + [p.grad for p in task.parameters()]
    return loss.detach(), grads


def _task(dtype, p=2.0, profile=True, train=True):
    torch.manual_seed(0)
    task = IaCNTask(IaCNConfig(enabled=True, pow_p=p, user_profile_layer=profile, num_negatives=S),
                    item_dim=H, max_len=L, user_dim=DU).to(dtype)
    return task.train(train)


def _assert_same(a, b, rtol, atol):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=atol)
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("profile", [True, False])
def test_fused_equals_aten_in_float64(p, profile):
    """Against the padded ATen path, float64: equal to rounding (1e-12), loss and all gradients."""
    task, x = _task(torch.float64, p, profile), _inputs(torch.float64)
    calls = []
    apply = fused_iacn._FusedIaCNLoss.apply
    fused_iacn._FusedIaCNLoss.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        got = _loss_and_grads(task, x, fused=True)
    finally:
        fused_iacn._FusedIaCNLoss.apply = apply
    assert calls == [1]  # the kernel did run
    want = _loss_and_grads(task, x, fused=False, padded=True)
    assert float(want[0]) > 0 and all(g is not None and g.abs().sum() > 0 for g in want[1])
    _assert_same(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["per_row_negatives", "no_ids_no_log_q", "eval_logits", "drawn_logits"])
def test_fused_equals_aten_variants(variant):
    x = _inputs(torch.float64, seed=3, by_position=variant != "per_row_negatives",
                ids=variant != "no_ids_no_log_q", log_q=variant != "no_ids_no_log_q")
    task = _task(torch.float64, train=variant != "eval_logits")
    init = variant not in ("eval_logits", "drawn_logits")
    torch.manual_seed(7)  # drawn_logits: both paths draw [B, K_max, L] from the global RNG
    got = _loss_and_grads(task, x, fused=True, init=init)
    torch.manual_seed(7)
    want = _loss_and_grads(task, x, fused=False, padded=True, init=init)
    _assert_same(got, want, rtol=1e-12, atol=1e-12)


def test_fused_equals_the_jagged_aten_path_in_float32():
    """float32, against the jagged ATen path the trainer would otherwise take."""
    task, x = _task(torch.float32), _inputs(torch.float32, seed=1)
    _assert_same(_loss_and_grads(task, x, fused=True), _loss_and_grads(task, x, fused=False),
                 rtol=1e-4, atol=1e-6)


def test_fused_gradcheck():
    """Finite differences (float64) through the kernel for the target and the negatives: the
    routing weights do not depend on them, so autograd's gradient is the full derivative there
    (for the history and S the routing weights' stop-gradient makes it a partial one by design;
    those gradients are checked against the ATen path above)."""
    task, x = _task(torch.float64), _inputs(torch.float64, seed=2)
    jt = JaggedTensor(values=x["values"], lengths=x["lengths"])

    def f(target, negatives):
        return fused_iacn.fused_iacn_loss(
            task, jt, x["rows"], target, negatives, x["rows"], x["user"], x["neg_log_q"],
            x["target_log_q"], x["target_ids"], x["negative_ids"], x["init"], None)

    assert torch.autograd.gradcheck(f, [x["target"].clone().requires_grad_(),
                                        x["negatives"].clone().requires_grad_()])


@pytest.mark.parametrize("case", ["hard_attention", "in_batch", "user_with_grad", "env_off", "padded"])
def test_uncovered_cases_take_the_aten_path(case, monkeypatch):
    calls = []
    apply = fused_iacn._FusedIaCNLoss.apply
    monkeypatch.setattr(fused_iacn._FusedIaCNLoss, "apply", lambda *a: calls.append(1) or apply(*a))
    task, x = _task(torch.float32, p=math.inf if case == "hard_attention" else 2.0), _inputs(torch.float32)
    overrides = {}
    if case == "in_batch":
        task.config.sampler = "in_batch"
        overrides = dict(aux_negatives=None, neg_log_q=None, negative_ids=None, negative_rows=None)
    if case == "user_with_grad":
        overrides = dict(user=x["user"].clone().requires_grad_())
    if case == "env_off":
        monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    got = _loss_and_grads(task, x, fused=True, padded=case == "padded", **overrides)
    assert calls == []
    want = _loss_and_grads(task, x, fused=False, padded=case == "padded", **overrides)
    _assert_same(got, want, rtol=0, atol=0)


def test_over_long_history_is_named_by_the_aten_path():
    task, x = _task(torch.float32), _inputs(torch.float32)
    lengths = x["lengths"].clone()
    lengths[5] = L + 1
    values = torch.randn(int(lengths.sum()), H)
    with pytest.raises(ValueError, match="exceeds max_len"):
        task(JaggedTensor(values=values, lengths=lengths), None, x["target"], torch.ones(B), user=x["user"],
             aux_negatives=torch.randn(B, S, H))


def test_din_with_iacn_trains_the_same_with_the_kernel():
    """Three SGD steps of DIN+IaCN (δ split, sampled negatives, user-profile layer), kernel on vs
    off from the same seed: the same parameters up to float32 rounding."""
    params = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model("din", 20, 60, 6, 8, IaCNConfig(enabled=True, aux_dim=4, num_negatives=5),
                            emb_dim=4)
        model.iacn.fused = fused
        # SGD: Adam's g/sqrt(v) would turn float32 rounding in a near-zero gradient into a full step
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            batch = planted_batch(32, step, 20, 60, 6, 8, num_negatives=5)
            opt.zero_grad()
            loss, _ = model(batch)
            loss.backward()
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_results_fingerprint_the_kernel_source(tmp_path, monkeypatch):
    """Results record which code produced them (`versions()["iacn_torchrec_source"]`): the C++
    kernel is part of that code."""
    import shutil

    import iacn_torchrec

    pkg = tmp_path / "iacn_torchrec"
    shutil.copytree(iacn_torchrec.__path__[0], pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(iacn_torchrec, "__file__", str(pkg / "__init__.py"))
    monkeypatch.setattr(iacn_torchrec, "_SOURCE", None)
    before = iacn_torchrec.source_fingerprint()
    cpp = pkg / "csrc" / "iacn_fused.cpp"
    cpp.write_text(cpp.read_text() + "\n// changed\n")
    monkeypatch.setattr(iacn_torchrec, "_SOURCE", None)
    assert iacn_torchrec.source_fingerprint() != before


def test_each_environment_and_source_gets_its_own_build(monkeypatch, tmp_path):
    """Two venvs (or a changed source) must not share one build directory: they would rebuild it
    for each other on every first use (a ~30 s stall each time)."""
    import sys

    name = fused_iacn._build_name()
    assert name == fused_iacn._build_name() and name.startswith("iacn_fused_")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    assert fused_iacn._build_name() != name
    monkeypatch.undo()
    src = tmp_path / "iacn_fused.cpp"
    src.write_text(fused_iacn._SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(fused_iacn, "_SOURCE", src)
    assert fused_iacn._build_name() != name
