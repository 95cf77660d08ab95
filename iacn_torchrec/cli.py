"""iacn: the Interest-aware Capsule Network (IaCN) for TorchRec CTR models; its commands below.

Each subcommand lives beside the code it drives, in a module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, importing the
module lazily so ``iacn prepare`` does not pay for importing the training stack.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from iacn_torchrec.errors import TrainingInterrupted, UserError, report_error
from iacn_torchrec.runtime import apply_process_defaults

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("iacn_torchrec.data.prepare_cli", "build a prepared dataset from raw files"),
    "train": ("iacn_torchrec.train.cli", "train a CTR model with or without IaCN"),
    "evaluate": ("iacn_torchrec.train.evaluate", "evaluate a run's checkpoint: AUC, GAUC, log-loss"),
    "demo": ("iacn_torchrec.train.demo", "prepare the embedded data, train DIN and DIN+IaCN"),
    "reproduce": ("iacn_torchrec.experiments.reproduce", "reproduce the paper's tables on a dataset"),
    "plan": ("iacn_torchrec.distributed.plan_cli", "plan sharding with and without IaCN tables"),
    "export": ("iacn_torchrec.serving.export", "export an inference artefact (IaCN dropped)"),
    "score": ("iacn_torchrec.serving.score", "score samples with an exported model"),
    "explain": ("iacn_torchrec.serving.explain", "show a user's interest capsules"),
}
# `iacn bench <what>`
BENCHES: dict[str, tuple[str, str]] = {
    "data": ("iacn_torchrec.data.bench", "prepare time and loader throughput"),
    "train": ("iacn_torchrec.train.bench", "training throughput vs peers, IaCN overhead, scaling"),
    "serve": ("iacn_torchrec.serving.bench", "exported vs eager model latency and throughput"),
}


def _add(sub: argparse._SubParsersAction, name: str, module: str, help_: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):  # subcommand not built yet: hide it
            return
        raise
    p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iacn", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Import only the module asked for, when one is named (fast start, no unrelated imports).
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_) in COMMANDS.items():
        if wanted in (None, name):
            _add(sub, name, module, help_)
        else:
            sub.add_parser(name, help=help_)
    bench = sub.add_parser("bench", help="benchmarks (data, train, serve)")
    bsub = bench.add_subparsers(dest="bench", metavar="WHAT")
    bwanted = argv[1] if wanted == "bench" and len(argv) > 1 else None
    for name, (module, help_) in BENCHES.items():
        if wanted in (None, "bench") and bwanted in (None, name):
            _add(bsub, name, module, help_)
        else:
            bsub.add_parser(name, help=help_)
    return parser


def _quiet_known_warnings() -> None:
    """Notes that torch and TorchRec's own code trigger, which a user can do nothing about (every
    rank repeats them): torch.fx's tracing note on import, and TorchRec 1.8's deprecations of
    ShardedTensor and DDP's ``broadcast_buffers`` (its DMP passes it; our checkpoints convert
    ShardedTensors to portable shards)."""
    import logging
    import warnings

    logging.getLogger("torch.fx._symbolic_trace").addFilter(
        lambda record: "is_fx_tracing will return true" not in record.getMessage()
    )
    for message in ("Please use DTensor instead and we are deprecating ShardedTensor",
                    "`broadcast_buffers` is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    # before torch is imported: OMP_WAIT_POLICY=PASSIVE, and glibc keeps freed memory (runtime.py)
    apply_process_defaults()
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(run(args) or 0)
    except TrainingInterrupted as e:  # stopped by a signal after checkpointing: resumable
        report_error(f"iacn {args.command}: {e}")
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C outside a run's step loop, or a second one inside it
        report_error(f"iacn {args.command}: interrupted")
        return 130
    # bad input, config or paths (a missing run, an output path that is a file): the message, which
    # names the path, and no traceback (other OS errors, e.g. a full disk mid-run, keep theirs)
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, FloatingPointError) as e:  # FloatingPointError: a run diverged (train)
        what = " ".join(x for x in (args.command, getattr(args, "bench", None)) if x)
        report_error(f"iacn {what}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
