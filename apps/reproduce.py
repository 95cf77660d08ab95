"""Reproduce the IaCN paper's experiments on a prepared dataset (same as ``iacn reproduce``).

    python apps/reproduce.py --seeds 3 --epochs 1 --only table1
    python apps/reproduce.py --help

Writes markdown tables and PNG plots to ``docs/results/<dataset>/``; see
:mod:`iacn_torchrec.experiments.reproduce` for the options, the pairing and the resume rules.
"""

from __future__ import annotations

import argparse
import sys

from iacn_torchrec.experiments import reproduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apps/reproduce.py", description=reproduce.__doc__.splitlines()[0])
    reproduce.add_arguments(parser)
    return reproduce.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
