"""The project's C++ CPU kernels (``iacn_torchrec/csrc/<name>.cpp``), compiled on first use.

``torch.utils.cpp_extension`` builds each with g++ and ``ninja`` (``make install`` builds them
ahead, about 30 s each) and caches it under ``$TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``). When a kernel cannot be built, a warning says why once and its
callers run their ATen ops instead. ``IACN_FUSED_KERNEL=0`` turns every kernel off.

Kernels: ``iacn_fused`` (IaCN's loss, :mod:`iacn_torchrec.modules.fused_iacn`),
``din_attention`` (DIN's attention unit on a jagged history, :mod:`iacn_torchrec.models.layers`) and
``packed_recurrence`` (DIEN's GRU / AUGRU recurrence, :mod:`iacn_torchrec.models.dien`),
``concat_lookup`` (the main model's item-side views, :mod:`iacn_torchrec.modules.embeddings`) and
``next_behaviour_loss`` (DIEN's auxiliary loss, :mod:`iacn_torchrec.models.dien`) and ``dice`` (the
towers' Dice activation, :mod:`iacn_torchrec.models.layers`). Each defines its
autograd node in C++ or is called from a Python one; the C++ nodes run without the GIL. What they
share is in headers (``csrc/*.h``: the sigmoid MLP's later layers, a vectorised float exp), which
are part of every kernel's build key.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = ["KERNELS", "capturing_graph", "load_kernel", "kernels_enabled"]

KERNELS = ("iacn_fused", "din_attention", "packed_recurrence", "concat_lookup", "next_behaviour_loss", "dice")
_CSRC = Path(__file__).resolve().parent / "csrc"
_LOCK = threading.Lock()
_STATE: dict[str, dict[str, Any]] = {}


def capturing_graph(*tensors: Any) -> bool:
    """True while a graph is being captured: ``torch.compile``, TorchScript tracing, or fx tracing
    (an fx ``Proxy`` among ``tensors``). A kernel's call cannot be recorded in such a graph (a trace
    would keep its output as a constant), so callers run their ATen ops instead."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or any(isinstance(t, torch.fx.Proxy) for t in tensors))


def kernels_enabled() -> bool:
    """False when ``IACN_FUSED_KERNEL`` is 0 / false / no / off."""
    return os.environ.get("IACN_FUSED_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def _simd_level() -> str:
    """``avx2`` when torch's own CPU dispatch found AVX2 (or AVX-512) here, else ``base``."""
    return "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "base"


def _cflags() -> list[str]:
    # AVX2 + FMA only where the CPU has them (the build is cached per name, hence the level in it);
    # no trapping math: lets loops with divisions or clamps vectorise (we never read FP exception flags)
    simd = ["-mavx2", "-mfma"] if _simd_level() == "avx2" else []
    return ["-O3", "-fopenmp-simd", "-fno-trapping-math", *simd]


@contextlib.contextmanager
def _environment_ninja() -> Iterator[None]:
    """Runs the build with this Python environment's ``ninja`` (the one ``make install`` puts in the
    venv) ahead of any other on ``PATH``: ninja versions keep incompatible build logs, so a system
    ninja and the venv's (``make`` puts the venv first on ``PATH``, a plain ``.venv/bin/iacn``
    does not) would rebuild a kernel for each other."""
    bin_dir = Path(sys.executable).parent
    old = os.environ.get("PATH", "")
    if not (bin_dir / "ninja").exists():
        yield
        return
    os.environ["PATH"] = str(bin_dir) + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def build_name(name: str) -> str:
    """The extension's name, which is also its build directory under ``$TORCH_EXTENSIONS_DIR``:
    one per source text and location, compiler flags, torch and Python environment. Two checkouts
    or venvs on one machine (a clone beside a working tree, say) would otherwise share one
    directory, whose ``build.ninja`` names one checkout's source files, and rebuild it for each
    other on every first use (~30 s a kernel each time)."""
    import hashlib

    headers = [h.read_bytes() for h in sorted(_CSRC.glob("*.h"))]  # what the kernels #include
    key = b"\0".join([(_CSRC / f"{name}.cpp").read_bytes(), *headers, str(_CSRC).encode(),
                      " ".join(_cflags()).encode(),
                      torch.__version__.encode(), str(Path(torch.__file__).resolve().parent).encode(),
                      sys.prefix.encode()])
    return f"{name}_{_simd_level()}_{hashlib.sha256(key).hexdigest()[:12]}"


#: how long a load waits for another process's kernel lock before saying it waits for a build
ANNOUNCE_WAIT_S = 2.0


@contextlib.contextmanager
def build_lock(build_dir: str | Path, name: str) -> Iterator[None]:
    """Held while this process loads (and if need be builds) the kernel in ``build_dir``.

    torch's own build lock (``build_dir/lock``, a file that exists while a build runs) outlives a
    build that was killed, and every later load then waits for it forever, silently. This one is an
    ``flock``, which dies with its process: a process waiting for it says so, and a torch lock found
    while holding it is a dead build's (every build of these kernels holds this lock), so it is
    removed (warned)."""
    import fcntl

    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "iacn.lock", "a") as f:
        # another process loading a built kernel holds the lock for a fraction of a second (ranks
        # start in lockstep): only a longer wait, a build, is announced
        deadline = time.monotonic() + ANNOUNCE_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    print(f"iacn_torchrec: waiting for another process to finish building the {name} "
                          f"kernel ({build_dir})", file=sys.stderr, flush=True)
                    fcntl.flock(f, fcntl.LOCK_EX)
                    break
                time.sleep(0.05)
        baton = build_dir / "lock"
        if baton.exists():
            warnings.warn(f"iacn_torchrec: removing {baton}: a kernel build that was killed left it, and "
                          "every later load would wait for it", RuntimeWarning, stacklevel=3)
            baton.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_kernel(name: str) -> ModuleType | None:
    """The compiled kernel ``name`` (one of :data:`KERNELS`), or None when kernels are turned off
    or it cannot be built (warned once, with the reason; not retried in this process)."""
    if not kernels_enabled():
        return None
    with _LOCK:
        state = _STATE.setdefault(name, {})
        if "module" not in state:
            state["module"] = None
            try:
                from torch.utils.cpp_extension import _get_build_directory, load

                ext = build_name(name)
                build_dir = Path(_get_build_directory(ext, verbose=False))
                with build_lock(build_dir, name), _environment_ninja():
                    if not (build_dir / f"{ext}.so").exists():  # a first use: say why it takes a while
                        print(f"iacn_torchrec: building the fused {name} kernel (once per machine and "
                              "environment, ~30 s)", file=sys.stderr, flush=True)
                    state["module"] = load(name=ext, sources=[str(_CSRC / f"{name}.cpp")],
                                           extra_cflags=_cflags(), verbose=False)
            except Exception as e:  # no compiler / ninja / headers: the ATen path still works
                state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"iacn_torchrec: the fused {name} kernel could not be built ({state['error'][:300]}); "
                    "the (slower) ATen ops run instead", RuntimeWarning, stacklevel=2)
        return state["module"]
