"""End to end on real data: a short DIN+IaCN run on Beauty learns, and resuming is exact."""

import json

import pytest
import torch
import yaml

from iacn_torchrec.modules.iacn import IaCNConfig
from iacn_torchrec.train.checkpoint import CheckpointError, load_checkpoint
from iacn_torchrec.train.config import DataConfig, ModelConfig, TrainConfig
from iacn_torchrec.train.loop import train


def _config(data, out, max_steps, **kw):
    return TrainConfig(
        data=DataConfig(path=str(data), batch_size=128, num_test_samples=6000),
        model=ModelConfig(name="din"),
        iacn=IaCNConfig(enabled=True, delta=0.3, lam=1.0),
        out=str(out),
        max_steps=max_steps,
        seed=3,
        progress=False,
        **kw,
    )


def _final_state(out):
    return load_checkpoint(str(out / "checkpoints"))


def test_short_run_learns_and_resume_is_exact(beauty_prepared, tmp_path):
    full = train(_config(beauty_prepared, tmp_path / "full", 160))
    assert full["steps"] == 160
    # 160 steps x 128 samples is 7% of an epoch; a model that learned nothing sits at 0.5
    assert full["test"]["auc"] > 0.62, full["test"]
    assert full["test"]["gauc"] > 0.6
    written = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert written["config"]["iacn"]["delta"] == 0.3 and "torchrec" in written["versions"]
    assert written["versions"]["iacn_torchrec_source"].startswith("sha256:")  # which code trained it

    # interrupted at step 70 (checkpoint), then the same command resumes to 160
    train(_config(beauty_prepared, tmp_path / "resumed", 70))
    resumed = train(_config(beauty_prepared, tmp_path / "resumed", 160))
    assert resumed["steps"] == 160
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "resumed")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["test"]["auc"] == full["test"]["auc"]


def test_iacn_changes_training_only_through_the_aux_side(beauty_prepared, tmp_path):
    """λ = 0 with δ = 1 is the capacity-matched control: IaCN's loss is not even computed, so its
    run must equal a run whose IaCN task has different hyper-parameters (p, K_max)."""
    base = dict(max_steps=40)
    c1 = _config(beauty_prepared, tmp_path / "a", **base)
    c1.iacn = IaCNConfig(enabled=True, delta=1.0, lam=0.0)
    c2 = _config(beauty_prepared, tmp_path / "b", **base)
    c2.iacn = IaCNConfig(enabled=True, delta=1.0, lam=0.0, pow_p=5.0, routing_iters=1)
    r1, r2 = train(c1), train(c2)
    assert r1["test"]["auc"] == r2["test"]["auc"]
    s1, s2 = _final_state(tmp_path / "a")["model"], _final_state(tmp_path / "b")["model"]
    for k in s1:
        if ".iacn." not in f".{k}":
            assert torch.equal(s1[k], s2[k]), k


