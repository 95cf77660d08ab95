"""Reproduce the IaCN paper's experiments on a prepared dataset (same as ``iacn reproduce``).

    python apps/reproduce.py --seeds 3 --epochs 1 --only table1
    python apps/reproduce.py --help

Writes markdown tables and PNG plots to ``docs/results/<dataset>/``; see
:mod:`iacn_torchrec.experiments.reproduce` for the options, the pairing and the resume rules.
"""

from __future__ import annotations

import sys

from iacn_torchrec.cli import main as iacn_main


def main(argv: list[str] | None = None) -> int:
    # through the `iacn` command itself: the same process defaults and one-line errors
    return iacn_main(["reproduce", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
