"""`iacn reproduce` end to end on a tiny synthetic dataset: tables and plots are written, paired
statistics are right, Table 2 re-prepares other lengths, and a second call skips finished runs."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from iacn_torchrec.experiments import reproduce as rp


def _write_tiny_tsv(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """40 users, 60 items in 6 categories; each user mostly buys from one category."""
    rng = np.random.default_rng(seed)
    inter, items = root / "interactions.tsv.gz", root / "items.tsv.gz"
    with gzip.open(items, "wt") as f:
        f.write("item_id\tcate_leaf\n")
        for i in range(1, 61):
            f.write(f"{i}\t{(i - 1) // 10 + 1}\n")
    with gzip.open(inter, "wt") as f:
        f.write("user_id\titem_id\ttimestamp\n")
        for u in range(1, 41):
            c = rng.integers(0, 6)
            n = int(rng.integers(4, 14))
            for k in range(n):
                item = c * 10 + 1 + rng.integers(0, 10) if rng.random() < 0.8 else rng.integers(1, 61)
                f.write(f"{u}\t{item}\t{1000 + k}\n")
    return inter, items


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from iacn_torchrec.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("tiny")
    inter, items = _write_tiny_tsv(root)
    return prepare_dataset("tsv", interactions=inter, items=items, protocol="din", max_len=8, seed=0,
                           out=root / "tiny-din-L8-s0", progress=False)


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    rp.add_arguments(p)
    args = p.parse_args(argv)
    args.command_line = "iacn reproduce " + " ".join(argv)
    return args


def test_pipeline_writes_tables_and_plots_and_resumes(tiny, tmp_path, capsys):
    out, res = tmp_path / "runs", tmp_path / "results"
    argv = ["--data", str(tiny), "--seeds", "2", "--max-steps", "3", "--batch-size", "16",
            "--lengths", "4,8", "--deltas", "0.3,0.6,1.0", "--models", "din,wide_deep",
            "--variant", "lam0.5:iacn.lam=0.5", "--threads", "1",
            "--out", str(out), "--results", str(res)]
    assert rp.run(_args(argv)) == 0
    printed = capsys.readouterr().out
    # table 1: 2 models x 3 arms x 2 seeds = 12; table 2: dien x 3 arms x lengths {4, 8} x 2 = 12, of
    # which L8 base/iacn/control are new; delta: dien base + δ 0.6 (0.3 and 1.0 are table 1's arms) ...
    run_dirs = sorted(p.name for p in out.iterdir())
    assert "din-L8-base-s0" in run_dirs and "wide_deep-L8-iacn-d1-l0-s1" in run_dirs
    assert "dien-L4-iacn-d0.3-l1-s1" in run_dirs and "dien-L8-iacn-d0.6-l1-s0" in run_dirs
    assert "dien-L8-var-lam0.5-s1" in run_dirs
    # shared runs are trained once: δ = 0.3 at L8 serves table 2, the sweep and (for DIEN) nothing else
    assert sum(1 for d in run_dirs if d.startswith("dien-L8-iacn-d0.3-l1")) == 2
    n_runs = len(run_dirs)
    assert f"{n_runs} to train" in printed
    for d in run_dirs:  # every run finished, checkpoints removed, wall time recorded
        assert (out / d / "metrics.json").exists() and not (out / d / "checkpoints").exists()
        assert json.loads((out / d / "reproduce_run.json").read_text())["wall_s"] > 0
    # the Table 2 length 4 dataset was re-prepared from the raw source, beside the original
    l4 = tiny.parent / "tiny-din-L4-s0"
    assert json.loads((l4 / "meta.json").read_text())["max_len"] == 4
    m = json.loads((out / "dien-L4-base-s0" / "metrics.json").read_text())
    assert m["config"]["data"]["path"] == str(l4) and m["steps"] == 3

    for name in ("table1.md", "table2.md", "delta.md", "variants.md",
                 "table1_auc.png", "table2_length.png", "delta_sweep.png"):
        assert (res / name).stat().st_size > 0, name
    for png in ("table1_auc.png", "table2_length.png", "delta_sweep.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t1 = (res / "table1.md").read_text()
    assert "iacn reproduce --data" in t1 and "| DIN |" in t1 and "| Wide&Deep |" in t1
    assert '"torchrec"' in t1 and "Wall time" in t1 and "(n=2)" in t1
    assert "aux dim 18 per table, the paper's setting)" in t1
    other = tmp_path / "aux6"  # the header names the aux dim the runs have (--set), not the paper's
    assert rp.run(_args([*argv[:-2], "--results", str(other), "--only", "table1", "--no-train",
                         "--set", "iacn.aux_dim=6"])) == 0
    assert "aux dim 6 per table)" in (other / "table1.md").read_text()

    # the table's numbers are the runs' own AUCs, paired by seed
    def strict(text: str):  # JSON without NaN/Infinity tokens, as any parser reads it
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))

    for part in ("table1", "table2", "delta", "variants"):
        doc = strict((res / f"{part}.json").read_text())
        assert "torchrec" in doc["versions"] and all("config" in r for r in doc["runs"].values())
    def run_aucs(model: str, length: int, arm: str) -> dict[int, float]:
        return {seed: json.loads((out / f"{model}-L{length}-{arm}-s{seed}" / "metrics.json").read_text())
                ["test"]["auc"] for seed in (0, 1)}

    def check(cell: dict, model: str, length: int, arm: str) -> dict[int, float]:
        aucs = {int(k): v for k, v in cell.items()}
        assert aucs == run_aucs(model, length, arm), (model, length, arm)
        return aucs

    def check_lift(lift: dict, a: dict[int, float], b: dict[int, float]) -> None:
        diffs = [a[k] - b[k] for k in (0, 1)]  # paired by seed: a's seed 0 against b's seed 0
        assert any(diffs)  # the arms differ, so a lift taken the wrong way round would show
        assert lift["n"] == 2 and lift["mean"] == pytest.approx(np.mean(diffs))
        assert lift["sd"] == pytest.approx(np.std(diffs, ddof=1))

    summary = {part: json.loads((res / f"{part}.json").read_text())["summary"]
               for part in ("table1", "table2", "delta", "variants")}
    for model in ("din", "wide_deep"):
        s = summary["table1"][model]
        base, iacn, control = (check(s["auc"][arm.key], model, 8, arm.key)
                               for arm in (rp.BASE, rp.IACN, rp.CONTROL))
        check_lift(s["lift"], iacn, base)
        check_lift(s["lift_vs_control"], iacn, control)
    for length in (4, 8):  # table 2: DIEN by history length, against the model alone and the control
        s = summary["table2"][str(length)]
        iacn = check(s["iacn"], "dien", length, rp.IACN.key)
        check_lift(s["lift"], iacn, check(s["base"], "dien", length, rp.BASE.key))
        check_lift(s["lift_vs_control"], iacn, check(s["control"], "dien", length, rp.CONTROL.key))
    dien_alone = run_aucs("dien", 8, rp.BASE.key)
    assert sorted(float(d) for d in summary["delta"]) == [0.3, 0.6, 1.0]
    for d, s in summary["delta"].items():  # δ = 1 is the λ = 0 control run
        check_lift(s["lift"], check(s["iacn"], "dien", 8, rp.delta_arm(float(d)).key), dien_alone)
    assert set(summary["variants"]) == {f"dien/{k}" for k in (rp.IACN.key, rp.CONTROL.key, "var-lam0.5")}
    for key, s in summary["variants"].items():
        model, arm = key.split("/")
        check_lift(s["lift"], check(s["iacn"], model, 8, arm), check(s["base"], model, 8, rp.BASE.key))

    # second call: everything is skipped and the tables are rewritten identically (no training)
    before = {d: (out / d / "metrics.json").stat().st_mtime_ns for d in run_dirs}
    assert rp.run(_args(argv)) == 0
    assert f"{n_runs} already finished, 0 to train" in capsys.readouterr().out
    assert {d: (out / d / "metrics.json").stat().st_mtime_ns for d in run_dirs} == before
    assert (res / "table1.md").read_text() == t1


def test_resume_retrains_only_missing_or_changed_runs(tiny, tmp_path, capsys):
    out, res = tmp_path / "runs", tmp_path / "results"
    argv = ["--data", str(tiny), "--seeds", "2", "--max-steps", "2", "--batch-size", "16", "--only", "table1",
            "--models", "din", "--threads", "1", "--out", str(out), "--results", str(res)]
    assert rp.run(_args(argv)) == 0
    assert "6 to train" in capsys.readouterr().out
    # an interrupted run (no metrics.json) and a run of another configuration are redone, the rest kept
    (out / "din-L8-base-s1" / "metrics.json").unlink()
    stale = out / "din-L8-iacn-d0.3-l1-s0" / "metrics.json"
    m = json.loads(stale.read_text())
    m["config"]["iacn"]["delta"] = 0.7
    stale.write_text(json.dumps(m))
    kept = (out / "din-L8-base-s0" / "metrics.json").stat().st_mtime_ns
    assert rp.run(_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "4 already finished, 2 to train" in printed
    # the same dataset elsewhere (a moved checkout, a copy): its finished runs still count
    import shutil

    moved = shutil.copytree(tiny, tmp_path / "moved" / tiny.name)
    config = rp.make_config(_args(argv), rp.Run("din-L8-base-s1", "din", 8, rp.BASE, 1, moved), out).to_dict()
    assert config["data"]["path"] != str(tiny) and rp.finished(out / "din-L8-base-s1", config) is not None
    assert (out / "din-L8-base-s0" / "metrics.json").stat().st_mtime_ns == kept
    assert json.loads(stale.read_text())["config"]["iacn"]["delta"] == 0.3
    # the other configuration's run is kept aside, not deleted
    (kept_aside,) = (out / "_stale").iterdir()
    assert kept_aside.name.startswith("din-L8-iacn-d0.3-l1-s0-")
    assert json.loads((kept_aside / "metrics.json").read_text())["config"]["iacn"]["delta"] == 0.7
    # a config field added after a run was trained counts at its default: the run is still finished
    m = json.loads((out / "din-L8-base-s1" / "metrics.json").read_text())
    del m["config"]["model"]["emb_dim"]  # as if emb_dim (default 18) had not existed back then
    (out / "din-L8-base-s1" / "metrics.json").write_text(json.dumps(m))
    assert rp.finished(out / "din-L8-base-s1", rp.make_config(_args(argv), rp.Run(
        "din-L8-base-s1", "din", 8, rp.BASE, 1, tiny), out).to_dict()) is not None
    m["config"]["model"]["emb_dim"] = 9  # ... but a different value does not
    (out / "din-L8-base-s1" / "metrics.json").write_text(json.dumps(m))
    assert rp.finished(out / "din-L8-base-s1", rp.make_config(_args(argv), rp.Run(
        "din-L8-base-s1", "din", 8, rp.BASE, 1, tiny), out).to_dict()) is None
    # a dataset prepared again at the same path is other data: its runs are not finished
    m = json.loads((out / "din-L8-base-s0" / "metrics.json").read_text())
    config = rp.make_config(_args(argv), rp.Run("din-L8-base-s0", "din", 8, rp.BASE, 0, tiny), out).to_dict()
    assert rp.finished(out / "din-L8-base-s0", config) is not None
    m["dataset"]["content_hash"] = "sha256:another"
    (out / "din-L8-base-s0" / "metrics.json").write_text(json.dumps(m))
    assert rp.finished(out / "din-L8-base-s0", config) is None
    # a smoke run needs its own --out too (the default holds the published runs)
    with pytest.raises(rp.ReproduceError, match="pass --out DIR and --results DIR"):
        rp.run(_args([a for a in argv if a not in ("--out", str(out))]))
    # more steps is another configuration: everything retrains
    assert rp.run(_args([a if a != "2" or i != argv.index("--max-steps") + 1 else "3"
                         for i, a in enumerate(argv)])) == 0
    assert "0 already finished, 6 to train" in capsys.readouterr().out
    assert len(list((out / "_stale").iterdir())) == 7


def test_aux_table_pins_reach_the_iacn_arms_only(tiny, tmp_path):
    """``--set distributed.sharding_types=...`` naming an aux table is kept for IaCN's arms and dropped
    for the model alone, which has no aux table (planning would refuse an unknown table)."""
    pins = "distributed.sharding_types={item_aux: row_wise, item_orig: table_wise}"
    args = _args(["--data", str(tiny), "--set", pins, "--out", str(tmp_path)])
    alone = rp.make_config(args, rp.Run("din-L8-base-s0", "din", 8, rp.BASE, 0, tiny), tmp_path)
    iacn = rp.make_config(args, rp.Run("din-L8-iacn-d0.3-l1-s0", "din", 8, rp.IACN, 0, tiny), tmp_path)
    assert alone.distributed.sharding_types == {"item_orig": "table_wise"}
    assert iacn.distributed.sharding_types == {"item_aux": "row_wise", "item_orig": "table_wise"}


def test_a_model_prefixed_set_reaches_that_models_runs_only(tiny, tmp_path):
    """``--set din:model.main.X=V`` changes DIN's runs and no other model's (a field of DIN's alone
    would be refused by Wide&Deep's config); an unknown prefix and a prefixed arm field are refused
    before any run."""
    args = _args(["--data", str(tiny), "--set", "din:model.main.att_activation=sigmoid",
                  "--set", "optim.lr=0.002", "--out", str(tmp_path)])
    din = rp.make_config(args, rp.Run("din-L8-iacn-d0.3-l1-s0", "din", 8, rp.IACN, 0, tiny), tmp_path)
    wd = rp.make_config(args, rp.Run("wide_deep-L8-base-s0", "wide_deep", 8, rp.BASE, 0, tiny), tmp_path)
    assert din.model.main == {"att_activation": "sigmoid"} and din.optim.lr == 0.002
    assert wd.model.main == {} and wd.optim.lr == 0.002
    with pytest.raises(rp.ReproduceError, match=r"'gru4rec' is not a model; use MODEL:SECTION\.FIELD=VALUE"):
        rp.run(_args(["--set", "gru4rec:optim.lr=0.1", "--data", "/nonexistent"]))
    with pytest.raises(rp.ReproduceError, match="the arms define iacn.enabled, iacn.delta, iacn.lam"):
        rp.run(_args(["--set", "din:iacn.delta=0.5", "--data", "/nonexistent"]))


def test_a_failing_run_is_named_and_the_others_still_train(tiny, tmp_path, capsys):
    """A variant whose loss overflows fails its two runs; the other six train, the table is written
    without it, the call exits 1 naming both, and the next call tries only the failed ones again."""
    out, res = tmp_path / "runs", tmp_path / "results"
    argv = ["--data", str(tiny), "--seeds", "2", "--max-steps", "2", "--batch-size", "16", "--only",
            "variants", "--variant-models", "din", "--variant", "inf:iacn.lam=1e39", "--threads", "1",
            "--out", str(out), "--results", str(res)]
    assert rp.run(_args(argv)) == 1
    captured = capsys.readouterr()
    assert "din-L8-var-inf-s0 failed: FloatingPointError" in captured.out
    assert "2 run(s) failed and are left out: din-L8-var-inf-s0 (FloatingPointError" in captured.err
    assert sorted(p.name for p in out.iterdir() if (p / "metrics.json").exists()) == [
        f"din-L8-{arm}-s{seed}" for arm in ("base", "iacn-d0.3-l1", "iacn-d1-l0") for seed in (0, 1)]
    table = (res / "variants.md").read_text()
    assert "Runs: 6 of 8 finished" in table and "| DIN IaCN inf (iacn.lam=1e39) | – |" in table
    assert rp.run(_args(argv)) == 1
    assert "6 already finished, 2 to train" in capsys.readouterr().out


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
sys.stdin.read()
"""


def _hold_lock(path) -> subprocess.Popen:
    """Another process holding ``path``'s lock until its stdin closes (or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_parallel_processes_share_runs_through_locks(tiny, tmp_path, capsys, monkeypatch):
    """A run locked by a live process is deferred and awaited; once that process is gone without
    finishing, its lock is free and the run is trained here. A lock file nobody holds (its process
    died) is free."""
    out = tmp_path / "runs"
    out.mkdir()
    other = _hold_lock(out / "din-L8-iacn-d1-l0-s0.lock")  # the last run of the pass
    (out / "din-L8-base-s0.lock").write_text("999999999")  # left by a process that died
    waits = []

    def other_process_dies(seconds: float) -> None:
        waits.append(seconds)
        other.kill()
        other.wait()

    monkeypatch.setattr(rp, "_wait", other_process_dies)
    argv = ["--data", str(tiny), "--seeds", "1", "--max-steps", "2", "--batch-size", "16", "--only", "table1",
            "--models", "din", "--threads", "1", "--out", str(out), "--results", str(tmp_path / "res")]
    try:
        assert rp.run(_args(argv)) == 0
    finally:
        other.kill()
        other.wait()
    printed = capsys.readouterr().out
    assert len(waits) == 1
    assert "waiting for 1 run(s) another process is training: din-L8-iacn-d1-l0-s0" in printed
    assert printed.index("din-L8-base-s0 (table1)") < printed.index("waiting for 1 run(s)")
    assert printed.index("waiting for 1 run(s)") < printed.index("din-L8-iacn-d1-l0-s0 (table1)")
    assert sorted(p.name for p in out.glob("*.lock")) == []
    for rid in ("din-L8-base-s0", "din-L8-iacn-d0.3-l1-s0", "din-L8-iacn-d1-l0-s0"):
        assert (out / rid / "metrics.json").exists()


def test_a_run_finished_while_its_lock_was_awaited_is_not_retrained(tiny, tmp_path, capsys, monkeypatch):
    """Another process finishes a run and unlocks it between our check and our lock: after taking
    the lock the run is looked at again and reused, not moved to _stale as another configuration."""
    out = tmp_path / "runs"
    argv = ["--data", str(tiny), "--seeds", "1", "--max-steps", "2", "--batch-size", "16", "--only", "table1",
            "--models", "din", "--threads", "1", "--out", str(out), "--results", str(tmp_path / "res")]
    assert rp.run(_args(argv)) == 0
    capsys.readouterr()
    real, calls = rp.finished, {}

    def not_yet_twice(run_dir, config):  # the plan's check and the pre-lock check see no metrics yet
        calls[run_dir] = calls.get(run_dir, 0) + 1
        return None if calls[run_dir] <= 2 else real(run_dir, config)

    monkeypatch.setattr(rp, "finished", not_yet_twice)
    assert rp.run(_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "another configuration" not in printed and "test AUC" not in printed
    assert not (out / "_stale").exists() and len(calls) == 3 and set(calls.values()) == {3}
    assert sorted(p.name for p in out.glob("*.lock")) == []


def test_paired_statistics_by_hand():
    a = {0: 0.80, 1: 0.812, 2: 0.811}
    b = {0: 0.79, 1: 0.80, 2: 0.80, 3: 0.70}  # seed 3 has no partner: unpaired only
    p = rp.paired(a, b)
    d = [0.01, 0.012, 0.011]
    assert p.n == 3 and p.mean == pytest.approx(np.mean(d)) and p.sd == pytest.approx(np.std(d, ddof=1))
    assert p.unpaired == pytest.approx(np.mean(list(a.values())) - np.mean(list(b.values())))
    assert p.t == pytest.approx(np.mean(d) / (np.std(d, ddof=1) / math.sqrt(3)))
    assert p.t > rp.t_critical(2) and p.significant  # t = 19.05 > 4.30
    assert not rp.paired({0: 0.80, 1: 0.82, 2: 0.81}, b).significant  # t = 4.00 < 4.30
    noisy = rp.paired({0: 0.80, 1: 0.78, 2: 0.83}, {0: 0.79, 1: 0.80, 2: 0.80})
    assert not noisy.significant and noisy.verdict().startswith("no")
    assert rp.paired({0: 0.8}, {0: 0.7}).verdict().startswith("n < 2")
    # the same difference on every seed (SD 0) is beyond noise, with t's sign the lift's
    same = rp.paired({0: 0.5, 1: 0.75}, {0: 0.75, 1: 1.0})  # exact in binary: both differences -0.25
    assert same.t == -math.inf and same.significant and same.verdict().startswith("yes, below")
    assert not rp.paired({0: 0.8, 1: 0.8}, {0: 0.8, 1: 0.8}).significant  # t = 0


def test_bad_arguments_are_named():
    with pytest.raises(rp.ReproduceError, match="--variant"):
        rp.variant_arm("nocolon")
    with pytest.raises(rp.ReproduceError, match="unknown model"):
        rp.run(_args(["--models", "gru4rec", "--data", "/nonexistent"]))
    # a variant changes IaCN only (the alone arm it is paired with has none), under its own name
    with pytest.raises(rp.ReproduceError, match=r"\['optim.lr=0.003'\] is not an IaCN setting"):
        rp.variant_arm("lr:optim.lr=0.003")
    with pytest.raises(rp.ReproduceError, match="--variant names must differ"):
        rp.run(_args(["--variant", "a:iacn.lam=0.1", "--variant", "a:iacn.lam=0.5", "--data", "/none"]))
    with pytest.raises(rp.ReproduceError, match="--delta-seeds must be >= 1"):
        rp.run(_args(["--delta-seeds", "0", "--data", "/nonexistent"]))
    # every run's settings, before a dataset is re-prepared (the data path does not even exist)
    for flags, needle in ((["--threads", "0"], "--threads: threads must be None or >= 1, got 0"),
                          (["--lengths", "0,20"], r"--lengths must be in \[1, 10,000\], got \[0\]"),
                          (["--lengths", "20,20000"], r"--lengths must be in \[1, 10,000\], got \[20000\]"),
                          (["--max-steps", "3"], "--max-steps makes a smoke run; pass --out DIR"),
                          (["--max-steps", "0"], "--max-steps: max_steps must be positive"),
                          (["--checkpoint-every", "-1"], "--checkpoint-every: checkpoint_every must be >= 0"),
                          (["--batch-size", "1"], "--batch-size: data.batch_size must be at least 2"),
                          (["--epochs", "0"], "--epochs: epochs must be positive")):
        with pytest.raises(rp.ReproduceError, match=needle):
            rp.run(_args([*flags, "--data", "/nonexistent"]))
    # the arms set enabled / delta / lam: a global value would make them one run under four names
    for s in ("iacn.delta=0.5", "iacn.lam=2", " iacn.enabled =true"):
        with pytest.raises(rp.ReproduceError, match="the arms define iacn.enabled, iacn.delta, iacn.lam"):
            rp.run(_args(["--set", s, "--data", "/nonexistent"]))


def test_t_critical_is_conservative_beyond_the_table():
    assert rp.t_critical(2) == 4.303 and rp.t_critical(11) == 2.228 and rp.t_critical(0) == math.inf
    assert rp.t_critical(40) == 2.042 and rp.t_critical(1000) == 2.042  # never below the df-30 value


def test_dien_runs_stored_before_dien_hidden_compare_as_the_gru_they_had():
    """Before ``model.dien_hidden`` existed DIEN's GRU had the item width 2·(emb + aux): a stored
    DIEN+IaCN run is not the new default (H = 2·emb), a plain DIEN run is; other models ignore it."""
    from iacn_torchrec.modules.iacn import IaCNConfig
    from iacn_torchrec.train.config import ModelConfig, TrainConfig

    def cfg(name: str, iacn: bool, **model) -> dict:
        return TrainConfig(model=ModelConfig(name=name, **model), iacn=IaCNConfig(enabled=iacn)).to_dict()

    def legacy(d: dict) -> dict:
        d = json.loads(json.dumps(d))
        del d["model"]["dien_hidden"]
        return d

    for name, iacn in (("dien", False), ("din", True), ("din", False)):
        assert rp.comparable(legacy(cfg(name, iacn))) == rp.comparable(cfg(name, iacn))
    assert rp.comparable(legacy(cfg("dien", True))) != rp.comparable(cfg("dien", True))
    assert rp.comparable(legacy(cfg("dien", True))) == rp.comparable(cfg("dien", True, dien_hidden=72))
    assert rp.comparable(cfg("dien", False)) == rp.comparable(cfg("dien", False, dien_hidden=36))


def test_a_lock_is_held_by_one_process_at_a_time(tmp_path):
    """Eight processes race for one lock file left by a dead process: exactly one gets it (the
    pid-file lock this replaced let two processes both take over a stale lock). Released, the lock
    is free again; a holder killed with SIGKILL frees it too, and a pid in a file nobody holds (reused by
    a live process) does not keep it."""
    (tmp_path / "r.lock").write_text("999999999")
    racer = ("import sys, time; from pathlib import Path; "
             "from iacn_torchrec.experiments import reproduce as rp; "
             "t = float(sys.argv[1]); time.sleep(max(0.0, t - time.time())); "
             "print(rp._lock(Path(sys.argv[2]), 'r'), flush=True); sys.stdin.read()")
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", racer, str(start), str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    try:
        got = [p.stdout.readline().strip() for p in procs]
        assert sorted(got) == ["False"] * 7 + ["True"]
        winner = procs[got.index("True")]
        assert (tmp_path / "r.lock").read_text() == str(winner.pid)
        assert not rp._lock(tmp_path, "r")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert rp._lock(tmp_path, "r") and rp._lock(tmp_path, "r")  # ours now (asking again: still ours)
    assert (tmp_path / "r.lock").read_text() == str(os.getpid())
    rp._unlock(tmp_path, "r")
    assert not (tmp_path / "r.lock").exists()
    # a dead holder's pid reused by a live process that holds nothing: the lock is free
    (tmp_path / "r.lock").write_text(str(os.getppid()))
    assert rp._lock(tmp_path, "r")
    rp._unlock(tmp_path, "r")
    holder = _hold_lock(tmp_path / "r.lock")
    assert not rp._lock(tmp_path, "r")
    holder.stdin.close()
    holder.wait()
    assert rp._lock(tmp_path, "r")
    rp._unlock(tmp_path, "r")


def test_a_lock_file_replaced_before_our_flock_is_retried(tmp_path, monkeypatch):
    """The holder unlinks its file between our open and our flock (and someone creates a new one):
    the flock we got is on a file nobody can find, so _lock retries on the file now at the path."""
    import fcntl

    lock = tmp_path / "r.lock"
    lock.write_text("")
    real, calls = fcntl.flock, []

    def replaced_first(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            lock.unlink()
            lock.write_text("")  # a new inode at the path
        return real(fd, op)

    from iacn_torchrec import fileio

    monkeypatch.setattr(fileio.fcntl, "flock", replaced_first)
    assert rp._lock(tmp_path, "r")
    assert len(calls) == 2 and lock.read_text() == str(os.getpid())
    assert os.fstat(rp._HELD[lock]).st_ino == lock.stat().st_ino
    rp._unlock(tmp_path, "r")
    assert not lock.exists()


def test_lengths_are_not_re_prepared_from_other_raw_files(tmp_path, monkeypatch):
    """A dataset prepared with relative raw paths, re-prepared for Table 2 from another directory
    that holds other files under those names, is refused (and its partial copy removed) instead of
    comparing lengths on other data; a copy of those other data found beside it is not reused."""
    from iacn_torchrec.data.prepare import prepare_dataset

    for d, seed in (("a", 0), ("b", 1)):  # the same names, other interactions
        (tmp_path / d / "raw").mkdir(parents=True)
        _write_tiny_tsv(tmp_path / d / "raw", seed=seed)
    raw = {"interactions": Path("raw/interactions.tsv.gz"), "items": Path("raw/items.tsv.gz")}  # relative
    monkeypatch.chdir(tmp_path / "a")
    base = prepare_dataset("tsv", **raw, protocol="din", max_len=8, seed=0, out=tmp_path / "ds-L8-s0",
                           progress=False)
    assert rp.dataset_at_length(base, 4) == tmp_path / "ds-L4-s0"  # the same files: fine
    (tmp_path / "ds-L4-s0").rename(tmp_path / "kept-L4")
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(rp.ReproduceError, match=r"gave other samples .* prepare it yourself into .*ds-L4-s0"):
        rp.dataset_at_length(base, 4)
    assert not (tmp_path / "ds-L4-s0").exists()
    # a length dataset beside it with the same recorded source but other data: rebuilt, not reused
    monkeypatch.chdir(tmp_path / "a")
    prepare_dataset("tsv", **raw, protocol="din", max_len=4, seed=0, out=tmp_path / "ds-L4-s0",
                    progress=False)
    monkeypatch.chdir(tmp_path / "b")
    bad = prepare_dataset("tsv", **raw, protocol="din", max_len=4, seed=0, out=tmp_path / "ds-L4-s0",
                          progress=False, overwrite=True)
    monkeypatch.chdir(tmp_path / "a")
    assert rp.dataset_at_length(base, 4) == bad
    assert json.loads((bad / "meta.json").read_text())["counts"] == json.loads(
        (tmp_path / "kept-L4" / "meta.json").read_text())["counts"]  # rebuilt from a's files
