"""Process settings for CPU training and evaluation, applied by the ``iacn`` command.

Both are about the 2-core CPU box this project is measured on (docs/results/performance-log.md):

* ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads spin by default; on a shared or oversubscribed
  box that made a 2-thread step 10-100x slower. It must be set before torch is imported.
* glibc's allocator keeps freed memory (:func:`keep_freed_memory`): by default it unmaps freed
  blocks above a (moving) threshold and trims the heap, so a loop that allocates the same
  multi-MiB tensors every batch page-faults them in afresh each time; evaluation batches of 2,048
  took ~62k minor faults per pass over the Beauty test split, ~1k with this setting.

A variable already in the environment wins (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``OMP_WAIT_POLICY``); with another allocator preloaded (jemalloc, tcmalloc) the glibc setting is
harmless.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["MALLOC_ENV", "apply_process_defaults", "command_line", "keep_freed_memory", "show_progress"]

#: blocks up to 32 MiB come from the heap (not a fresh mmap), and the heap is trimmed only when
#: 512 MiB sit free at its top. As environment variables, for child processes (glibc reads them at start).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20)}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Applies :data:`MALLOC_ENV` to this process through glibc's ``mallopt``.

    Returns True when applied; False without glibc or when either variable is set in the
    environment (the user's choice, which glibc has already read)."""
    if any(k in os.environ for k in MALLOC_ENV):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]))
    ok &= mallopt(_M_TRIM_THRESHOLD, int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]))
    return bool(ok)


def apply_process_defaults() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` (unless set) and :func:`keep_freed_memory`; call before torch is
    imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` for a command's ``--threads``, refusing a count below 1 with
    a `UserError` (torch's own refusal is a RuntimeError: a traceback)."""
    import torch

    from iacn_torchrec.errors import UserError

    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def show_progress(requested: bool) -> bool:
    """Whether to draw a progress bar: when ``requested`` and stderr is a terminal. Elsewhere (TorchX,
    CI, a redirected log) every refresh of a bar would become a line of the log."""
    import sys

    return bool(requested) and sys.stderr.isatty()


def command_line() -> str:
    """This process's command as a user would type it again (results record it): ``iacn ...`` for
    the CLI, else ``python SCRIPT ...`` with the script relative to the repository when inside it."""
    import shlex
    import sys
    from pathlib import Path

    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else "iacn"
    if prog in ("iacn", "cli.py", "__main__.py"):
        return shlex.join(["iacn", *argv[1:]])
    script = Path(argv[0]).resolve()
    repo = Path(__file__).resolve().parents[1]
    shown = str(script.relative_to(repo)) if script.is_relative_to(repo) else argv[0]
    return shlex.join(["python", shown, *argv[1:]])
