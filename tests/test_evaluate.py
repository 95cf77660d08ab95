"""`iacn evaluate`: a run's checkpoint scored again gives what training recorded; an older step,
the train split and a subset are scored as asked; bad requests are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import prepare_planted

from iacn_torchrec.cli import main
from iacn_torchrec.serving.export import load_run
from iacn_torchrec.train.config import TrainConfig
from iacn_torchrec.train.loop import train
from iacn_torchrec.train.metrics import CTRMetrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    _, data = prepare_planted(root, num_users=120, seed=2)
    out = root / "run"
    train(TrainConfig.from_dict({
        "data": {"path": str(data), "batch_size": 32, "eval_batch_size": 50},
        "model": {"name": "dien", "emb_dim": 8, "user_dim": 8},
        "iacn": {"enabled": True},
        "max_steps": 8, "checkpoint_every": 4, "out": str(out), "progress": False, "threads": 1, "seed": 1,
    }))
    return out


def _evaluate(capsys, *argv: str) -> dict:
    assert main(["evaluate", "--json", "--threads", "1", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_final_checkpoint_scores_what_training_recorded(run_dir, capsys):
    recorded = json.loads((run_dir / "metrics.json").read_text())["test"]
    res = _evaluate(capsys, "--run", str(run_dir))
    assert (res["step"], res["split"], res["samples"]) == (8, "test", recorded["samples"])
    for k in ("auc", "gauc", "logloss"):
        assert res[k] == pytest.approx(recorded[k], abs=1e-12) and res["recorded"][k] == recorded[k]
    assert main(["evaluate", "--run", str(run_dir), "--threads", "2"]) == 0  # the plain-text report
    out = capsys.readouterr().out
    assert f"step 8, test split ({recorded['samples']:,} samples): AUC {recorded['auc']:.4f}" in out
    assert "metrics.json (end of training)" in out


def _by_hand(run_dir, step: int, split: str, limit: int | None) -> dict[str, float]:
    """The step's model scored sample by sample in 7-row batches (another batching than the command's)."""
    from iacn_torchrec.data.loader import BatchLoader

    r = load_run(run_dir, step=step)
    loader = BatchLoader(r.ds, split, batch_size=7, placeholder_features=True, with_neg_hist=True,
                         iacn_negatives=r.test_loader.iacn_negatives, limit=limit)
    m = CTRMetrics()
    with torch.no_grad():
        for b in loader:
            m.update(r.model.predict(b), b.labels, b.sparse_features["uid"].values())
    return m.compute()


@pytest.mark.parametrize("argv, step, split, limit", [
    (["--step", "4"], 4, "test", None),
    (["--split", "train", "--limit", "100"], 8, "train", 100),
])
def test_an_older_step_or_another_split_is_scored_as_asked(run_dir, capsys, argv, step, split, limit):
    res = _evaluate(capsys, "--run", str(run_dir), *argv)
    assert (res["step"], res["split"], res["recorded"]) == (step, split, None)
    want = _by_hand(run_dir, step, split, limit)
    assert res["samples"] == (limit or len(load_run(run_dir).ds.split(split)))
    np.testing.assert_allclose([res[k] for k in ("auc", "gauc", "logloss")],
                               [want[k] for k in ("auc", "gauc", "logloss")], rtol=0, atol=1e-6)
    final = _evaluate(capsys, "--run", str(run_dir), "--split", split, *(["--limit", "100"] if limit else []))
    assert final["auc"] != res["auc"] or step == 8  # another checkpoint, other scores


@pytest.mark.parametrize("argv, message", [
    (["--step", "5"], r"no complete checkpoint of step 5; the run has \[4, 8\]"),
    (["--limit", "0"], r"--limit must be >= 1, got 0"),
    (["--threads", "0"], r"--threads must be >= 1, got 0"),
])
def test_bad_requests_are_one_line_errors(run_dir, capsys, argv, message):
    import re

    assert main(["evaluate", "--run", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("iacn evaluate: ") and err.count("\n") == 1 and re.search(message, err), err


def test_json_is_strict_and_a_sharded_run_claims_no_recorded_match(run_dir, tmp_path, capsys):
    """An AUC over samples of one label is NaN: ``--json`` writes null (strict JSON). A run trained
    on several ranks before their BatchNorm / Dice statistics were averaged kept a set per rank, so
    its checkpoint's scores are not the recorded evaluation: no ``recorded`` figures beside them."""
    import shutil

    assert main(["evaluate", "--json", "--threads", "1", "--run", str(run_dir), "--limit", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1],
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert res["samples"] == 1 and res["auc"] is None
    copy = tmp_path / "two-ranks"
    shutil.copytree(run_dir, copy)
    m = json.loads((copy / "metrics.json").read_text())
    m["world_size"] = 2
    del m["running_statistics_averaged"]
    (copy / "metrics.json").write_text(json.dumps(m))
    assert _evaluate(capsys, "--run", str(copy))["recorded"] is None


def test_recorded_figures_are_shown_only_when_comparable_and_readable(run_dir, tmp_path, capsys):
    """metrics.json's figures are shown beside the checkpoint's only for the same test samples (an
    edited ``data.num_test_samples`` makes another evaluation); damaged or undefined ones are null,
    not a traceback; training writes an undefined figure (an AUC over one label) as null."""
    import shutil

    import yaml

    copy = tmp_path / "edited"
    shutil.copytree(run_dir, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["data"]["num_test_samples"] = 40
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = _evaluate(capsys, "--run", str(copy))
    assert res["samples"] == 40 and res["recorded"] is None
    for test in ({}, {"auc": None, "gauc": "x", "logloss": [1], "samples": 0}):
        damaged = tmp_path / f"damaged{len(test)}"
        shutil.copytree(run_dir, damaged)
        m = json.loads((damaged / "metrics.json").read_text())
        m["test"] = {**test, "samples": m["test"]["samples"]}
        (damaged / "metrics.json").write_text(json.dumps(m))
        assert main(["evaluate", "--threads", "1", "--run", str(damaged)]) == 0
        assert "metrics.json (end of training): AUC n/a  GAUC n/a  logloss n/a" in capsys.readouterr().out
    _, data = prepare_planted(tmp_path / "one", num_users=40, seed=0)
    out = tmp_path / "one-label"
    train(TrainConfig.from_dict({"data": {"path": str(data), "batch_size": 16, "num_test_samples": 1},
                                 "max_steps": 1, "out": str(out), "progress": False, "threads": 1}))
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["test"]["auc"] is None
