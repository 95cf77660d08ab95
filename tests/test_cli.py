"""The `iacn` entry point: dispatch, help, and a clear error for a missing dataset."""

import subprocess
import sys


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
