"""The fused IaCN kernel (csrc/iacn_fused.cpp) is the ATen path's function: loss and every gradient,
in float64 to rounding, on the cases it covers; the cases it does not cover go to the ATen path."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import count_calls, din_iacn_after_sgd_steps
from torchrec.sparse.jagged_tensor import JaggedTensor

import iacn_torchrec.kernels as kernels
import iacn_torchrec.modules.fused_iacn as fused_iacn
from iacn_torchrec.modules.iacn import IaCNConfig, IaCNTask

B, L, H, DU, S = 14, 9, 6, 5, 4



@pytest.mark.parametrize("name", kernels.KERNELS)
def test_the_kernels_build(name):
    """`make install` provides g++ and ninja: every kernel must build (a failure here means the
    slower ATen ops run in its place)."""
    assert kernels.load_kernel(name) is not None, kernels._STATE.get(name, {}).get("error")


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of times the kernel ran (a list that grows by one per call)."""
    return count_calls(monkeypatch, fused_iacn._FusedIaCNLoss)


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
def test_fused_equals_aten_in_float64(p, profile, kernel_calls):
    """Against the padded ATen path, float64: equal to rounding (1e-12), loss and all gradients."""
    task, x = _task(torch.float64, p, profile), _inputs(torch.float64)
    got = _loss_and_grads(task, x, fused=True)
    assert kernel_calls == [1]  # the kernel did run
    want = _loss_and_grads(task, x, fused=False, padded=True)
    assert float(want[0]) > 0 and all(g is not None and g.abs().sum() > 0 for g in want[1])
    _assert_same(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["per_row_negatives", "no_ids_no_log_q", "eval_logits", "drawn_logits",
                                     "k_max_2_one_iteration", "int32_ids_non_contiguous"])
def test_fused_equals_aten_variants(variant, kernel_calls):
    x = _inputs(torch.float64, seed=3, by_position=variant != "per_row_negatives",
                ids=variant != "no_ids_no_log_q", log_q=variant != "no_ids_no_log_q")
    task = _task(torch.float64, train=variant != "eval_logits")
    if variant == "k_max_2_one_iteration":
        task = IaCNTask(IaCNConfig(enabled=True, k_max=2, routing_iters=1, num_negatives=S), item_dim=H,
                        max_len=L, user_dim=DU).double()
        x["init"] = x["init"][:, :2].contiguous()
    if variant == "int32_ids_non_contiguous":
        x["target_ids"], x["negative_ids"] = x["target_ids"].int(), x["negative_ids"].int()
        x["negatives"] = torch.cat([x["negatives"], x["negatives"]], dim=2)[..., ::2]  # a strided view
        x["user"] = x["user"].t().contiguous().t()
    init = variant not in ("eval_logits", "drawn_logits")
    torch.manual_seed(7)  # drawn_logits: both paths draw [B, K_max, L] from the global RNG
    got = _loss_and_grads(task, x, fused=True, init=init)
    after_fused = torch.rand(3)  # the same RNG stream afterwards
    assert kernel_calls == [1]
    torch.manual_seed(7)
    want = _loss_and_grads(task, x, fused=False, padded=True, init=init)
    assert torch.equal(after_fused, torch.rand(3))
    _assert_same(got, want, rtol=1e-12, atol=1e-12)


def test_fused_equals_aten_where_signed_pow_caps_the_scores(kernel_calls):
    """p = 200 (float32's cap (max / 2p)^(1/p) ≈ 1.51) with some rows' scores above the cap: those
    rows take one-hot weights in both (where capping alone would tie the capped capsules), the
    others the softmax. Moderate scores keep the sampled softmax unsaturated, so the weights show."""
    task, x = _task(torch.float32, p=200.0), _inputs(torch.float32, seed=4)
    x["target"][::2] *= 5
    with torch.no_grad():
        out = task.interests(JaggedTensor(values=x["values"], lengths=x["lengths"]), None, x["target"],
                             user=x["user"], init_logits=x["init"])
    scores = (out.capsules * x["target"].unsqueeze(1)).sum(-1).masked_fill(~out.capsule_mask, -torch.inf)
    scores = scores[x["rows"]]  # the positive rows, which the loss scores
    assert int(((scores > 1.52).sum(1) >= 2).sum()) >= 1  # a hard row where a cap would tie capsules
    assert int((scores.amax(1).abs() < 1.5).sum()) >= 2  # soft rows
    _assert_same(_loss_and_grads(task, x, fused=True), _loss_and_grads(task, x, fused=False),
                 rtol=1e-4, atol=1e-5)
    assert kernel_calls == [1]


