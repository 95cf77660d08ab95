"""Data pipeline speed: prepare time and loader throughput (samples/s to ready KJT batches).

Without ``--data`` the embedded Beauty data (data/amazon-beauty) is prepared into a temporary
directory (``din`` protocol, max_len 20, seed 0) and timed; the loader then walks its train split
in shuffled batches of 128 and ``--batch-size`` (default 1024). ``--json`` prints one JSON object
as the last line (``prepare_s``, ``loader_samples_per_s`` for ``--batch-size``, and the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from iacn_torchrec import versions
from iacn_torchrec.runtime import command_line

EMBEDDED = Path(__file__).resolve().parents[2] / "data" / "amazon-beauty"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, help="a prepared dataset directory (default: prepare the embedded one)"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=1024, help="main batch size measured (default: 1024)"
    )
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each setting at least this long")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def loader_throughput(ds, batch_size: int, min_seconds: float = 1.0, **kwargs) -> float:
    """Samples/s of ``BatchLoader(ds, "train", batch_size, shuffle=True, **kwargs)`` over whole epochs
    (at least ``min_seconds``), batches fully built (KJT + labels)."""
    from iacn_torchrec.data.loader import BatchLoader

    loader = BatchLoader(ds, "train", batch_size, shuffle=True, seed=0, **kwargs)
    for _ in zip(range(3), loader):  # warm the page cache and the allocator
        pass
    n, epoch, t0 = 0, 0, time.perf_counter()
    while True:
        loader.set_epoch(epoch)
        for b in loader:
            n += b.labels.shape[0]
        epoch += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return n / dt


def run(args: argparse.Namespace) -> int:
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.data.negatives import LogUniformNegatives
    from iacn_torchrec.data.prepare import prepare_dataset

    result: dict[str, object] = {"command": command_line(),
                                 "threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                                 "min_seconds": args.min_seconds, "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="iacn-bench-") as tmp:
        data = args.data
        if data is None:
            t0 = time.perf_counter()
            data = prepare_dataset(
                "tsv",
                interactions=EMBEDDED / "interactions.tsv.gz",
                items=EMBEDDED / "items.tsv.gz",
                protocol="din",
                max_len=20,
                seed=0,
                out=Path(tmp) / "beauty",
                progress=False,
            )
            result["prepare_s"] = round(time.perf_counter() - t0, 3)
            result["prepare_data"] = str(EMBEDDED)
            print(f"prepare (embedded Beauty, din, max_len 20): {result['prepare_s']:.2f} s")
        else:
            result["prepare_s"] = None
            result["data"] = str(data)
        ds = PreparedDataset.open(data)
        result["data_content_hash"] = ds.meta.get("content_hash")
        print(f"dataset: {ds}")
        sizes = sorted({128, args.batch_size})
        rates = {}
        for bs in sizes:
            rates[bs] = loader_throughput(ds, bs, args.min_seconds)
            print(
                f"loader  batch {bs:>5}: {rates[bs]:>14,.0f} samples/s  (uid,item,cate,hist_item,hist_cate)"
            )
        bs = args.batch_size
        extra = {
            "with_neg_hist": loader_throughput(ds, bs, args.min_seconds, with_neg_hist=True),
            "with_iacn_negatives_S10": loader_throughput(
                ds,
                bs,
                args.min_seconds,
                with_neg_hist=True,
                iacn_negatives=LogUniformNegatives(ds.item_count, 10, seed=0),
            ),
        }
        for k, v in extra.items():
            print(f"loader  batch {bs:>5} {k}: {v:>14,.0f} samples/s")
        result.update(
            {
                "batch_size": bs,
                "loader_samples_per_s": round(rates[bs]),
                "loader_samples_per_s_by_batch": {str(k): round(v) for k, v in rates.items()},
                **{f"loader_samples_per_s_{k}": round(v) for k, v in extra.items()},
            }
        )
    if args.json:
        print(json.dumps(result))
    return 0