def test_evaluation_threads_are_scoped_and_change_no_metric(beauty_prepared):
    """``evaluate(threads=N)`` runs with N torch threads, ``batch_workers=N`` scores N batches at
    once on worker threads; both restore the training setting, and the metrics depend on neither
    (beyond float summation order)."""
    import os
    from types import SimpleNamespace

    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.distributed.setup import build_training
    from iacn_torchrec.train.loop import (
        eval_threads,
        evaluate,
        evaluation_cores,
        make_loaders,
        seed_everything,
    )

    cfg = _config(beauty_prepared, "unused", 1)
    cores = os.cpu_count()
    # by default each process takes its share of the cores, at least one
    assert [eval_threads(cfg, world_size=w) for w in (1, 2, 2 * cores)] == [cores, max(1, cores // 2), 1]
    unsharded = SimpleNamespace(sharded=False, device=torch.device("cpu"))
    assert evaluation_cores(cfg, unsharded, 1) == {"batch_workers": cores}  # concurrent batches
    assert evaluation_cores(cfg, SimpleNamespace(sharded=True, device=torch.device("cpu")), 2) == {
        "threads": max(1, cores // 2)}  # a sharded model's lookups are collectives: one batch at a time
    cfg.eval_threads = 3  # --eval-threads wins
    assert eval_threads(cfg, world_size=2) == 3
    assert evaluation_cores(cfg, unsharded, 2) == {"batch_workers": 3}
    seed_everything(0)
    ds = PreparedDataset.open(beauty_prepared)
    _, test_loader, log_q = make_loaders(cfg, ds, 0, 1)
    model = build_training(cfg, ds, item_log_q=log_q).model
    before = torch.get_num_threads()
    m1 = evaluate(model, test_loader, threads=1)
    assert torch.get_num_threads() == before
    m2 = evaluate(model, test_loader, threads=2)
    assert torch.get_num_threads() == before
    m3 = evaluate(model, test_loader, batch_workers=2)
    assert torch.get_num_threads() == before
    assert model.training  # restored
    assert m1.keys() == m2.keys() == m3.keys()
    for k in m1:
        assert abs(m1[k] - m2[k]) < 1e-5, (k, m1[k], m2[k])
        assert abs(m1[k] - m3[k]) < 1e-5, (k, m1[k], m3[k])


def test_resume_across_iacn_execution_modes(beauty_prepared, tmp_path):
    """Where IaCN runs (worker thread or main thread) is an execution choice, not part of the
    configuration a checkpoint must match: a run checkpointed with the worker resumes serially and
    ends where an uninterrupted worker run ends (up to float summation order)."""
    full = _config(beauty_prepared, tmp_path / "full", 40)
    train(full)
    first = _config(beauty_prepared, tmp_path / "mixed", 20)
    train(first)
    second = _config(beauty_prepared, tmp_path / "mixed", 40)
    second.model.iacn_worker = False
    assert train(second)["resumed_from_step"] == 20
    a, b = _final_state(tmp_path / "full")["model"], _final_state(tmp_path / "mixed")["model"]
    # the attention score's bias has a true gradient of 0 (the softmax ignores a shift), so Adam
    # turns the paths' different rounding (serial: ATen lookups; worker: the concat_lookup kernel)
    # into lr-sized steps of either sign: nothing to compare there
    shift_invariant = "main_model.attention.mlp.net.4.bias"
    assert shift_invariant in a
    bad = [k for k in a if k != shift_invariant
           and not torch.allclose(b[k], a[k], rtol=1e-4, atol=1e-5)]
    assert not bad, bad


def test_plain_path_gives_the_tables_their_own_learning_rate(beauty_prepared):
    """One-process Adam: ``optim.embedding_lr`` reaches the tables (and weight decay only the dense
    parameters, as on the sharded path). Adam's first step moves every touched weight by about its lr."""
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.distributed.setup import build_training
    from iacn_torchrec.train.loop import make_loaders, seed_everything

    cfg = _config(beauty_prepared, "unused", 1)
    cfg.optim.lr, cfg.optim.embedding_lr, cfg.optim.weight_decay = 1e-3, 0.05, 0.01
    seed_everything(0)
    ds = PreparedDataset.open(beauty_prepared)
    train_loader, _, log_q = make_loaders(cfg, ds, 0, 1)
    setup = build_training(cfg, ds, item_log_q=log_q)
    groups = setup.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.01), (0.05, 0.0)]
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    next(setup.train_steps(train_loader))
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in setup.model.named_parameters()}
    tables = [n for n in moved if n.startswith("embeddings.")]
    assert tables and all(abs(moved[n] - 0.05) < 5e-3 for n in tables), {n: moved[n] for n in tables}
    dense = [n for n in moved if not n.startswith("embeddings.") and moved[n] > 0]
    assert dense and all(moved[n] < 2e-3 for n in dense)


def test_resume_keeps_the_evaluation_history_and_counts_epochs(tmp_path):
    """A resumed run's metrics.json still holds the evaluations made before the interruption, and a
    max_steps stop on an epoch's last batch counts that epoch."""
    from helpers import prepare_planted

    _, data = prepare_planted(tmp_path, num_users=60, seed=0)
    from iacn_torchrec.data.loader import PreparedDataset

    n_train = PreparedDataset.open(data).meta["counts"]["train_samples"]
    per_epoch = -(-n_train // 64)

    def cfg(out, max_steps):
        c = _config(data, out, max_steps, eval_every=4)
        c.data = DataConfig(path=str(data), batch_size=64)
        return c

    full = train(cfg(tmp_path / "full", per_epoch))
    train(cfg(tmp_path / "resumed", 5))
    resumed = train(cfg(tmp_path / "resumed", per_epoch))
    assert resumed["resumed_from_step"] == 5
    steps = [h["step"] for h in full["history"]]
    assert steps == list(range(4, per_epoch + 1, 4)) and steps  # the stop's step too, if it is one
    assert [h["step"] for h in resumed["history"]] == steps
    # a --max-steps stop on an evaluation step evaluates there too (it was skipped, and the resumed
    # run's history lacked that step); the final evaluation is that one, not a second pass
    at_eval = train(cfg(tmp_path / "at_eval", 8))
    assert [h["step"] for h in at_eval["history"]] == [4, 8]
    assert {k: at_eval["history"][-1][k] for k in at_eval["test"]} == at_eval["test"]
    assert [h["step"] for h in train(cfg(tmp_path / "at_eval", per_epoch))["history"]] == steps
    assert full["epochs_completed"] == resumed["epochs_completed"] == 1
    assert train(cfg(tmp_path / "short", per_epoch - 1))["epochs_completed"] == 0
    # a checkpoint at an evaluation step holds that evaluation: resuming from it repeats nothing
    import shutil

    both = cfg(tmp_path / "both", 9)
    both.checkpoint_every = 4
    train(both)
    shutil.rmtree(tmp_path / "both" / "checkpoints" / "step_00000009")  # as if killed after step 8
    both.max_steps = 13
    assert [h["step"] for h in train(both)["history"]] == [4, 8, 12]
    # a last batch of one sample is not trained on (BatchNorm cannot), not a crash
    n_train = PreparedDataset.open(data).meta["counts"]["train_samples"]
    odd = cfg(tmp_path / "odd", None)
    odd.data = DataConfig(path=str(data), batch_size=n_train - 1)
    assert train(odd)["steps"] == 1
    # a refused run (another configuration's checkpoint) leaves the run directory as it was
    before = (tmp_path / "full" / "config.yaml").read_text()
    other = cfg(tmp_path / "full", per_epoch)
    other.seed = 9
    with pytest.raises(CheckpointError, match="different configuration"):
        train(other)
    assert (tmp_path / "full" / "config.yaml").read_text() == before
    # epochs without a full batch (drop_last) pass without a step, and are counted once each
    empty = cfg(tmp_path / "empty", None)
    empty.data = DataConfig(path=str(data), batch_size=100_000, drop_last=True)
    empty.epochs = 2
    r = train(empty)
    assert (r["steps"], r["epochs_completed"]) == (0, 2)


def test_samplers_and_seed_pairing_through_the_training_setup(tmp_path):
    """What `iacn train` builds from a config: the sampler's negatives per row and its log Q are the
    ones the model corrects with, and a plain and an IaCN arm with the same seed share the data
    order and the E_orig/user tables' initialisation (the pairing DESIGN.md's Measuring relies on)."""
    import numpy as np
    from helpers import prepare_planted

    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.distributed.setup import build_training
    from iacn_torchrec.train.loop import make_loaders, seed_everything

    _, data = prepare_planted(tmp_path, num_users=60, seed=0)
    ds = PreparedDataset.open(data)
    built = {}
    for name, iacn in (("plain", IaCNConfig(enabled=False)),
                       ("log_uniform", IaCNConfig(enabled=True, sampler="log_uniform", num_negatives=7)),
                       ("in_batch", IaCNConfig(enabled=True, sampler="in_batch"))):
        cfg = _config(data, tmp_path / name, 2)
        cfg.iacn = iacn
        seed_everything(cfg.seed)
        train_loader, _, log_q = make_loaders(cfg, ds, 0, 1)
        setup = build_training(cfg, ds, item_log_q=log_q)
        built[name] = (train_loader, log_q, setup.model)
    loader, log_q, model = built["log_uniform"]
    assert loader.iacn_negatives.num_negatives == 7
    assert torch.equal(model.item_log_q, log_q.float()) and torch.equal(log_q, loader.iacn_negatives.log_q)
    batch = next(iter(loader))
    positives = int((batch.labels > 0.5).sum())
    assert batch.sparse_features["iacn_neg_item"].values().numel() == 7 * positives > 0
    assert built["in_batch"][0].iacn_negatives is None and built["in_batch"][1] is None
    orders = [b[0].order() for b in built.values()]
    assert all(np.array_equal(orders[0], o) for o in orders[1:])
    plain_state = built["plain"][2].embeddings.orig.state_dict()
    for name in ("log_uniform", "in_batch"):
        state = built[name][2].embeddings.orig.state_dict()
        assert state.keys() == plain_state.keys()
        for k in state:
            assert torch.equal(state[k], plain_state[k]), (name, k)


def test_one_group_adam_checkpoints_resume_into_the_two_groups(tmp_path):
    """Checkpoints of one-process runs from before the tables got their own Adam group (one group
    over model.parameters()) load: every parameter gets back its own moments."""
    from helpers import prepare_planted

    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.distributed.setup import build_training, load_training_state
    from iacn_torchrec.train.loop import make_loaders, seed_everything

    _, data = prepare_planted(tmp_path, num_users=40, seed=0)
    ds = PreparedDataset.open(data)
    cfg = _config(data, tmp_path / "x", 1)
    seed_everything(0)
    loader, _, log_q = make_loaders(cfg, ds, 0, 1)
    assert len(build_training(cfg, ds, item_log_q=log_q).optimizer.param_groups) == 1  # one lr: one group
    cfg.optim.embedding_lr = 0.01  # the tables' own group
    old = build_training(cfg, ds, item_log_q=log_q)
    old_opt = torch.optim.Adam(old.model.parameters(), lr=1e-3)  # the old layout: one group
    old_opt.zero_grad()
    old.model(next(iter(loader)))[0].backward()
    old_opt.step()
    saved = old_opt.state_dict()
    assert len(saved["param_groups"]) == 1
    new = build_training(cfg, ds, item_log_q=log_q)
    load_training_state(new, old.model.state_dict(), saved)
    assert len(new.optimizer.param_groups) == 2
    old_params = dict(old.model.named_parameters())
    for name, p in new.model.named_parameters():
        want = old_opt.state[old_params[name]]["exp_avg"]
        torch.testing.assert_close(new.optimizer.state[p]["exp_avg"], want, rtol=0, atol=0, msg=name)


def test_resume_identity_no_resume_and_checkpoint_replacement(tmp_path, monkeypatch):
    """A checkpoint resumes the same configuration and dataset: the dataset by content (a copy at
    another path resumes, a re-prepared one at the same path does not), a refusal names the fields;
    --no-resume sets the old checkpoints aside, so they no longer pass for this run's."""
    import shutil

    from helpers import prepare_planted

    from iacn_torchrec.data.prepare import prepare_dataset
    from iacn_torchrec.train import checkpoint as ck_module
    from iacn_torchrec.train.checkpoint import latest_step
    from iacn_torchrec.train.loop import config_fingerprint, fingerprint_differences

    planted, data = prepare_planted(tmp_path, num_users=60, seed=0)

    def cfg(path, out, max_steps, **kw):
        c = _config(path, out, max_steps, **kw)
        c.data = DataConfig(path=str(path), batch_size=64)
        return c

    out = tmp_path / "run"
    train(cfg(data, out, 4))
    copy = tmp_path / "elsewhere"
    shutil.copytree(data, copy)
    assert train(cfg(copy, out, 6))["resumed_from_step"] == 4  # same content, another path
    # settings the one-process dense path does not use (it says so) do not block its resume
    unused = cfg(copy, out, 6)
    unused.distributed.sharding_types, unused.distributed.backend = {"item_orig": "row_wise"}, "gloo"
    assert train(unused)["resumed_from_step"] == 6
    other = cfg(data, out, 8)
    other.seed, other.iacn.delta = 9, 0.5
    with pytest.raises(CheckpointError, match=r"iacn\.delta: 0\.3 → 0\.5; seed: 3 → 9"):
        train(other)
    # the same path re-prepared from the same files with another split seed: other data
    prepare_dataset("tsv", interactions=planted.interactions, items=planted.items, category_column="cate",
                    max_len=16, seed=1, out=data, overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match=r"data\.content_hash"):
        train(cfg(data, out, 8))

    # --no-resume: the old run (step 6) is moved aside; the new run's checkpoints are the ones left
    fresh = cfg(data, out, 2, checkpoint_every=1)
    fresh.resume = False
    r = train(fresh)
    assert r["resumed_from_step"] is None and r["steps"] == 2
    assert latest_step(str(out / "checkpoints")) == 2
    assert latest_step(str(out / "checkpoints.previous")) == 6
    # the old run's metrics went with its checkpoints: this run's metrics.json is its own
    assert json.loads((out / "checkpoints.previous" / "metrics.json").read_text())["steps"] == 6
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    # and its config.yaml (which this run's replaced before)
    assert yaml.safe_load((out / "checkpoints.previous" / "config.yaml").read_text())["max_steps"] == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]

    # an interrupted removal never leaves a folder that looks complete (the manifest goes first)
    victim = out / "checkpoints" / "step_00000001"
    real_rm = ck_module.path_manager.rm

    def rm_then_fail(path, *a, **k):
        real_rm(path, *a, **k)
        raise OSError("killed")

    monkeypatch.setattr(ck_module.path_manager, "rm", rm_then_fail)
    with pytest.raises(OSError, match="killed"):
        ck_module._rmtree(str(victim))
    monkeypatch.undo()
    assert victim.exists() and not (victim / "manifest.json").exists()
    assert ck_module.complete_steps(str(out / "checkpoints")) == [2]

    # checkpoints of earlier versions (nested fingerprint with the dataset's path, no hash) still resume
    c = cfg(data, out, 8)
    old = c.to_dict()
    for k in ("out", "epochs", "max_steps", "eval_every", "checkpoint_every", "log_every", "progress",
              "resume", "threads", "eval_threads"):
        old.pop(k)
    old["data"].pop("num_test_samples")
    old["data"].pop("eval_batch_size")
    old["model"].pop("iacn_worker")
    old["data"]["path"] = "/somewhere/else"
    new = config_fingerprint(c, "abc")
    assert fingerprint_differences(json.dumps(old, sort_keys=True), new) == []
    old["iacn"]["lam"] = 2.0
    assert fingerprint_differences(json.dumps(old, sort_keys=True), new) == ["iacn.lam: 2.0 → 1.0"]
    # a field added to the config since a checkpoint was written counts at its default there
    flat = json.loads(new)
    del flat["iacn.num_negatives"]
    assert fingerprint_differences(json.dumps(flat), new) == []
    c.iacn.num_negatives = 5
    assert fingerprint_differences(json.dumps(flat), config_fingerprint(c, "abc")) == [
        "iacn.num_negatives: 10 → 5"]

    # only a state that does not fit is the checkpoint's fault: other errors while loading surface
    from iacn_torchrec.distributed import setup as setup_module

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(setup_module, "load_training_state", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory") as e:
        train(cfg(data, out, 4))
    assert not isinstance(e.value, CheckpointError)


def test_resume_refuses_another_sharding_plan(tmp_path, monkeypatch):
    """The checkpoint records each table's plan (type, kernel, ranks, shard layout); a resume whose
    planner chose differently (e.g. other devices) is refused naming the table, not a shape error."""
    from helpers import prepare_planted

    from iacn_torchrec.distributed import sharding

    _, data = prepare_planted(tmp_path, num_users=60, seed=0)

    def cfg(max_steps):
        c = _config(data, tmp_path / "run", max_steps)
        c.data = DataConfig(path=str(data), batch_size=64)
        c.optim.embedding_optimizer = "rowwise_adagrad"  # fused: one process is sharded by DMP
        c.model.emb_dim = c.model.user_dim = c.iacn.aux_dim = 8
        return c

    train(cfg(2))
    saved = _final_state(tmp_path / "run")["plan"]
    assert saved and any("item_aux" in k for k in saved)
    types = ("table_wise", "row_wise", "column_wise", "data_parallel")
    assert all(v.split()[0] in types for v in saved.values())
    real = sharding.plan_summary

    def other_devices(plan):
        out = real(plan)
        key = next(k for k in out if k.endswith("item_aux"))
        out[key] = out[key].replace("ranks [0]", "ranks [1]")
        return out

    monkeypatch.setattr(sharding, "plan_summary", other_devices)
    with pytest.raises(CheckpointError,
                       match=r"sharded by another plan \(.*item_aux.*ranks \[0\].*ranks \[1\]"):
        train(cfg(4))
    monkeypatch.undo()
    assert train(cfg(4))["resumed_from_step"] == 2


def test_a_plan_that_does_not_fit_is_a_user_error(tmp_path, monkeypatch):
    """TorchRec's PlannerError becomes one message naming the tables (every rank gets it)."""
    from helpers import prepare_planted
    from torchrec.distributed.planner import Topology

    from iacn_torchrec.distributed import sharding
    from iacn_torchrec.errors import UserError

    _, data = prepare_planted(tmp_path, num_users=60, seed=0)
    c = _config(data, tmp_path / "run", 2)
    c.data = DataConfig(path=str(data), batch_size=64)
    c.optim.embedding_optimizer = "rowwise_adagrad"  # fused: planned and sharded even in one process
    c.model.emb_dim = c.model.user_dim = c.iacn.aux_dim = 8
    monkeypatch.setattr(sharding, "topology", lambda world_size, device: Topology(
        world_size=world_size, compute_device="cpu", ddr_cap=4096))  # 4 KiB of memory per rank
    with pytest.raises(UserError, match=r"no sharding plan for the tables on 1 cpu rank\(s\) \(tables, "
                                        r"largest first: .*item_orig"):
        train(c)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_epoch_checkpoints_and_a_signal_stop_after_the_step(tmp_path):
    """By default a run checkpoints at the end of every epoch; in one process SIGINT finishes the
    step in progress, checkpoints and stops, and the same command resumes from there."""
    import os
    import signal
    import threading

    from helpers import prepare_planted

    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.errors import TrainingInterrupted
    from iacn_torchrec.train.checkpoint import latest_step
    from iacn_torchrec.train.loop import _StopOnSignal

    _, data = prepare_planted(tmp_path, num_users=60, seed=0)
    per_epoch = -(-PreparedDataset.open(data).meta["counts"]["train_samples"] // 64)

    def cfg(out, epochs):
        c = _config(data, out, None)
        c.data = DataConfig(path=str(data), batch_size=64)
        c.epochs = epochs
        return c

    train(cfg(tmp_path / "ep", 3))
    steps = sorted(int(p.name[5:]) for p in (tmp_path / "ep" / "checkpoints").iterdir())
    assert steps == [2 * per_epoch, 3 * per_epoch]  # epoch ends (the first pruned: two are kept)

    # the suite may run as a background job, whose SIGINT the shell set to ignored (and the loop
    # then leaves ignored, as checked below): this part needs Python's own handler
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(TrainingInterrupted, match=r"SIGINT at step \d+: checkpoint saved"):
            train(cfg(tmp_path / "sig", 10_000))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, launched_with)
    # a signal the process ignores on purpose (a background job's SIGINT) stays ignored
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ignoring = _StopOnSignal()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.SIGINT not in ignoring._previous
        ignoring.restore()
    finally:
        signal.signal(signal.SIGINT, previous)
    stopped = latest_step(str(tmp_path / "sig" / "checkpoints"))
    assert stopped and stopped > 0
    c = cfg(tmp_path / "sig", 10_000)
    c.max_steps = stopped + 3
    assert train(c)["resumed_from_step"] == stopped


def test_a_signal_on_an_evaluation_step_leaves_that_evaluation_to_the_resumed_run(tmp_path, monkeypatch):
    """A stop signal skips the periodic evaluation of the step it ends (stopping fast); the resumed
    run evaluates that step first, so its history is the uninterrupted run's, figure for figure."""
    import os
    import signal

    from helpers import prepare_planted

    from iacn_torchrec.errors import TrainingInterrupted
    from iacn_torchrec.train import loop

    _, data = prepare_planted(tmp_path, num_users=60, seed=0)

    def cfg(out, steps):
        c = _config(data, out, steps, eval_every=1)
        c.data = DataConfig(path=str(data), batch_size=16)
        return c

    straight = train(cfg(tmp_path / "straight", 6))
    real_evaluate, calls = loop.evaluate, []

    def evaluate_then_signal(*args, **kwargs):  # SIGINT during step 3's evaluation: step 4 stops
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_signal)
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted, match=r"SIGINT at step 4: checkpoint saved"):
            train(cfg(tmp_path / "stopped", 6))
    finally:
        signal.signal(signal.SIGINT, launched_with)
    assert [h["step"] for h in _final_state(tmp_path / "stopped")["history"]] == [1, 2, 3]
    assert _final_state(tmp_path / "stopped")["train_state"]["eval_pending"] is True
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    resumed = train(cfg(tmp_path / "stopped", 6))
    assert resumed["resumed_from_step"] == 4
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4, 5, 6]
    assert resumed["history"] == straight["history"]
    assert resumed["test"] == straight["test"]


