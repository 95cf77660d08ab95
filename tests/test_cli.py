"""The `iacn` entry point: dispatch, help, and a clear error for a missing dataset."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCENARIO = Path(__file__).resolve().parents[1] / "apps" / "scenarios" / "amazon_books.yaml"


def _iacn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iacn_torchrec.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_command():
    r = _iacn("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("prepare", "train", "demo", "reproduce", "plan", "export", "score", "explain", "bench"):
        assert cmd in r.stdout


def test_train_without_data_names_the_flag():
    r = _iacn("train", "--model", "din")
    assert r.returncode != 0
    assert "--data" in r.stderr and "Traceback" not in r.stderr


def test_train_bad_value_names_the_field(tmp_path):
    r = _iacn("train", "--data", str(tmp_path), "--set", "iacn.delta=2")
    assert r.returncode != 0
    assert "delta" in r.stderr and "Traceback" not in r.stderr



def test_process_defaults_keep_freed_memory_unless_the_environment_says_otherwise(monkeypatch):
    import os
    import subprocess
    import sys

    from iacn_torchrec import runtime

    for k in runtime.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    assert runtime.keep_freed_memory()  # glibc accepts both settings
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the user's own choice wins
    assert not runtime.keep_freed_memory()
    # a fresh `iacn` process gets OMP_WAIT_POLICY=PASSIVE unless the caller set it
    code = "import os; from iacn_torchrec.cli import main; main([]); print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("PASSIVE")


def test_user_errors_are_one_line_without_traceback(tmp_path):
    """Bad input, config or files reach the user as `iacn <command>: <message>`, exit status 2."""
    (tmp_path / "notes.txt").write_text("keep me")
    cases = [
        (("train", "--data", str(tmp_path / "nope")), "iacn train: ", "nope"),
        (("train", "--data", str(tmp_path), "--lr", "1e-5", "--set", "log_every=0"), "iacn train: ",
         "log_every"),
        (("train", "--data", str(tmp_path), "--delta", "0.5"), "iacn train: ", "IaCN is off: add --iacn"),
        (("export", "--run", str(tmp_path), "--out", str(tmp_path / "m")), "iacn export: ", "config.yaml"),
        (("score", "--model", str(tmp_path), "--input", "x.tsv", "--batch-size", "0"), "iacn score: ",
         "--batch-size"),
        (("explain", "--run", str(tmp_path), "--user", "1", "--summary"), "iacn explain: ", "either"),
        (("demo", "--prepared", str(tmp_path), "--max-steps", "1"), "iacn demo: ", "not a prepared dataset"),
        (("plan", "--spec", str(SCENARIO), "--world-size", "0", "--out", str(tmp_path / "p")), "iacn plan: ",
         "--world-size: must be >= 1"),
        (("bench", "serve", "--run", str(tmp_path / "absent")), "iacn bench serve: ",
         "no such run directory"),
        (("bench", "serve", "--run", str(tmp_path)), "iacn bench serve: ", "no config.yaml"),
        (("reproduce", "--set", "iacn.lam=2", "--data", str(tmp_path)), "iacn reproduce: ",
         "the arms define"),
        (("export", "--run", str(tmp_path), "--out", str(tmp_path / "m"), "--threads", "0"), "iacn export: ",
         "--threads must be >= 1, got 0"),
    ]
    for args, prefix, detail in cases:
        r = _iacn(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        err = r.stderr
        assert "Traceback" not in err and prefix in err and detail in err, (args, err[-2000:])
    assert (tmp_path / "notes.txt").read_text() == "keep me"  # the demo never replaces a foreign folder


# ------------------------------------------------------- a tiny run, driven through `iacn` in-process
def _main(*args: str) -> int:
    from iacn_torchrec.cli import main

    return main(list(args))


def _train(max_steps: int, out: str = "run") -> int:
    """``iacn train`` on ``data`` (4 steps an epoch), a checkpoint every 3 steps."""
    return _main("train", "--data", "data", "--batch-size", "16", "--epochs", "3", "--max-steps",
                 str(max_steps), "--checkpoint-every", "3", "--threads", "2", "--no-progress", "--out", out)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """``ROOT/run``: 6 steps on ``ROOT/data``, trained from ROOT with the relative ``--data data``
    (checkpoints at steps 3 and 6)."""
    from iacn_torchrec.distributed.testing import write_tiny_dataset

    root = tmp_path_factory.mktemp("tiny-cli")
    write_tiny_dataset(root / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert _train(6) == 0
    finally:
        os.chdir(cwd)
    return root / "run"


def _copy_run(tiny_run: Path, to: Path) -> Path:
    shutil.copytree(tiny_run.parent / "data", to / "data")
    return Path(shutil.copytree(tiny_run, to / "run"))


def test_a_user_error_under_torchrun_is_the_launchers_reported_cause(tmp_path, monkeypatch, capsys):
    """Under torchrun / TorchX each worker has a ``TORCHELASTIC_ERROR_FILE``: the one-line error is
    written there, so the launcher's failure summary (read by torch's own ``ProcessFailure``) and
    TorchX's status name the cause instead of ``<N/A>``; so is a stop by a signal (resumable, exit
    128 + signum). Outside such a launch nothing is written."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from iacn_torchrec.cli import main
    from iacn_torchrec.errors import TrainingInterrupted

    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "absent"
    argv = ["train", "--data", str(missing), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"iacn train: {missing}: no such prepared dataset directory")
    assert not list(tmp_path.iterdir())

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == line
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["message"] == line
    summary = ChildFailedError("iacn_torchrec.cli", {0: failure}).format_msg()
    assert f"traceback : {line}" in summary and "<N/A>" not in summary

    def stopped(args):
        raise TrainingInterrupted("stopped by SIGTERM after step 7 (checkpointed): rerun to resume", 15)

    import iacn_torchrec.train.cli as train_cli

    monkeypatch.setattr(train_cli, "run", stopped)  # `iacn train` stopped by SIGTERM mid-run
    assert main(argv) == 128 + 15
    line = capsys.readouterr().err.strip()
    assert line == "iacn train: stopped by SIGTERM after step 7 (checkpointed): rerun to resume"
    stop = ProcessFailure(local_rank=0, pid=1, exitcode=143, error_file=str(error_file))
    assert stop.message["message"] == line

    def ctrl_c_twice(args):  # the second Ctrl-C stops at once, without a checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "run", ctrl_c_twice)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "iacn train: interrupted"


