"""iacn-torchrec: the Interest-aware Capsule Network (IaCN) as an auxiliary task for TorchRec models."""

from __future__ import annotations

__version__ = "0.1.0"

# the stack every result records; fbgemm's distribution is fbgemm-gpu (CUDA) or fbgemm-gpu-cpu
_STACK = ("torch", "torchrec", ("fbgemm-gpu", "fbgemm-gpu-cpu"), "torchmetrics", "torchx", "iopath", "numpy")


def versions() -> dict[str, str]:
    """The versions recorded with every result (runs, benchmarks, plans, datasets, exports).

    Read from the installed distributions' metadata: nothing is imported, so ``iacn prepare`` does
    not pay for torch. A package that is not installed is recorded as ``"absent"``."""
    import platform
    from importlib import metadata

    out = {"iacn_torchrec": __version__, "iacn_torchrec_source": source_fingerprint(),
           "python": platform.python_version()}
    for names in _STACK:
        names = (names,) if isinstance(names, str) else names
        out[names[0].replace("-", "_")] = "absent"
        for name in names:
            try:
                out[names[0].replace("-", "_")] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


_SOURCE: str | None = None


def source_fingerprint() -> str:
    """``sha256:<16 hex>`` of this package's source files (Python and the C++ kernel; paths and
    contents): which code produced a result, with or without git (the version string does not
    change between commits)."""
    global _SOURCE
    if _SOURCE is None:
        import hashlib
        from pathlib import Path

        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".h")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
        _SOURCE = "sha256:" + h.hexdigest()[:16]
    return _SOURCE
