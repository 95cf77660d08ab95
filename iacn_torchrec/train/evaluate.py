"""Evaluate a trained run's checkpoint: test AUC, GAUC and log-loss on a split of its dataset.

``iacn evaluate --run RUN_DIR [--step N] [--split test|train] [--limit N] [--data DIR] [--json]``

The run's model is rebuilt from its ``config.yaml`` and its newest (or ``--step``'s) complete
checkpoint (:func:`~iacn_torchrec.serving.export.load_run`: the checkpoint's configuration
fingerprint and the dataset's content hash must match), then scored with the eager model exactly as
``iacn train`` evaluates (:func:`~iacn_torchrec.train.loop.evaluate`; IaCN is not run at
evaluation). The test split is read as training read it (its ``data.num_test_samples`` and
``data.eval_batch_size``), so the final checkpoint gives the test figures that ``metrics.json``
recorded (to rounding, for a run trained ``--compile``-d or on a GPU: this is the eager CPU model).
(A sharded run averages its ranks' BatchNorm / Dice running statistics after every step;
one trained before that kept a set per rank, evaluated with them, and its checkpoint holds rank 0's:
there the figures differ a little and none are shown as recorded.) ``--split train`` scores the
training samples in file order.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from iacn_torchrec.errors import UserError
from iacn_torchrec.runtime import set_threads

__all__ = ["evaluate_run", "add_arguments", "run"]

SPLITS = ("test", "train")


def evaluate_run(
    run_dir: str | Path, step: int | None = None, split: str = "test", limit: int | None = None,
    data: str | None = None, batch_workers: int | None = None,
) -> dict[str, Any]:
    """``{run, step, split, samples, auc, gauc, logloss, recorded}`` of ``run_dir``'s checkpoint
    (newest, or ``step``) on ``split`` (its first ``limit`` samples; the test split defaults to what
    training evaluated). ``recorded``: ``metrics.json``'s test figures when they are of this very
    evaluation (the final step, the same test samples), else None."""
    from iacn_torchrec.data.loader import BatchLoader
    from iacn_torchrec.serving.export import load_run
    from iacn_torchrec.train.loop import eval_threads, evaluate

    if split not in SPLITS:
        raise UserError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    r = load_run(run_dir, data=data, step=step, doing="evaluating")
    tl = r.test_loader
    if split == "test" and limit is None:
        loader = tl  # as training evaluated: data.num_test_samples, data.eval_batch_size
    else:
        loader = BatchLoader(r.ds, split, batch_size=r.config.data.eval_batch_size, shuffle=False,
                             placeholder_features=True, with_neg_hist=tl.with_neg_hist,
                             iacn_negatives=tl.iacn_negatives, limit=limit)
    if loader.num_samples == 0:
        raise UserError(f"{r.ds.path}: the {split} split is empty: nothing to evaluate")
    if batch_workers is None:  # as the run's own evaluation: its eval_threads, or the machine's cores
        batch_workers = eval_threads(r.config, 1)
    m = evaluate(r.model, loader, batch_workers=batch_workers)
    test = r.metrics.get("test")
    # a sharded run trained before its ranks' BatchNorm / Dice statistics were averaged each step kept
    # one set per rank and evaluated its share of the test split with it; the checkpoint holds rank
    # 0's, so its scores are not that evaluation
    same = (split == "test" and loader is tl and r.step == r.metrics.get("steps") and isinstance(test, dict)
            and test.get("samples") == loader.num_samples  # config.yaml's num_test_samples may be edited
            and (r.metrics.get("world_size", 1) == 1 or r.metrics.get("running_statistics_averaged")))
    figures = ("auc", "gauc", "logloss")
    return {"run": str(run_dir), "step": r.step, "split": split, "samples": loader.num_samples,
            **{k: _finite(m[k]) for k in figures},
            "recorded": {k: _finite(test.get(k)) for k in figures} if same else None}


def _finite(x: Any) -> float | None:
    """A figure for strict JSON: None for NaN (an AUC over samples of one label) and for what is not
    a number (a damaged metrics.json's)."""
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="training run directory (iacn train --out)")
    p.add_argument("--step", type=int, default=None,
                   help="evaluate this checkpoint step (default: the newest)")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--limit", type=int, default=None, help="only the split's first N samples")
    p.add_argument("--data", default=None, help="the prepared dataset (default: the run's data.path)")
    p.add_argument("--threads", type=int, default=None,
                   help="batches scored at once, one thread each (default: the run's eval_threads, else "
                   "the machine's cores)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        set_threads(args.threads)  # refuses a count below 1
    res = evaluate_run(args.run, step=args.step, split=args.split, limit=args.limit, data=args.data,
                       batch_workers=args.threads)
    if args.json:
        print(json.dumps(res))
        return 0
    def shown(figures: dict[str, float | None]) -> str:
        return "  ".join(f"{name} {'n/a' if figures[k] is None else format(figures[k], '.4f')}"
                         for k, name in (("auc", "AUC"), ("gauc", "GAUC"), ("logloss", "logloss")))

    print(f"{res['run']} step {res['step']}, {res['split']} split ({res['samples']:,} samples): {shown(res)}")
    if res["recorded"]:
        print(f"  metrics.json (end of training): {shown(res['recorded'])}")
    return 0
