"""Distributed training throughput: 1 process vs 2 gloo processes (TW / CW / RW), one run.

Every arm trains DIN+IaCN on the same prepared dataset with the same per-rank batch size, with
``--threads`` torch threads split over its processes (at least one each), through the same code
path as ``iacn train`` (``build_training`` → ``setup.train_steps``, TrainPipelineSparseDist when
sharded). All but ``1p plain`` train their tables with fused row-wise Adagrad (dims 16: FBGEMM
needs multiples of 4). Arms:

* ``1p plain``: one process, unsharded model, Adam on every table, IaCN on its worker thread beside
  the main backward (the ``iacn train`` defaults): one thread more than ``--threads`` while the
  backward runs; the sharded arms run IaCN in the main thread;
* ``1p dmp``: one process, DistributedModelParallel, fused tables;
* ``2p tw`` / ``2p cw`` / ``2p rw``: two gloo processes, every table table-/column-/row-wise.

Step time is the median wall time of a step on rank 0 after ``--warmup`` steps; samples/s counts
the global batch (ranks × batch) over the median step time (robust to other jobs on a shared
machine; the mean-based figure is in the JSON). ``--repeats R`` runs the arms round-robin R times
and reports each arm's median over the repeats (use at least 3: the median of 2 is their mean, so
one repeat disturbed by another job would set it). Prints a table and, with ``--out``, writes JSON.

    python apps/dist_bench.py --data prepared/amazon-beauty-din-L20-s0 [--steps 60] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TABLES = ("uid", "item_orig", "cate_orig", "item_aux", "cate_aux")
ARMS = {
    "1p plain": (1, "adam", None),
    "1p dmp": (1, "rowwise_adagrad", None),
    "2p tw": (2, "rowwise_adagrad", "table_wise"),
    "2p cw": (2, "rowwise_adagrad", "column_wise"),
    "2p rw": (2, "rowwise_adagrad", "row_wise"),
}


def _config(data: str, batch: int, optimizer: str, sharding: str | None, threads: int, out: str):
    from iacn_torchrec.train.config import TrainConfig

    return TrainConfig.from_dict({
        "data": {"path": data, "batch_size": batch, "drop_last": True},
        "model": {"name": "din", "emb_dim": 16, "user_dim": 16},
        "iacn": {"enabled": True, "aux_dim": 16},
        "optim": {"embedding_optimizer": optimizer},
        "distributed": {"sharding_types": {t: sharding for t in TABLES} if sharding else {}},
        "threads": threads, "progress": False, "out": out, "seed": 0,
    })


def worker(rank: int, world_size: int, arm: str, args: dict, result_path: str) -> None:
    import torch

    _, optimizer, sharding = ARMS[arm]
    threads = max(1, args["threads"] // world_size)
    torch.set_num_threads(threads)
    out = tempfile.mkdtemp(prefix="dist_bench-")  # the run's own folder; nothing in it is kept
    try:
        _measure(rank, world_size, arm, args, result_path, optimizer, sharding, threads, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _measure(rank: int, world_size: int, arm: str, args: dict, result_path: str, optimizer: str,
             sharding: str | None, threads: int, out: str) -> None:
    import torch.distributed as dist

    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.distributed.setup import build_training
    from iacn_torchrec.train.loop import make_loaders, seed_everything

    config = _config(args["data"], args["batch_size"], optimizer, sharding, threads, out)
    seed_everything(config.seed)
    ds = PreparedDataset.open(config.data.path)
    train_loader, _, item_log_q = make_loaders(config, ds, rank, world_size)
    train_loader.set_epoch(0)
    setup = build_training(config, ds, item_log_q=item_log_q, rank=rank, world_size=world_size)
    setup.model.train()
    n = args["warmup"] + args["steps"]
    times = []
    dist.barrier()
    t_prev = time.perf_counter()
    for i, (loss, _) in enumerate(setup.train_steps(train_loader)):
        float(loss)  # the step is done when its loss is on the host
        t = time.perf_counter()
        if i >= args["warmup"]:
            times.append(t - t_prev)
        t_prev = t
        if i + 1 == n:
            break
    dist.barrier()
    if rank == 0:
        total = sum(times)
        res = {"arm": arm, "world_size": world_size, "threads_per_process": threads,
               "sharding": sharding or ("-" if not setup.sharded else "planner"),
               "table_optimizer": optimizer,
               "batch_per_rank": args["batch_size"], "steps": len(times),
               "step_ms_median": 1000 * statistics.median(times),
               "step_ms_mean": 1000 * total / len(times),
               "samples_per_s": world_size * args["batch_size"] / statistics.median(times),
               "samples_per_s_mean": world_size * args["batch_size"] * len(times) / total}
        Path(result_path).write_text(json.dumps(res))


def check_args(a: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (one line naming the option), checked in this process
    before any worker is spawned; ``None`` when they are fine."""
    for opt, v, least in (("--batch-size", a.batch_size, 1), ("--steps", a.steps, 1),
                          ("--warmup", a.warmup, 0), ("--threads", a.threads, 1),
                          ("--repeats", a.repeats, 1)):
        if v < least:
            return f"{opt} must be >= {least}, got {v}"
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.errors import UserError
    from iacn_torchrec.fileio import check_output_path

    try:
        if a.out:
            check_output_path(a.out, "--out")
    except UserError as e:
        return str(e)
    try:
        n = len(PreparedDataset.open(a.data).split("train").label)
    except UserError as e:
        return f"--data {e}"
    world = max(ARMS[arm][0] for arm in a.arms)
    per_epoch = n // (a.batch_size * world)
    if per_epoch < a.warmup + a.steps:
        return (f"--batch-size {a.batch_size}: the train split ({n} samples) holds {per_epoch} steps of "
                f"{world} × {a.batch_size}, fewer than --warmup + --steps = {a.warmup + a.steps}")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--batch-size", type=int, default=128, help="per-rank batch")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total, split over the processes")
    p.add_argument("--repeats", type=int, default=1, help="round-robin repeats of all arms")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    err = check_args(a)
    if err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    from iacn_torchrec.distributed.testing import spawn

    args = {"data": a.data, "batch_size": a.batch_size, "steps": a.steps, "warmup": a.warmup,
            "threads": a.threads}
    runs: dict[str, list[dict]] = {arm: [] for arm in a.arms}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for arm in a.arms:
                path = str(Path(tmp) / "r.json")
                spawn(worker, ARMS[arm][0], arm, args, path, threads=max(1, a.threads // ARMS[arm][0]))
                r = json.loads(Path(path).read_text())
                runs[arm].append(r)
                print(f"[{rep + 1}/{a.repeats}] {arm}: {r['step_ms_median']:.1f} ms/step (median), "
                      f"{r['step_ms_mean']:.1f} (mean)", file=sys.stderr)
    rows = []
    for rs in runs.values():
        row = dict(rs[0])
        for k in ("step_ms_median", "step_ms_mean", "samples_per_s", "samples_per_s_mean"):
            row[k] = statistics.median(r[k] for r in rs)
        row["repeats"] = rs
        rows.append(row)
    base = rows[0]["samples_per_s"]
    print(f"\nDIN+IaCN on {a.data}: per-rank batch {a.batch_size}, --threads {a.threads} split over the "
          "processes (at least 1 each), "
          f"{a.steps} timed steps after {a.warmup} warm-up, median of {a.repeats} round-robin repeat(s)")
    print("| arm | processes | threads/process | tables | table optimizer | step (ms, median) | samples/s | "
          f"vs {rows[0]['arm']} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['world_size']} | {r['threads_per_process']} | {r['sharding']} | "
              f"{r['table_optimizer']} | "
              f"{r['step_ms_median']:.1f} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / base:.2f}× |")
    if a.out:
        from iacn_torchrec import versions

        doc = {"command": " ".join(sys.argv), "versions": versions(), "rows": rows}
        from iacn_torchrec.fileio import write_atomic

        write_atomic(a.out, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
