"""Writing results so that a crash never leaves half a file or half a folder behind.

Every file a run or a tool publishes (metrics, tables, plots, manifests, scores) goes through
:func:`write_atomic`, :func:`open_atomic` (streamed) or :func:`save_figure`; a finished folder,
built in a :func:`temp_sibling`, replaces an earlier one through :func:`replace_dir`. Each writes
next to the target first and renames: a reader sees the old content or the new, never a mix.
:func:`check_output_path` refuses an output path that cannot be written before any work is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from iacn_torchrec.errors import UserError

__all__ = ["write_atomic", "open_atomic", "save_figure", "replace_dir", "temp_sibling", "check_output_path",
           "try_lock", "release_lock", "lock_holder", "remove_temp_siblings"]


def check_output_path(
    path: str | Path, option: str, *, directory: bool = False, parents: bool = False
) -> None:
    """Raise `UserError` (``"OPTION PATH: what is wrong"``) when ``path`` cannot be written: an output
    folder (``directory``) that exists as something else, an output file that is a folder, a folder
    above it that is a file, or (unless ``parents``: the writer creates missing folders) a missing
    folder to write it in. Called before the work, so a bad path does not waste (or lose) it."""
    path = Path(path)
    shown = f"{option} {path}"
    if directory and path.exists() and not path.is_dir():
        raise UserError(f"{shown}: exists and is not a directory")
    if not directory and path.is_dir():
        raise UserError(f"{shown}: is a directory")
    # the nearest folder above it that exists must be a folder (Path.exists is False under a file)
    for above in (path.parent, *path.parent.parents):
        if above.exists():
            if not above.is_dir():
                raise UserError(f"{shown}: {above} is not a directory")
            return
        if not parents:
            raise UserError(f"{shown}: directory {above} does not exist")


def temp_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A hidden, unique name next to ``path`` (``.NAME.tmp-PID-XXXXXXXX``) to build it in."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing whose content appears at ``path`` only once the block
    finishes without an error (a temporary sibling, flushed to disk, then a rename: after a power
    loss ``path`` holds the old content or the new, not an empty file); text as UTF-8."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` for strict JSON: NaN/inf (an AUC over one label, a t statistic with one seed) as null;
    dict keys as strings, tuples as lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary sibling and a rename."""
    with open_atomic(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig(path, **kwargs)`` atomically. As ``savefig`` does, the format follows
    ``path``'s suffix, and a path without one gets matplotlib's default format and its suffix."""
    path = Path(path)
    if "format" not in kwargs:
        import matplotlib

        kwargs["format"] = path.suffix[1:] or matplotlib.rcParams["savefig.format"]
        if not path.suffix:
            path = path.with_name(f"{path.name}.{kwargs['format']}")
    tmp = temp_sibling(path)
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Move the finished folder ``new`` to ``target``. An existing ``target`` is renamed aside first,
    put back if the move fails, and removed only once the new folder is in place."""
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = temp_sibling(target, "old")
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_temp_siblings(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` (:func:`temp_sibling`'s ``.NAME.tmp-*``) that a
    crashed writer left behind. Only for a caller that holds the lock on their folder (no writer is
    at work there). Returns what was removed."""
    path = Path(path)
    gone = []
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def try_lock(path: str | Path) -> int | None:
    """Take an exclusive ``flock`` on ``path`` (created, holding this process's pid for people):
    the descriptor that holds it, or None while another process holds it. The kernel drops the lock
    when its process exits, however it exits, so a lock left by a dead process is free without any
    guess about pids or ages, and two processes can never both take over the same stale lock.
    Release it with :func:`release_lock`."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # The holder we raced with may have released *and unlinked* the file between our open
            # and our flock: then we hold a lock on a file nobody else can find. Retry on the path's.
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
        except BaseException:  # e.g. ENOLCK on a network file system: no descriptor (or lock) left behind
            os.close(fd)
            raise
        os.close(fd)


def release_lock(path: str | Path, fd: int) -> None:
    """Release a lock taken by :func:`try_lock` (unlinked while still held, so nobody takes the old file)."""
    Path(path).unlink(missing_ok=True)
    os.close(fd)


def lock_holder(path: str | Path) -> str:
    """The pid a lock file of :func:`try_lock` names, or ``"?"``."""
    try:
        return Path(path).read_text().strip() or "?"
    except (OSError, UnicodeDecodeError):
        return "?"