def test_a_damaged_newest_checkpoint_names_the_way_back_to_the_one_before(tmp_path):
    """Resume refuses a damaged newest checkpoint (naming the file) and says how to resume from the
    intact one before it; removing the damaged one does that."""
    import shutil

    from helpers import prepare_planted

    _, data = prepare_planted(tmp_path, num_users=60, seed=0)
    out = tmp_path / "run"
    c = _config(data, out, 4, checkpoint_every=2)
    c.data = DataConfig(path=str(data), batch_size=64)
    train(c)
    newest = out / "checkpoints" / "step_00000004"
    (newest / "rank0.pt").write_bytes((newest / "rank0.pt").read_bytes()[:1000])
    c.max_steps = 6
    with pytest.raises(CheckpointError, match=r"rank0\.pt: truncated .*step 2\) may be intact: remove "
                                              r".*step_00000004 to resume from there"):
        train(c)
    shutil.rmtree(newest)
    assert train(c)["resumed_from_step"] == 2
    # a damaged checkpoint that is the run's only one: the way out is starting over
    *older, only = sorted((out / "checkpoints").glob("step_*"))
    for d in older:
        shutil.rmtree(d)
    (only / "rank0.pt").write_bytes((only / "rank0.pt").read_bytes()[:1000])
    c.max_steps = 8
    only_one = r"rank0\.pt: truncated .*it is the run's only checkpoint: start over with --no-resume"
    with pytest.raises(CheckpointError, match=only_one):
        train(c)
    c.resume = False
    assert train(c)["resumed_from_step"] is None



