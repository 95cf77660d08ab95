"""The `iacn` entry point: dispatch, help, and a clear error for a missing dataset."""

import subprocess
import sys
from pathlib import Path

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
         "world_size"),
        (("bench", "serve", "--run", str(tmp_path / "absent")), "iacn bench serve: ", "no config.yaml"),
        (("reproduce", "--set", "iacn.lam=2", "--data", str(tmp_path)), "iacn reproduce: ",
         "the arms define"),
    ]
    for args, prefix, detail in cases:
        r = _iacn(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        err = r.stderr
        assert "Traceback" not in err and prefix in err and detail in err, (args, err[-2000:])
    assert (tmp_path / "notes.txt").read_text() == "keep me"  # the demo never replaces a foreign folder