def test_fused_equals_aten_where_every_live_score_is_capped_below(kernel_calls):
    """p = 200 with positive rows whose live scores are all below -cap (a target pointing away from
    every interest): the ATen path gives one-hot weight to the least negative capsule, and so must
    the kernel (capping alone would tie the capped capsules, as with the scores above the cap)."""
    task, x = _task(torch.float32, p=200.0), _inputs(torch.float32, seed=4)
    jt = JaggedTensor(values=x["values"], lengths=x["lengths"])
    with torch.no_grad():
        out = task.interests(jt, None, x["target"], user=x["user"], init_logits=x["init"])
        mean = (out.capsules * out.capsule_mask.unsqueeze(-1)).sum(1)
        x["target"] = -20.0 * mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-6)
        out = task.interests(jt, None, x["target"], user=x["user"], init_logits=x["init"])
    scores = (out.capsules * x["target"].unsqueeze(1)).sum(-1).masked_fill(~out.capsule_mask, -torch.inf)
    scores, live = scores[x["rows"]], out.capsule_mask[x["rows"]]
    assert int((((scores < -1.52) | ~live).all(1) & (live.sum(1) >= 2)).sum()) >= 1
    _assert_same(_loss_and_grads(task, x, fused=True), _loss_and_grads(task, x, fused=False),
                 rtol=1e-4, atol=1e-5)
    assert kernel_calls == [1]


def test_the_trainers_worker_path_runs_the_kernel(monkeypatch):
    """IaCN on the worker thread (the trainer's default) reaches the fused kernel: it refuses a
    ``user`` that needs gradients, so the worker must hand it over detached, or every step would
    fall back to the slower ATen path with the same numbers."""
    from helpers import planted_batch

    from iacn_torchrec.models.framework import build_model

    if not kernels.kernels_enabled():
        pytest.skip("IACN_FUSED_KERNEL=0")
    calls = count_calls(monkeypatch, fused_iacn._FusedIaCNLoss)
    torch.manual_seed(0)
    model = build_model("din", 20, 60, 6, 8, IaCNConfig(enabled=True, aux_dim=4, num_negatives=5), emb_dim=4)
    model.run_iacn_on_worker(True)
    loss, _ = model(planted_batch(32, 0, 20, 60, 6, 8, num_negatives=5))
    loss.backward()
    assert calls == [1]


def test_fused_equals_the_jagged_aten_path_in_float32(kernel_calls):
    """float32, against the jagged ATen path the trainer would otherwise take."""
    task, x = _task(torch.float32), _inputs(torch.float32, seed=1)
    _assert_same(_loss_and_grads(task, x, fused=True), _loss_and_grads(task, x, fused=False),
                 rtol=1e-4, atol=1e-6)
    assert kernel_calls == [1]


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


@pytest.mark.parametrize("case", ["hard_attention", "in_batch", "user_with_grad", "env_off",
                                  "log_q_with_grad", "float_ids", "k_max_64"])
def test_uncovered_cases_take_the_aten_path(case, monkeypatch, kernel_calls):
    task, x = _task(torch.float32, p=math.inf if case == "hard_attention" else 2.0), _inputs(torch.float32)
    overrides = {}
    if case == "in_batch":
        task.config.sampler = "in_batch"
        overrides = dict(aux_negatives=None, neg_log_q=None, negative_ids=None, negative_rows=None)
    if case == "user_with_grad":
        overrides = dict(user=x["user"].clone().requires_grad_())
    if case == "env_off":
        monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    if case == "log_q_with_grad":  # a learned logQ: its gradient is the ATen path's to give
        overrides = dict(neg_log_q=x["neg_log_q"].clone().requires_grad_())
    if case == "float_ids":  # the kernel compares int64 ids: float ids would be truncated
        overrides = dict(target_ids=x["target_ids"] + 0.5, negative_ids=x["negative_ids"] + 0.5)
    if case == "k_max_64":
        task = IaCNTask(IaCNConfig(enabled=True, k_max=64, num_negatives=S), item_dim=H, max_len=L,
                        user_dim=DU)
        overrides = dict(init_logits=torch.randn(B, 64, L))
    got = _loss_and_grads(task, x, fused=True, **overrides)
    assert kernel_calls == []
    want = _loss_and_grads(task, x, fused=False, **overrides)
    _assert_same(got, want, rtol=0, atol=0)


def test_labels_of_the_wrong_shape_are_refused_as_by_the_aten_path(kernel_calls):
    task, x = _task(torch.float32), _inputs(torch.float32)
    for labels in (x["labels"].unsqueeze(1), torch.ones(B - 3)):
        with pytest.raises(ValueError, match="labels must be"):
            task(JaggedTensor(values=x["values"], lengths=x["lengths"]), None, x["target"], labels,
                 user=x["user"], aux_negatives=x["negatives"][:0].new_zeros(B, S, H))
    assert kernel_calls == []


def test_double_backward_is_refused_with_a_way_out():
    task, x = _task(torch.float64), _inputs(torch.float64)
    task.fused = True
    target = x["target"].clone().requires_grad_()
    loss = task(JaggedTensor(values=x["values"], lengths=x["lengths"]), None, target, x["labels"],
                user=x["user"], aux_negatives=x["negatives"], negative_rows=x["rows"], init_logits=x["init"])
    with pytest.raises(RuntimeError, match="no double backward.*task.fused = False"):
        torch.autograd.grad(loss, target, create_graph=True)