def test_a_kernel_build_is_not_counted_as_training_time(tmp_path, monkeypatch):
    """Kernels load before the clock starts: a first use that has to build one (~30 s each when
    `make install` did not) leaves the run's train_time_s and samples/s alone. Here every load
    takes 1.5 s more than it does; 4 steps on a tiny dataset train in well under that."""
    import time

    import torch.utils.cpp_extension as cpp_extension
    from helpers import prepare_planted

    from iacn_torchrec import kernels

    if not kernels.kernels_enabled():
        pytest.skip("IACN_FUSED_KERNEL=0: no kernel loads")
    _, data = prepare_planted(tmp_path, num_users=60, seed=0)
    real_load = cpp_extension.load

    def slow_load(*args, **kwargs):
        time.sleep(1.5)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(kernels, "_STATE", {})  # as in a fresh process: every kernel loads again
    monkeypatch.setattr(cpp_extension, "load", slow_load)
    c = _config(data, tmp_path / "run", 4)
    c.data = DataConfig(path=str(data), batch_size=16)
    c.threads = 2
    result = train(c)
    assert result["steps"] == 4 and result["train_time_s"] < 1.5, result["train_time_s"]
    # DIN+IaCN's kernels, loaded (and built) before the first step; DIEN's are not built for it
    assert set(kernels._STATE) == {"concat_lookup", "din_attention", "dice", "iacn_fused"}
    assert all(s.get("module") is not None for s in kernels._STATE.values())


