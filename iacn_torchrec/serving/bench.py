"""Exported vs eager model: samples/s and p50/p99 latency per batch size, in one run.

``iacn bench serve --run RUN_DIR [--model MODEL_DIR] [--batch-sizes 1,64,1024] [--json]``

*eager*: the trained ``CTRWithIaCN.predict`` on the loader's ``Batch`` (KJT → TorchRec
``EmbeddingCollection`` lookups of ``E_orig`` and ``E_aux`` → padding → main model; IaCN is not run).
*exported*: the TorchScript artefact on padded id tensors (merged tables, same main model); with
``model_int8.pt`` present, also the int8-table variant. Inputs are built before timing (test-split
samples, cycled), so only the model call is timed; the variants are called in turn (round robin)
so that noise from other processes hits them alike. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iacn_torchrec import versions
from iacn_torchrec.errors import UserError
from iacn_torchrec.runtime import command_line

__all__ = ["time_interleaved", "bench_serve", "add_arguments", "run"]


def time_interleaved(
    fns: dict[str, Any],
    inputs: dict[str, list[Any]],
    rows: int,
    min_seconds: float,
    min_rounds: int = 20,
    warmup: int = 10,
) -> dict[str, dict[str, float]]:
    """Time every ``fns[name](x)`` over its ``inputs[name]``, interleaved: each round calls every
    variant once, so load from other processes hits all variants alike (these boxes are shared).
    ``rows``: samples per call (each input's real batch, not the size asked for).

    Returns per variant: samples/s (``rows · calls / Σ latency``), p50 / p99 / mean latency (ms).
    """
    lat: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for i in range(warmup):
            for k, fn in fns.items():
                fn(inputs[k][i % len(inputs[k])])
        start = time.perf_counter()
        i = 0
        while i < min_rounds or time.perf_counter() - start < min_seconds * len(fns):
            for k, fn in fns.items():
                x = inputs[k][i % len(inputs[k])]
                t0 = time.perf_counter()
                fn(x)
                lat[k].append(time.perf_counter() - t0)
            i += 1
    out = {}
    for k, v in lat.items():
        a = np.array(v) * 1e3
        out[k] = {
            "samples_per_s": rows * len(a) / (a.sum() / 1e3),
            "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()),
            "calls": len(a),
        }
    return out


def bench_serve(
    run_dir: str,
    model_dir: str | None = None,
    batch_sizes: tuple[int, ...] = (1, 64, 1024),
    min_seconds: float = 1.0,
    max_batches: int = 32,
    data: str | None = None,
) -> dict:
    """Benchmark rows ``{variant, batch_size, rows_per_batch, samples_per_s, p50_ms, p99_ms, ...}`` plus
    the setup. A batch size larger than the test split is timed on the whole split: ``rows_per_batch``
    (the samples each call really scores, what samples/s counts) is then smaller than ``batch_size``."""
    bad = [b for b in batch_sizes if b < 1]
    if not batch_sizes or bad:
        raise UserError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    from iacn_torchrec.data.loader import BatchLoader
    from iacn_torchrec.serving.artifact import ServingArtifact
    from iacn_torchrec.serving.export import export_run, load_run, split_inputs

    run = load_run(run_dir, data=data)
    tmp = None
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="iacn-bench-serve-")
        model_dir = str(Path(tmp.name) / "model")
        export_run(run_dir, model_dir, data=data, check_samples=1024)
    try:  # a damaged artefact: one line naming the file, as `iacn score` says it
        art = ServingArtifact.load(model_dir)
        variants = {"exported": art.model}
        if (Path(model_dir) / "model_int8.pt").is_file():
            variants["exported_int8"] = ServingArtifact.load(model_dir, int8=True).model
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    # timed against this run's eager model: it must be this run's export (model and data)
    wanted = {"model": run.config.model.name, "data.content_hash": run.ds.meta.get("content_hash")}
    has = {"model": art.manifest.get("model"), "data.content_hash": (art.manifest.get("data") or {}).get(
        "content_hash")}
    differ = [f"{k} {has[k]!r} (the run's {wanted[k]!r})" for k in wanted if has[k] != wanted[k]]
    if differ:
        raise UserError(f"{model_dir}: not an export of {run_dir}: its {', '.join(differ)}; export this run "
                        "(iacn export --run RUN) or leave out --model")
    tl = run.test_loader
    need = max(batch_sizes) * max_batches
    inputs, _ = split_inputs(run.ds, limit=need)
    n = inputs[0].shape[0]
    if n == 0:
        raise UserError(f"{run.ds.path}: the test split is empty: nothing to time")
    rows = []
    for B in batch_sizes:
        nb = max(1, min(max_batches, n // B))
        loader = BatchLoader(
            run.ds,
            "test",
            batch_size=B,
            with_neg_hist=tl.with_neg_hist,
            iacn_negatives=tl.iacn_negatives,
            limit=nb * B,
        )
        eager_batches = list(loader)
        padded = [tuple(t[i * B : (i + 1) * B] for t in inputs) for i in range(nb)]
        fns = {"eager": run.model.predict} | {name: (lambda x, m=m: m(*x)) for name, m in variants.items()}
        ins = {"eager": eager_batches} | {name: padded for name in variants}
        real = min(B, n)  # B > n: one batch of the whole split, so samples/s counts n per call
        for name, r in time_interleaved(fns, ins, real, min_seconds).items():
            rows.append({"variant": name, "batch_size": B, "rows_per_batch": real, **r})
    if tmp is not None:
        tmp.cleanup()
    for row in rows:
        base = next(x for x in rows if x["variant"] == "eager" and x["batch_size"] == row["batch_size"])
        row["speedup_vs_eager"] = row["samples_per_s"] / base["samples_per_s"]
    return {
        "command": command_line(),
        "run": str(run_dir),
        "exported_model": None if tmp is not None else str(model_dir),  # None: exported to a temporary folder
        "exported_model_graph_sha256": art.manifest.get("graph_sha256"),
        "data_content_hash": run.ds.meta.get("content_hash"),
        "min_seconds": min_seconds,
        "model": run.config.model.name,
        "iacn_trained": bool(run.config.iacn.enabled),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "versions": versions(),
        "rows": rows,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run directory")
    parser.add_argument("--model", help="its exported model directory (default: export to a temp dir)")
    parser.add_argument("--data", help="prepared dataset (default: the run's data.path)")
    parser.add_argument("--batch-sizes", default="1,64,1024")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time per (variant, batch size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    from iacn_torchrec.runtime import set_threads

    set_threads(args.threads)
    try:
        sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:  # before loading anything (0 would divide by zero)
        print(
            f"iacn bench serve: --batch-sizes {args.batch_sizes!r}: expected sizes >= 1, e.g. 1,64,1024",
            file=sys.stderr,
        )
        return 2
    res = bench_serve(args.run, args.model, sizes, args.min_seconds, data=args.data)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(
        f"{res['model']} ({'IaCN-trained' if res['iacn_trained'] else 'plain'}), {res['threads']} thread(s), "
        f"torch {res['torch']}"
    )
    # calls: how many latencies the percentiles rest on (p99 of 20 calls is close to their maximum)
    print(f"{'variant':<15}{'batch':>7}{'samples/s':>13}{'p50 ms':>10}{'p99 ms':>10}{'vs eager':>10}"
          f"{'calls':>8}")
    for r in res["rows"]:
        print(
            f"{r['variant']:<15}{r['rows_per_batch']:>7}{r['samples_per_s']:>13,.0f}{r['p50_ms']:>10.3f}"
            f"{r['p99_ms']:>10.3f}{r['speedup_vs_eager']:>9.2f}x{r['calls']:>8,}"
        )
    for b in sorted({r["batch_size"] for r in res["rows"] if r["rows_per_batch"] < r["batch_size"]}):
        n = next(r["rows_per_batch"] for r in res["rows"] if r["batch_size"] == b)
        print(f"note: batch size {b:,} exceeds the test split: timed on its {n:,} rows")
    return 0