def test_k_max_above_62_counts_interests_exactly():
    """K_u = clamp(ceil(log2 n), 1, K_max) also for K_max ≥ 64 (2^63 would overflow int64)."""
    from iacn_torchrec.modules.capsule import InterestCapsuleRouting

    routing = InterestCapsuleRouting(item_dim=4, max_len=20, k_max=64)
    got = routing.num_interests(torch.tensor([0, 1, 2, 3, 8, 9, 20]))
    assert got.tolist() == [1, 1, 1, 2, 3, 4, 5]


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

    def aten(model):
        model.iacn.fused = False

    for a, b in zip(din_iacn_after_sgd_steps(), din_iacn_after_sgd_steps(aten), strict=True):
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
    seen = {before}
    for name in ("iacn_fused.cpp", "vec_math.h"):  # the kernels' shared headers are compiled in too
        source = pkg / "csrc" / name
        source.write_text(source.read_text() + "\n// changed\n")
        monkeypatch.setattr(iacn_torchrec, "_SOURCE", None)
        now = iacn_torchrec.source_fingerprint()
        assert now not in seen
        seen.add(now)


def test_each_environment_and_source_gets_its_own_build(monkeypatch, tmp_path):
    """Two venvs, two checkouts of the same source (a clone beside a working tree, sharing one venv)
    or a changed source must not share one build directory: they would rebuild it for each other
    on every first use (a ~30 s stall each time)."""
    import shutil
    import sys

    name = kernels.build_name("iacn_fused")
    assert name == kernels.build_name("iacn_fused") and name.startswith("iacn_fused_")
    assert kernels.build_name("din_attention") != name
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    assert kernels.build_name("iacn_fused") != name
    monkeypatch.undo()
    shutil.copytree(kernels._CSRC, tmp_path / "csrc")
    monkeypatch.setattr(kernels, "_CSRC", tmp_path / "csrc")
    same_text = kernels.build_name("iacn_fused")
    assert same_text != name  # the same text in another checkout
    src = tmp_path / "csrc" / "iacn_fused.cpp"
    src.write_text(src.read_text() + "\n// changed\n")
    assert kernels.build_name("iacn_fused") not in (name, same_text)


def test_a_build_lock_left_by_a_killed_build_is_removed_a_live_one_waited_for(tmp_path, monkeypatch):
    """torch waits on a build directory's ``lock`` file forever, even one a killed build left: with
    the kernels' own build lock (an flock, which dies with its process) held, such a file is a dead
    build's and is removed (warned); while another process holds the build lock, a load says it is
    waiting and goes on only once that process let go."""
    import io
    import subprocess
    import sys
    import threading
    import time

    baton = tmp_path / "lock"
    baton.write_text("")  # as a killed build leaves it
    with pytest.warns(RuntimeWarning, match=r"removing .*lock: a kernel build that was killed left it"):
        with kernels.build_lock(tmp_path, "dice"):
            assert not baton.exists()
    # a live build in another process: it holds the flock until told to go, writes `done`, exits
    done = tmp_path / "done"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys\n"
        f"f = open({str(tmp_path / 'iacn.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); sys.stdin.readline()\n"
        f"open({str(done)!r}, 'w').close()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    err, seen = io.StringIO(), []
    monkeypatch.setattr(sys, "stderr", err)

    def load() -> None:
        with kernels.build_lock(tmp_path, "dice"):
            seen.append(done.exists())

    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = threading.Thread(target=load)
        waiter.start()
        deadline = time.monotonic() + 30
        while "waiting for another process" not in err.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "waiting for another process to finish building the dice kernel" in err.getvalue()
        assert seen == []  # still waiting
        holder.stdin.write("go\n")
        holder.stdin.flush()
        waiter.join(timeout=30)
        assert seen == [True]  # it went on only after the holder had finished
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # a lock held only briefly (another process loading a built kernel) is waited for silently
    err.seek(0)
    err.truncate(0)
    brief = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, time\n"
        f"f = open({str(tmp_path / 'iacn.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(0.2)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert brief.stdout.readline().strip() == "held"
        with kernels.build_lock(tmp_path, "dice"):
            pass
    finally:
        brief.wait(timeout=30)
    assert err.getvalue() == ""


def test_a_kernel_that_cannot_be_built_warns_once_and_the_aten_path_runs(monkeypatch, tmp_path, kernel_calls):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "iacn_fused.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "_CSRC", tmp_path / "csrc")
    monkeypatch.setattr(kernels, "_STATE", {})  # restored afterwards: later tests get the real one
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    with pytest.warns(RuntimeWarning, match="iacn_fused kernel could not be built.*ATen ops run"):
        assert fused_iacn.fused_kernel() is None
    import warnings

    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert fused_iacn.fused_kernel() is None  # remembered: no second attempt, no second warning
    assert again == []
    task, x = _task(torch.float32), _inputs(torch.float32)
    got = _loss_and_grads(task, x, fused=True)
    assert kernel_calls == []
    _assert_same(got, _loss_and_grads(task, x, fused=False), rtol=0, atol=0)
