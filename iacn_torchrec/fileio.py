"""Writing results so that a crash never leaves half a file or half a folder behind.

Every file a run or a tool publishes (metrics, tables, plots, manifests) goes through
:func:`write_atomic` or :func:`save_figure`; a finished folder replaces an earlier one through
:func:`replace_dir`. Each writes next to the target first and renames: a reader sees the old
content or the new, never a mix.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "save_figure", "replace_dir"]


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig(path, **kwargs)`` atomically. As ``savefig`` does, the format follows
    ``path``'s suffix, and a path without one gets matplotlib's default format and its suffix."""
    path = Path(path)
    if "format" not in kwargs:
        import matplotlib

        kwargs["format"] = path.suffix[1:] or matplotlib.rcParams["savefig.format"]
        if not path.suffix:
            path = path.with_name(f"{path.name}.{kwargs['format']}")
    tmp = _sibling(path, "tmp")
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
        old = _sibling(target, "old")
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