@pytest.mark.parametrize("iacn", [True, False], ids=["iacn", "plain"])
@pytest.mark.parametrize("model, main", [
    ("din", {}), ("dien", {}), ("wide_deep", {}), ("dlrm", {}),
    ("din", {"tower_activation": "prelu"}),  # no Dice left: no Dice kernel
    ("wide_deep", {"deep_activation": "dice"}),  # Dice where the reference has PReLU
], ids=["din", "dien", "wide_deep", "dlrm", "din-prelu", "wide_deep-dice"])
def test_the_kernels_loaded_before_the_clock_are_the_ones_the_run_calls(tmp_path, monkeypatch, model, main,
                                                                         iacn):
    """``loop.kernels_used`` is a hand-kept list of the C++ kernels each model's steps call. Here a
    run that preloads nothing loads what its steps (and evaluation) really call, which must be that
    list: a kernel missing from it would be built inside the first timed step, one too many would
    cost a build the run never uses."""
    from helpers import prepare_planted

    from iacn_torchrec import kernels
    from iacn_torchrec.train import loop

    if not kernels.kernels_enabled():
        pytest.skip("IACN_FUSED_KERNEL=0: no kernel loads")
    _, data = prepare_planted(tmp_path, num_users=40, seed=0)
    listed = []

    def nothing_preloaded(config, setup):
        listed.append(loop_kernels_used(config, setup))
        return []

    loop_kernels_used = loop.kernels_used
    monkeypatch.setattr(loop, "kernels_used", nothing_preloaded)
    monkeypatch.setattr(kernels, "_STATE", {})  # as in a fresh process: every kernel loads again
    c = _config(data, tmp_path / "run", 2)
    c.data = DataConfig(path=str(data), batch_size=16)
    c.model = ModelConfig(name=model, main=main)
    c.iacn = IaCNConfig(enabled=iacn, delta=0.3, lam=1.0)
    assert train(c)["steps"] == 2
    assert [sorted(k) for k in listed] == [sorted(kernels._STATE)]