def test_train_records_the_absolute_data_path_so_export_works_from_anywhere(tiny_run, tmp_path, monkeypatch):
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["data"]["path"] == str((tiny_run.parent / "data").resolve())
    monkeypatch.chdir(tmp_path)  # not where the run was trained
    assert _main("export", "--run", str(tiny_run), "--out", "m", "--check-samples", "0") == 0
    assert (tmp_path / "m" / "model.pt").is_file()


def test_a_run_recorded_with_a_relative_data_path_still_resumes(tiny_run, tmp_path, monkeypatch, capsys):
    """Runs trained before data.path was recorded absolute hold the path as typed: resuming them
    from their directory works (resume compares the dataset's content hash, not its path)."""
    run = _copy_run(tiny_run, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"] = "data"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert _train(8) == 0
    assert "resuming run from its checkpoint at step 6" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == str(tmp_path / "data")


def test_an_incomplete_newest_checkpoint_is_announced(tiny_run, tmp_path, monkeypatch, capsys):
    run = _copy_run(tiny_run, tmp_path)
    (run / "checkpoints" / "step_00000006" / "manifest.json").unlink()  # as if its save was cut short
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert _main("export", "--run", "run", "--out", "m", "--check-samples", "0") == 0
    captured = capsys.readouterr()
    assert ("note: run/checkpoints/step_00000006 is incomplete (no manifest.json); exporting step 3\n"
            in captured.err) and "step 3)" in captured.out
    assert _train(6) == 0
    assert ("note: run/checkpoints/step_00000006 is incomplete (no manifest.json); resuming from step 3\n"
            in capsys.readouterr().err)


def test_a_checkpoint_that_is_no_torch_file_is_a_one_line_error(tiny_run, tmp_path, monkeypatch, capsys):
    """A rank file that passes the manifest's size and sha256 checks but is not a torch file."""
    run = _copy_run(tiny_run, tmp_path)
    f = run / "checkpoints" / "step_00000006" / "rank0.pt"
    f.write_bytes(b"hello")
    manifest = json.loads((f.parent / "manifest.json").read_text())
    manifest["files"][0].update(bytes=5, sha256=hashlib.sha256(b"hello").hexdigest())
    (f.parent / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    wanted = "run/checkpoints/step_00000006/rank0.pt: not a readable checkpoint (UnpicklingError: "
    for command, call in [("export", lambda: _main("export", "--run", "run", "--out", "m")),
                          ("train", lambda: _train(8))]:
        assert call() == 2
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith(f"iacn {command}: {wanted}"), err
        # train, which would resume from it, also names the way back to the intact step 3
        way_back = "(step 3) may be intact: remove run/checkpoints/step_00000006 to resume from there"
        assert (way_back in err[-1]) == (command == "train"), err
    assert not (tmp_path / "m").exists()


def test_output_paths_that_cannot_be_written_name_the_option(tiny_run, tmp_path, monkeypatch, capsys):
    """Refused before the work (training, export, scoring), in one line naming option and path."""
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("keep me")
    data = str(tiny_run.parent / "data")
    cases = [
        (("train", "--data", data, "--out", "afile"),
         "iacn train: --out afile: exists and is not a directory"),
        (("train", "--data", data, "--out", "afile/sub"),
         "iacn train: --out afile/sub: afile is not a directory"),
        (("export", "--run", str(tiny_run), "--out", "afile"),
         "iacn export: --out afile: exists and is not a directory"),
        (("export", "--run", str(tiny_run), "--out", "afile/sub"),
         "iacn export: --out afile/sub: afile is not a directory"),
        (("score", "--model", "absent", "--input", "x.tsv", "--out", "afile/x.tsv"),
         "iacn score: --out afile/x.tsv: afile is not a directory"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert _main(*args) == 2, args
        captured = capsys.readouterr()
        assert captured.err == message + "\n" and captured.out == "", (args, captured)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and Path("afile").read_text() == "keep me"


@pytest.mark.parametrize("args", [("export", "--run", "run", "--out", "m"),
                                  ("explain", "--run", "run", "--user", "u1"),
                                  ("bench", "serve", "--run", "run"),
                                  ("score", "--model", "m", "--input", "x.tsv")])
def test_threads_below_one_is_a_one_line_error(args, tmp_path, monkeypatch, capsys):
    """torch.set_num_threads(0) raises a RuntimeError: the serving commands check --threads first."""
    import torch

    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    what = " ".join(args[:2]) if args[0] == "bench" else args[0]
    for threads in ("0", "-2"):
        assert _main(*args, "--threads", threads) == 2
        assert capsys.readouterr().err == f"iacn {what}: --threads must be >= 1, got {threads}\n"
    assert torch.get_num_threads() == before and not Path("m").exists()


def test_a_corrupt_metrics_json_names_the_file(tiny_run, tmp_path, monkeypatch, capsys):
    run = _copy_run(tiny_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    for text, shown in (('{"test": \n', "not valid JSON (Expecting value: line 2 column 1 (char 10))"),
                        ("[1, 2]", "expected a JSON object, got a list")):
        (run / "metrics.json").write_text(text)
        for args in (("export", "--run", "run", "--out", "m"), ("explain", "--run", "run", "--user", "u1")):
            capsys.readouterr()
            assert _main(*args) == 2, args
            assert capsys.readouterr().err == f"iacn {args[0]}: run/metrics.json: {shown}\n", args
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_with_damaged_state_entries_is_a_one_line_error(tiny_run, tmp_path, monkeypatch, capsys):
    """A rank file the manifest vouches for whose train_state or rng is not what training saved, or
    whose model does not fit (another width): resume says so in one line naming the checkpoint."""
    import io

    import torch

    monkeypatch.chdir(tmp_path)
    for i, (key, value, wanted) in enumerate((
            ("train_state", {"step": 6, "bogus": 1},
             "its 'train_state' is damaged (TrainState.__init__() got an unexpected keyword argument"),
            ("train_state", None, "its 'train_state' is damaged ("),
            ("rng", {}, "its 'rng' state is damaged (KeyError: 'torch')"),
            ("model", "narrow", "the checkpoint does not fit this model (size mismatch for "))):
        run = _copy_run(tiny_run, tmp_path / str(i))
        f = run / "checkpoints" / "step_00000006" / "rank0.pt"
        state = torch.load(f, weights_only=False)
        if value == "narrow":
            value = {k: v[..., :1] if k.endswith("weight") and v.dim() == 2 else v
                     for k, v in state[key].items()}
        state[key] = value
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        f.write_bytes(data)
        manifest = json.loads((f.parent / "manifest.json").read_text())
        manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        (f.parent / "manifest.json").write_text(json.dumps(manifest))
        monkeypatch.chdir(tmp_path / str(i))
        capsys.readouterr()
        assert _train(8) == 2, key
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and wanted in err[0], err


def test_a_torch_file_that_is_no_checkpoint_is_a_one_line_error(tiny_run, tmp_path, monkeypatch, capsys):
    """A rank file that torch reads (and the manifest vouches for) but that holds no training state."""
    import io

    import torch

    run = _copy_run(tiny_run, tmp_path)
    f = run / "checkpoints" / "step_00000006" / "rank0.pt"
    buf = io.BytesIO()
    torch.save({"foo": 1}, buf)
    f.write_bytes(buf.getvalue())
    manifest = json.loads((f.parent / "manifest.json").read_text())
    data = buf.getvalue()
    manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (f.parent / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    wanted = ("run/checkpoints/step_00000006/rank0.pt: not a checkpoint (no 'model', 'optimizer', "
              "'train_state', 'rng'; it holds 'foo')")
    for command, call in [("export", lambda: _main("export", "--run", "run", "--out", "m")),
                          ("explain", lambda: _main("explain", "--run", "run", "--user", "u1")),
                          ("train", lambda: _train(8))]:
        assert call() == 2, command
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith(f"iacn {command}: {wanted}"), err
    assert not (tmp_path / "m").exists()


def test_export_refuses_a_config_yaml_its_checkpoint_was_not_trained_with(tiny_run, tmp_path, monkeypatch,
                                                                         capsys):
    """config.yaml rebuilds the model; the checkpoint's configuration fingerprint says what it was
    trained with: an edited config.yaml is refused (it would be written into the manifest)."""
    run = _copy_run(tiny_run, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["iacn"]["delta"] == 0.3
    config["iacn"]["delta"] = 0.9
    config["threads"] = 1  # run control, not part of the fingerprint: changing it is fine
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for args in (("export", "--run", "run", "--out", "m", "--check-samples", "0"),
                 ("explain", "--run", "run", "--user", "u1")):
        assert _main(*args) == 2, args
        assert capsys.readouterr().err == (
            f"iacn {args[0]}: run/config.yaml: not the configuration run/checkpoints/step_00000006 was "
            "trained with (checkpoint → config.yaml: iacn.delta: 0.3 → 0.9); restore the config.yaml it was "
            "trained with\n"), args
    assert not (tmp_path / "m").exists()
    config["iacn"]["delta"] = 0.3
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert _main("export", "--run", "run", "--out", "m", "--check-samples", "0") == 0


def test_a_runs_config_yaml_trains_that_run_on_from_anywhere(tiny_run, tmp_path, monkeypatch, capsys):
    """``iacn train --config RUN/config.yaml`` continues RUN: config.yaml records the run directory
    absolute (the run was started with a relative --out) and not the one-off --no-resume of the
    command that wrote it, which would set the run's checkpoints aside."""
    import yaml

    _copy_run(tiny_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert _main("train", "--data", "data", "--batch-size", "16", "--epochs", "3", "--max-steps", "3",
                 "--checkpoint-every", "3", "--threads", "2", "--no-progress", "--out", "run",
                 "--no-resume") == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["out"] == str(tmp_path / "run") and written["resume"] is True
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert _main("train", "--config", "../run/config.yaml", "--max-steps", "5", "--no-progress") == 0
    err = capsys.readouterr().err
    assert f"resuming {tmp_path / 'run'} from its checkpoint at step 3" in err and "--no-resume" not in err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 5
    assert not (tmp_path / "elsewhere" / "run").exists()


def test_export_refuses_a_dataset_the_run_was_not_trained_on(tiny_run, tmp_path, monkeypatch, capsys):
    """``--data`` another dataset of the same shapes (the model would load and score it): refused by
    the content hash the checkpoint's fingerprint holds, naming both."""
    from iacn_torchrec.distributed.testing import write_tiny_dataset

    _copy_run(tiny_run, tmp_path)
    write_tiny_dataset(tmp_path / "other", seed=1)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for args in (("export", "--run", "run", "--out", "m", "--check-samples", "0", "--data", "other"),
                 ("evaluate", "--run", "run", "--data", "other")):
        assert _main(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(f"iacn {args[0]}: other is not the dataset run/checkpoints/step_00000006 was "
                              "trained on (data.content_hash: 'sha256:"), err
        assert err.rstrip().endswith("pass that dataset with --data"), err
    assert not (tmp_path / "m").exists()
    assert _main("export", "--run", "run", "--out", "m", "--check-samples", "0", "--data", "data") == 0


def test_train_keeps_a_users_files(tiny_run, tmp_path, monkeypatch):
    """``iacn train --out DIR`` refuses a folder holding files that are not a run's (it would write
    config.yaml and metrics.json over them), and a hand-written ``--config`` that is OUT's own
    config.yaml; a run's own config.yaml passed back (it reads back unchanged) resumes as usual."""
    monkeypatch.chdir(_copy_run(tiny_run, tmp_path).parent)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "metrics.json").write_text('{"mine": 1}')
    r = _iacn("train", "--data", "data", "--max-steps", "1", "--no-progress", "--out", str(mine))
    assert r.returncode == 2 and "holds files that are not a training run's (notes.txt)" in r.stderr, r.stderr
    assert (mine / "metrics.json").read_text() == '{"mine": 1}' and not (mine / "config.yaml").exists()
    hand = tmp_path / "hand"
    hand.mkdir()
    (hand / "config.yaml").write_text("# my settings\ndata:\n  batch_size: 16\n")
    r = _iacn("train", "--config", str(hand / "config.yaml"), "--data", "data", "--max-steps", "1",
              "--no-progress", "--out", str(hand))
    assert r.returncode == 2 and "is the config.yaml this run writes into" in r.stderr, r.stderr
    assert (hand / "config.yaml").read_text().startswith("# my settings")
    from iacn_torchrec.train.config import TrainConfig

    written = TrainConfig.from_yaml("run/config.yaml")
    assert written.to_yaml() == Path("run/config.yaml").read_text()  # a run's own file reads back as it is
    (Path("run") / "report.md").write_text("an explain report beside the run's checkpoints")
    assert _main("train", "--config", "run/config.yaml", "--out", "run", "--no-progress") == 0

    # written before model.main existed: still the run's own file (it resumes), and a Wide&Deep one
    # passed to a new run means the ReLU deep part that run was built with, not today's default
    old = yaml.safe_load(Path("run/config.yaml").read_text())
    del old["model"]["main"]
    Path("run/config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert _main("train", "--config", "run/config.yaml", "--out", "run", "--no-progress") == 0
    old["model"]["name"] = "wide_deep"
    Path("old_wd").mkdir()
    Path("old_wd/config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    Path("old_wd/metrics.json").write_text("{}")
    assert _main("train", "--config", "old_wd/config.yaml", "--out", "new_wd", "--max-steps", "1",
                 "--no-progress") == 0
    assert yaml.safe_load(Path("new_wd/config.yaml").read_text())["model"]["main"] == {
        "deep_activation": "relu", "deep_input_bn": False}


def test_another_world_size_is_not_sent_to_an_older_checkpoint(tiny_run, tmp_path, monkeypatch, capsys):
    """Checkpoints written by 2 ranks, resumed by 1: the error says to resume with the same world
    size, and does not suggest removing the newest step for the one before it (written by the same
    2 ranks, it would be refused alike), as it does for a damaged newest checkpoint."""
    run = _copy_run(tiny_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    for step in (3, 6):
        m = run / "checkpoints" / f"step_{step:08d}" / "manifest.json"
        manifest = json.loads(m.read_text())
        m.write_text(json.dumps({**manifest, "world_size": 2, "files": manifest["files"] * 2}))
    capsys.readouterr()
    assert _train(9) == 2
    err = capsys.readouterr().err
    assert "was written by 2 rank(s) and this run has 1" in err and "resume with the same world size" in err
    assert "may be intact" not in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="NCCL may work with a GPU")
def test_nccl_without_a_gpu_is_a_one_line_error(tiny_run, tmp_path, monkeypatch, capsys):
    _copy_run(tiny_run, tmp_path)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert _main("train", "--data", "data", "--batch-size", "16", "--max-steps", "2", "--threads", "1",
                 "--no-progress", "--out", "nccl", "--embedding-optimizer", "sgd", "--emb-dim", "16",
                 "--set", "model.user_dim=16", "--set", "distributed.backend=nccl") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("iacn train: distributed.backend=nccl needs CUDA GPUs"), err


def test_a_damaged_newest_checkpoint_points_evaluate_and_export_to_the_one_before(tiny_run, tmp_path,
                                                                                  monkeypatch, capsys):
    """The run's checkpoints are steps 3 and 6: with step 6 damaged, evaluate and export name the file
    and say --step 3, which then works."""
    run = _copy_run(tiny_run, tmp_path)
    f = run / "checkpoints" / "step_00000006" / "rank0.pt"
    f.write_bytes(f.read_bytes()[:1000])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for args in (("evaluate", "--run", "run", "--threads", "1"),
                 ("export", "--run", "run", "--out", "m", "--check-samples", "0")):
        assert _main(*args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "rank0.pt: truncated" in err[0], err
        assert err[0].endswith("the checkpoint before it (step 3) may be intact: pass --step 3"), err
    assert _main("evaluate", "--run", "run", "--threads", "1", "--step", "3") == 0
