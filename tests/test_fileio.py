"""Atomic writes: a failure leaves the previous file or folder, never a mix or nothing; an output
path that cannot be written is refused up front, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from iacn_torchrec.errors import UserError
from iacn_torchrec.fileio import check_output_path, replace_dir, save_figure, write_atomic


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    p = tmp_path / "metrics.json"
    write_atomic(p, "old")
    write_atomic(p, b"new")
    assert p.read_text() == "new"

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("iacn_torchrec.fileio.os.replace", broken)  # the rename fails
    with pytest.raises(OSError, match="disk full"):
        write_atomic(p, "newer")
    assert p.read_text() == "new" and [x.name for x in tmp_path.iterdir()] == ["metrics.json"]


def test_write_atomic_flushes_the_content_to_disk_before_the_rename(tmp_path, monkeypatch):
    """After a power loss the renamed file must not be empty: its content is fsynced first."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr("iacn_torchrec.fileio.os.fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr("iacn_torchrec.fileio.os.replace",
                        lambda a, b: (events.append("rename"), real_replace(a, b)))
    write_atomic(tmp_path / "metrics.json", "{}")
    assert events == ["fsync", "rename"] and (tmp_path / "metrics.json").read_text() == "{}"


def test_save_figure_writes_the_suffix_format(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    save_figure(fig, tmp_path / "a.png", dpi=20)
    save_figure(fig, tmp_path / "b", dpi=20)  # no suffix: matplotlib's default format, as savefig
    save_figure(fig, tmp_path / "c.pdf")
    plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.pdf"]
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "c.pdf").read_bytes()[:4] == b"%PDF"


def test_replace_dir_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    target, new = tmp_path / "model", tmp_path / ".model.tmp"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    real = Path.rename

    def fail_for_new(self, dst):
        if self == new:
            raise OSError("gone")
        return real(self, dst)

    monkeypatch.setattr(Path, "rename", fail_for_new)
    with pytest.raises(OSError, match="gone"):
        replace_dir(new, target)
    monkeypatch.undo()
    assert (target / "a").read_text() == "old"
    replace_dir(new, target)
    assert (target / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_check_output_path_names_the_option_the_path_and_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("keep me")
    Path("folder").mkdir()
    refused = [  # (path, option, keywords) -> the message
        ("afile", "--out", {"directory": True}, "--out afile: exists and is not a directory"),
        ("afile/sub", "--out", {"directory": True, "parents": True},
         "--out afile/sub: afile is not a directory"),
        ("afile/x.tsv", "--out", {}, "--out afile/x.tsv: afile is not a directory"),
        ("afile/a/b/x.md", "--md", {"parents": True}, "--md afile/a/b/x.md: afile is not a directory"),
        ("folder", "--out", {}, "--out folder: is a directory"),
        ("missing/x.png", "--plot", {}, "--plot missing/x.png: directory missing does not exist"),
    ]
    for path, option, kw, message in refused:
        with pytest.raises(UserError) as e:
            check_output_path(path, option, **kw)
        assert str(e.value) == message
    writable = [("folder", {"directory": True}), ("new", {"directory": True}), ("a/b/c", {"parents": True}),
                ("x.tsv", {}), ("folder/x.tsv", {}), ("afile", {})]  # (an existing file is replaced)
    for path, kw in writable:
        check_output_path(path, "--out", **kw)
    assert Path("afile").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile", "folder"]  # checking creates nothing
