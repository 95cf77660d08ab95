"""The ``apps/`` scripts refuse bad arguments up front, in one line with exit status 2 (before any
planning, spawning, training or measuring), write their outputs atomically and leave no
temporary folders behind."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from helpers import load_app

from iacn_torchrec import fileio
from iacn_torchrec.distributed.testing import write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("apps-args") / "data")


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert "error:" in err
    for n in needles:
        assert n in err, err
    return err


# ---- apps/plan_bench.py


@pytest.fixture(scope="module")
def plan_bench():
    return load_app("plan_bench")


def test_plan_bench_missing_or_broken_scenario_is_one_line(plan_bench, tmp_path, capsys):
    out = tmp_path / "out"
    assert plan_bench.main(["--scenarios", str(tmp_path / "nonexistent.yaml"), "--out", str(out)]) == 2
    one_line_error(capsys, "nonexistent.yaml", "no such scenario file")
    assert not out.exists()  # nothing created for a run that did not start
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [t,\n")
    assert plan_bench.main(["--scenarios", str(broken), "--out", str(out)]) == 2
    one_line_error(capsys, "broken.yaml", "not valid YAML")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_plan_bench_refuses_steps_below_one_before_planning(plan_bench, tmp_path, monkeypatch, capsys, steps):
    monkeypatch.setattr(plan_bench, "run_scenario", lambda *a, **k: pytest.fail("planned anyway"))
    assert plan_bench.main(["--steps", steps, "--out", str(tmp_path / "o"), "--no-reference"]) == 2
    one_line_error(capsys, "--steps")


@pytest.mark.parametrize("flags", [["--scenarios", "apps/scenarios/amazon_books.yaml"], ["--no-measure"],
                                   ["--no-reference"]])
def test_plan_bench_partial_run_needs_an_explicit_out(plan_bench, monkeypatch, capsys, flags):
    """A partial run with the default --out would replace the repo's generated planner.md section."""
    monkeypatch.setattr(plan_bench, "run_scenario", lambda *a, **k: pytest.fail("planned anyway"))
    monkeypatch.setattr(plan_bench, "write_atomic", lambda *a, **k: pytest.fail("wrote anyway"))
    assert plan_bench.main(flags) == 2
    one_line_error(capsys, flags[0], "--out")


