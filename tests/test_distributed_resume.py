"""Resuming a 2-rank sharded run is exact.

* fast: two gloo ranks run ``train()`` uninterrupted, then again interrupted twice (mid-epoch,
  while the pipeline has read ahead, and at an epoch boundary) and resumed; the final sharded
  tables, fused (row-wise Adagrad) and Adam optimizer states, RNG-dependent results (IaCN's
  random routing) and test metrics are identical.
* slow (TorchX): ``torchx run -s local_cwd apps/components.py:train --nproc_per_node 2``, one
  rank SIGKILLs itself right after a checkpoint, the relaunch resumes and ends like an
  uninterrupted launch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iacn_torchrec.distributed.testing import spawn, write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
# TorchX rejects a flag given twice (even after --), so settings that need --set / --sharding
# go in a YAML file
YAML = """\
model: {user_dim: 8}
distributed:
  sharding_types: {item_aux: row_wise, item_orig: column_wise}
"""
ARGS = ["--model", "din", "--iacn", "--embedding-optimizer", "sgd", "--aux-embedding-optimizer",
        "rowwise_adagrad", "--emb-dim", "8", "--aux-dim", "8", "--batch-size", "8", "--epochs", "2",
        "--threads", "1", "--no-progress"]


def _args(data: str, out: str) -> list[str]:
    yaml_path = Path(data).parent / "dist.yaml"
    if not yaml_path.exists():
        # atomic: both spawned ranks get here, and one must never read the other's half-written file
        tmp = yaml_path.with_name(f"dist.yaml.{os.getpid()}")
        tmp.write_text(YAML)
        os.replace(tmp, yaml_path)
    return ARGS + ["--config", str(yaml_path), "--data", data, "--out", out]


def _config(data: str, out: str, max_steps: int | None = None):
    import argparse

    from iacn_torchrec.train.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    extra = ["--max-steps", str(max_steps)] if max_steps else []
    return config_from_args(p.parse_args(_args(data, out) + extra))


def worker(rank: int, world_size: int, data: str, full: str, resumed: str) -> None:
    from iacn_torchrec.train.loop import train

    assert train(_config(data, full), rank, world_size)["resumed_from_step"] is None
    # stop at 3 (mid-epoch, the pipeline has read ahead), at 4 (the end of epoch 0), then run to the end
    started = [train(_config(data, resumed, stop), rank, world_size)["resumed_from_step"]
               for stop in (3, 4, None)]
    assert started == [None, 3, 4], started


def _final_states(run: Path) -> list[dict]:
    from iacn_torchrec.train.checkpoint import latest_step, load_checkpoint

    root = str(run / "checkpoints")
    step = latest_step(root)
    return [load_checkpoint(root, step, rank=r, world_size=2) for r in range(2)]


def _assert_same(a, b, where: str = "") -> None:
    from iacn_torchrec.distributed.checkpointing import PortableShards

    if isinstance(a, PortableShards):
        assert isinstance(b, PortableShards) and len(a.shards) == len(b.shards), where
        for (ma, ta), (mb, tb) in zip(a.shards, b.shards, strict=True):
            assert ma.shard_offsets == mb.shard_offsets and torch.equal(ta, tb), where
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def _compare_runs(full: Path, resumed: Path) -> None:
    mf, mr = (json.loads((d / "metrics.json").read_text()) for d in (full, resumed))
    assert mf["steps"] == mr["steps"] == 8
    # every rank's samples of both epochs (a partial last batch: test_rank_slicing_covers_epoch_once)
    n_train = mf["dataset"]["counts"]["train_samples"]
    assert mf["train_samples"] == mr["train_samples"] == 2 * n_train
    assert mf["test"] == mr["test"]  # AUC, logloss, GAUC: bit-identical
    for rank, (a, b) in enumerate(zip(_final_states(full), _final_states(resumed), strict=True)):
        assert a["train_state"]["step"] == b["train_state"]["step"] == 8
        _assert_same(a["model"], b["model"], f"rank{rank}.model")
        _assert_same(a["optimizer"], b["optimizer"], f"rank{rank}.optimizer")
        # the fused row-wise Adagrad state is really in the checkpoint (not an empty dict)
        assert any("momentum1" in k for s in a["optimizer"]["state"].values() for k in s), rank
    # the ranks' BatchNorm / Dice running statistics are averaged after every step: equal on both
    # ranks, and the checkpoint (rank 0's dense state) evaluates as training did
    r0, r1 = (s["model"] for s in _final_states(full))
    stats = [k for k in r0 if k.endswith(("running_mean", "running_var"))]
    assert len(stats) >= 3 and all(torch.equal(r0[k], r1[k]) for k in stats)
    from iacn_torchrec.train.evaluate import evaluate_run

    again = evaluate_run(full)
    assert mf["running_statistics_averaged"] is True and again["recorded"] == {
        k: mf["test"][k] for k in ("auc", "gauc", "logloss")}
    for k in ("auc", "gauc", "logloss"):
        assert again[k] == pytest.approx(mf["test"][k], abs=1e-9), k


def test_resume_two_ranks_is_exact(tmp_path):
    data = str(write_tiny_dataset(tmp_path / "tiny"))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    spawn(worker, 2, data, str(full), str(resumed))
    _compare_runs(full, resumed)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchx", path=str(Path(sys.executable).parent)) is None,
                    reason="torchx not installed next to this python")
def test_torchx_sigkill_one_rank_then_resume(tmp_path):
    data = str(write_tiny_dataset(tmp_path / "tiny"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")

    def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = ["torchx", "run", "-s", "local_cwd", str(REPO / "apps" / "components.py") + ":train",
               "--nproc_per_node", "2", *extra, "--", *_args(data, str(out)),
               "--checkpoint-every", "3"]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    r = launch(full)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = launch(resumed, "--env", "IACN_KILL_AFTER_CHECKPOINT=3:1")
    assert r.returncode != 0, "the run should have failed: rank 1 was killed"
    assert "SIGKILL" in r.stdout + r.stderr
    ckpts = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert ckpts == ["step_00000003"], ckpts
    assert not (resumed / "metrics.json").exists()
    r = launch(resumed)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((resumed / "metrics.json").read_text())["resumed_from_step"] == 3
    _compare_runs(full, resumed)


def _periodic_worker(rank: int, world_size: int, data: str, out: str) -> None:
    from iacn_torchrec.train.loop import train

    config = _config(data, out, max_steps=5)
    config.eval_every = 2
    config.data.eval_batch_size = 8  # 33 test samples: a last global batch of one joins the one before
    config.data.num_test_samples = 33
    train(config, rank, world_size)


def test_two_ranks_evaluate_every_n_steps_and_a_short_last_batch(tmp_path):
    """With several ranks an evaluation between pipelined steps broke the pipeline's in-flight input
    distribution (gloo: mismatched all-to-alls), and a rank with an empty last evaluation batch broke
    the sharded forward. Both train; the history has each periodic evaluation, and the final one is
    what the checkpoint scores in one process."""
    from iacn_torchrec.train.evaluate import evaluate_run

    data = str(write_tiny_dataset(tmp_path / "tiny"))
    out = tmp_path / "run"
    spawn(_periodic_worker, 2, data, str(out))
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 5 and [h["step"] for h in m["history"]] == [2, 4]
    assert m["test"]["samples"] == 33
    again = evaluate_run(out)
    for k in ("auc", "gauc", "logloss"):
        assert again[k] == pytest.approx(m["test"][k], abs=1e-9), k
