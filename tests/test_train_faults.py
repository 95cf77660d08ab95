"""Training under faults: a second run on the same folder, a stop signal during the final
checkpoint, a diverged last update, a failing main backward beside the IaCN worker, leftovers of
crashed writers, an interrupted export swap (a failure-injection review's findings)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from helpers import prepare_planted

from iacn_torchrec.errors import TrainingInterrupted, UserError
from iacn_torchrec.fileio import release_lock, try_lock
from iacn_torchrec.train import loop
from iacn_torchrec.train.checkpoint import complete_steps, latest_step
from iacn_torchrec.train.config import DataConfig, IaCNConfig, ModelConfig, TrainConfig
from iacn_torchrec.train.loop import RUN_LOCK, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_planted(tmp_path_factory.mktemp("faults"), num_users=60, seed=0)[1]


def _config(data, out, max_steps, **kw) -> TrainConfig:
    return TrainConfig(data=DataConfig(path=str(data), batch_size=32), model=ModelConfig(name="din"),
                       iacn=IaCNConfig(enabled=True, delta=0.3, lam=1.0), out=str(out), max_steps=max_steps,
                       seed=3, progress=False, **kw)


def test_a_run_directory_in_use_is_refused_and_left_as_it_was(data, tmp_path):
    out = tmp_path / "run"
    train(_config(data, out, 3))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    fd = try_lock(out / RUN_LOCK)  # another process training it (a second descriptor conflicts as one)
    try:
        for resume in (True, False):  # --no-resume would have moved its checkpoints aside
            busy = rf"another `iacn train` \(pid {os.getpid()}\) is training this run"
            with pytest.raises(UserError, match=busy):
                train(_config(data, out, 6, resume=resume))
            assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
            assert not (out / "checkpoints.previous").exists()
    finally:
        release_lock(out / RUN_LOCK, fd)
    assert train(_config(data, out, 6))["resumed_from_step"] == 3  # free again
    assert not (out / RUN_LOCK).exists()  # released and removed after the run


def test_leftovers_of_crashed_writers_are_removed_by_the_next_run(data, tmp_path):
    out = tmp_path / "run"
    train(_config(data, out, 2))
    junk = [out / ".metrics.json.tmp-123-abcd", out / ".config.yaml.tmp-9-ffff"]
    for p in junk:
        p.write_text("half")
    (out / "checkpoints" / "step_00000009.tmp").mkdir()  # a save cut short
    (out / "checkpoints" / "step_00000009.tmp" / "model.pt").write_bytes(b"x" * 100)
    train(_config(data, out, 3))
    assert not any(p.exists() for p in junk)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]


def test_a_stop_signal_during_the_final_checkpoint_lets_it_finish(data, tmp_path, monkeypatch):
    """SIGTERM while the run's last checkpoint is written: the checkpoint completes, the run stops
    as a signal stops it, and the same command then only evaluates: as the uninterrupted run."""
    straight = train(_config(data, tmp_path / "straight", 5))
    real_save, sent = loop.save_checkpoint, []

    def save_under_a_signal(root, step, *args, **kwargs):
        if step == 5 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler while the save goes on
        return real_save(root, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save_under_a_signal)
    launched_with = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM at step 5: checkpoint saved"):
        train(_config(data, out, 5))
    assert signal.getsignal(signal.SIGTERM) == launched_with  # handlers restored
    assert complete_steps(str(out / "checkpoints"))[-1] == 5 and not (out / "metrics.json").exists()
    again = train(_config(data, out, 5))
    assert again["resumed_from_step"] == 5 and again["test"] == straight["test"]


def test_a_diverged_last_update_writes_no_checkpoint(data, tmp_path, monkeypatch):
    """The loss is checked before each update; the update after the last check is checked before a
    checkpoint is written, so that no run resumes (or exports) a diverged model."""
    real_step = torch.optim.Adam.step

    def step_then_diverge(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][-1].fill_(float("nan"))
        return out

    c = _config(data, tmp_path / "run", 4, checkpoint_every=2)
    train(c)  # steps 2 and 4 saved
    monkeypatch.setattr(torch.optim.Adam, "step", step_then_diverge)
    c.max_steps = 5
    with pytest.raises(FloatingPointError, match=r"parameters became non-finite at step 5 "):
        train(c)  # step 5's loss is finite (before its update); the run's last checkpoint is refused
    assert latest_step(str(tmp_path / "run" / "checkpoints")) == 4


def test_a_failing_main_backward_waits_for_its_iacn_worker(data, tmp_path, monkeypatch):
    """The IaCN worker runs beside the main backward; when that backward fails, the step waits for
    the worker before the error leaves it (the worker draws from the global RNG: a next run in the
    same process, seeded, must not share it with the previous step's IaCN)."""
    from iacn_torchrec.distributed.setup import build_training
    from iacn_torchrec.modules.iacn import IaCNTask

    c = _config(data, tmp_path / "run", 1)
    ds = loop.PreparedDataset.open(data)
    train_loader, _, q = loop.make_loaders(c, ds, 0, 1)
    setup = build_training(c, ds, item_log_q=q)
    assert setup.model.iacn_on_worker
    real_forward, finished = IaCNTask.forward, []

    def slow_forward(self, *args, **kwargs):
        time.sleep(0.5)
        out = real_forward(self, *args, **kwargs)
        finished.append(threading.current_thread().name)
        return out

    monkeypatch.setattr(IaCNTask, "forward", slow_forward)

    def fail(grad):
        raise RuntimeError("main backward failed")

    next(iter(setup.model.main_model.parameters())).register_hook(fail)
    with pytest.raises(RuntimeError, match="main backward failed"):
        next(setup.train_steps(train_loader))
    assert finished and finished[0].startswith("iacn")  # the worker's IaCN had ended by then


def test_an_interrupted_export_swap_names_where_the_old_model_went(tmp_path):
    from iacn_torchrec.serving.artifact import ServingArtifact

    aside = tmp_path / ".model.old-1-abcd"
    aside.mkdir()
    with pytest.raises(FileNotFoundError, match=r"interrupted `iacn export --force` left the model it was "
                                                r"replacing in .*\.model\.old-1-abcd"):
        ServingArtifact.load(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="not an exported model"):
        ServingArtifact.load(tmp_path / "other")


def test_metrics_record_the_kernels_and_every_invocation_that_trained(data, tmp_path):
    """A resume may change what is not fingerprinted (threads, where IaCN runs, the kernels, the
    code): metrics.json and the checkpoints list every invocation's, and the kernels' paths (a
    kernel that failed to build falls back to ATen ops: the same function up to rounding)."""
    import json

    from iacn_torchrec.kernels import kernels_enabled

    out = tmp_path / "run"
    train(_config(data, out, 3))
    c = _config(data, out, 5)
    c.model.iacn_worker = False
    c.threads = 1
    m = train(c)
    assert json.loads((out / "metrics.json").read_text())["segments"] == json.loads(json.dumps(m["segments"]))
    first, second = m["segments"]
    assert (first["from_step"], first["to_step"], second["from_step"], second["to_step"]) == (0, 3, 3, 5)
    assert first["iacn_worker"] and not second["iacn_worker"] and second["threads"] == 1
    assert set(m["kernels"]) == set(loop.kernels_used(c, type("S", (), {"device": torch.device("cpu"),
                                                                        "sharded": False})()))
    assert set(m["kernels"].values()) == ({"cpp"} if kernels_enabled() else {"aten"})
    assert first["kernels"] == m["kernels"] and first["versions"] == m["versions"]