def test_plan_bench_out_that_is_a_file_is_refused(plan_bench, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert plan_bench.main(["--out", str(f), "--no-measure", "--no-reference"]) == 2
    one_line_error(capsys, "--out", "not a directory")


def test_plan_bench_writes_json_and_markdown_atomically(plan_bench, tmp_path, monkeypatch):
    scn = tmp_path / "tiny.yaml"
    scn.write_text("name: t\nmodel: {num_users: 100, num_items: 500, num_cates: 10, orig_dim: 8, "
                   "user_dim: 8, hist_len: 3}\nworld_sizes: [2]\n")
    written = []

    def recording(path, data):
        written.append(Path(path).name)
        fileio.write_atomic(path, data)

    monkeypatch.setattr(plan_bench, "write_atomic", recording)
    out = tmp_path / "out"
    args = ["--scenarios", str(scn), "--no-measure", "--no-reference", "--out", str(out)]
    assert plan_bench.main(args) == 0
    assert {"planner.json", "planner.md"} <= set(written)
    assert json.loads((out / "planner.json").read_text())["rows"]
    md = (out / "planner.md").read_text()
    assert "partial run" in md and "make plan-bench" not in md  # says what generated it


# ---- apps/dist_bench.py


@pytest.fixture(scope="module")
def dist_bench():
    return load_app("dist_bench")


@pytest.mark.parametrize("bad,needle", [
    (["--repeats", "0"], "--repeats"),
    (["--steps", "0", "--warmup", "0"], "--steps"),
    (["--warmup", "-1"], "--warmup"),
    (["--batch-size", "0"], "--batch-size"),
    (["--threads", "0"], "--threads"),
    (["--batch-size", "1000"], "--batch-size"),  # not one step of the tiny train split
])
def test_dist_bench_refuses_bad_numbers_before_spawning(dist_bench, tiny, monkeypatch, capsys, bad, needle):
    import iacn_torchrec.distributed.testing as testing

    monkeypatch.setattr(testing, "spawn", lambda *a, **k: pytest.fail("spawned anyway"))
    assert dist_bench.main(["--data", str(tiny), "--steps", "1", "--warmup", "0", *bad]) == 2
    one_line_error(capsys, needle)


def test_dist_bench_refuses_missing_data_and_bad_out(dist_bench, tiny, tmp_path, monkeypatch, capsys):
    import iacn_torchrec.distributed.testing as testing

    monkeypatch.setattr(testing, "spawn", lambda *a, **k: pytest.fail("spawned anyway"))
    assert dist_bench.main(["--data", str(tmp_path / "nope")]) == 2
    one_line_error(capsys, "--data", "nope")
    out = tmp_path / "missing" / "r.json"
    assert dist_bench.main(["--data", str(tiny), "--steps", "1", "--warmup", "0", "--out", str(out)]) == 2
    one_line_error(capsys, "--out", "missing")


def test_dist_bench_writes_out_atomically(dist_bench, tiny, tmp_path, monkeypatch):
    import iacn_torchrec.distributed.testing as testing

    def fake_spawn(fn, world, arm, args, path, threads=1):
        Path(path).write_text(json.dumps({
            "arm": arm, "world_size": world, "threads_per_process": threads, "sharding": "-",
            "table_optimizer": "adam", "batch_per_rank": args["batch_size"], "steps": args["steps"],
            "step_ms_median": 1.0, "step_ms_mean": 1.0, "samples_per_s": 10.0, "samples_per_s_mean": 10.0}))

    written = []

    def recording(path, data):
        written.append(Path(path))
        real_write_atomic(path, data)

    real_write_atomic = fileio.write_atomic
    monkeypatch.setattr(testing, "spawn", fake_spawn)
    monkeypatch.setattr(fileio, "write_atomic", recording)
    out = tmp_path / "r.json"
    assert dist_bench.main(["--data", str(tiny), "--steps", "1", "--warmup", "0", "--batch-size", "4",
                            "--arms", "1p plain", "--out", str(out)]) == 0
    assert written == [out]
    assert json.loads(out.read_text())["rows"][0]["arm"] == "1p plain"


def test_dist_bench_worker_removes_its_temp_folder(dist_bench, tmp_path, monkeypatch):
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*a, **k):
        made.append(Path(real_mkdtemp(*a, dir=tmp_path, **{x: v for x, v in k.items() if x != "dir"})))
        return str(made[-1])

    def failing_measure(*a):
        (made[-1] / "checkpoint").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(dist_bench, "_measure", failing_measure)
    with pytest.raises(RuntimeError, match="boom"):
        dist_bench.worker(0, 1, "1p plain", {"threads": 1}, str(tmp_path / "r.json"))
    assert made and not made[0].exists()  # removed even when the worker fails


# ---- apps/dlrm_example.py


@pytest.fixture(scope="module")
def dlrm_example():
    return load_app("dlrm_example")


@pytest.mark.parametrize("bad,needle", [
    (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "-5"], "--max-steps"),
    (["--aux-dim", "64"], "--aux-dim"),
    (["--dim", "8", "--aux-dim", "9"], "--aux-dim"),
    (["--aux-dim", "0"], "--aux-dim"),
    (["--batch-size", "0"], "--batch-size"),
    (["--delta", "1.5"], "--delta"),
    (["--delta", "nan"], "--delta"),
    (["--lam", "-1"], "--lam"),
    (["--lam", "inf"], "--lam"),
    (["--lr", "nan"], "--lr"),
])
def test_dlrm_example_refuses_bad_numbers_before_training(dlrm_example, tiny, monkeypatch, capsys, bad,
                                                          needle):
    monkeypatch.setattr(dlrm_example, "train_and_eval", lambda *a, **k: pytest.fail("trained anyway"))
    assert dlrm_example.main(["--data", str(tiny), *bad]) == 2
    one_line_error(capsys, needle)


def test_dlrm_example_missing_data_is_one_line(dlrm_example, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dlrm_example, "train_and_eval", lambda *a, **k: pytest.fail("trained anyway"))
    assert dlrm_example.main(["--data", str(tmp_path / "nope")]) == 2
    one_line_error(capsys, "--data", "nope")


# ---- apps/width_floor.py


def test_width_floor_checks_out_before_measuring(tiny, tmp_path, monkeypatch, capsys):
    width_floor = load_app("width_floor")
    monkeypatch.setattr(width_floor, "measure", lambda *a, **k: pytest.fail("measured anyway"))
    with pytest.raises(SystemExit) as e:
        width_floor.main(["--data", str(tiny), "--out", str(tmp_path / "nonexistent" / "dir" / "x.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse's usage, then the one error line
    assert "error: --out" in last and "nonexistent" in last
