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

    out = {"iacn_torchrec": __version__, "python": platform.python_version()}
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
