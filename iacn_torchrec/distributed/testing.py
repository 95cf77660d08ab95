"""Helpers for multi-process tests and benchmarks: spawning gloo ranks, a tiny prepared dataset,
joining per-rank batches into the global batch.

Worker functions handed to :func:`spawn` must be importable by name (module-level functions), as
``torch.multiprocessing`` starts fresh interpreters.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["free_port", "spawn", "init_gloo", "write_tiny_dataset", "concat_batches"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Environment as torchrun sets it, then the default gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    try:
        init_gloo(rank, world_size, port)
        fn(rank, world_size, *args)
        # every rank done, and every collective still in flight finished (a train pipeline left
        # mid-epoch has the next batch's input all-to-all pending): destroying the group under a
        # pending gloo op aborts the process ("terminate called without an active exception")
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, threads: int = 1) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in a gloo group;
    raises if any rank fails (``torch.multiprocessing`` re-raises the child's error)."""
    mp.start_processes(_entry, args=(fn, world_size, free_port(), threads, args), nprocs=world_size,
                       join=True, start_method="spawn")


def write_tiny_dataset(
    out: str | Path,
    num_users: int = 40,
    num_items: int = 60,
    num_cates: int = 7,
    n_train: int = 64,
    n_test: int = 48,
    hist_len: int = 5,
    max_len: int = 6,
    seed: int = 0,
) -> Path:
    """A small prepared dataset (the store's own writer) shaped for exact multi-rank comparisons.

    Labels alternate 1, 0, 1, 0 … in file order and every history has exactly ``hist_len``
    behaviours, so any even-sized contiguous slice holds the same number of positives and of
    history positions: per-rank means (BCE, ``L_IaCN`` over positives, DIEN's auxiliary loss over
    history positions) then average to the global-batch means exactly.
    """
    from iacn_torchrec.data.protocols import BuiltDataset, SplitArrays
    from iacn_torchrec.data.sources import Report
    from iacn_torchrec.data.store import write_dataset

    rng = np.random.default_rng(seed)
    item2cate = np.r_[0, rng.integers(1, num_cates + 1, num_items)].astype(np.int64)

    def split(n: int) -> SplitArrays:
        item = rng.integers(1, num_items + 1, n)
        hist = rng.integers(1, num_items + 1, n * hist_len)
        neg = rng.integers(1, num_items + 1, n * hist_len)
        return SplitArrays(
            uid=rng.integers(1, num_users + 1, n).astype(np.int64),
            item=item.astype(np.int64),
            cate=item2cate[item],
            label=(np.arange(n) % 2 == 0).astype(np.int8),
            hist_offsets=np.arange(n + 1, dtype=np.int64) * hist_len,
            hist_item=hist.astype(np.int64),
            hist_cate=item2cate[hist],
            neg_hist_item=neg.astype(np.int64),
            neg_hist_cate=item2cate[neg],
        )

    train, test = split(n_train), split(n_test)
    item_count = np.bincount(np.r_[train.item, train.hist_item], minlength=num_items + 1).astype(np.int64)
    built = BuiltDataset(
        protocol="din",
        splits={"train": train, "test": test},
        item2cate=item2cate,
        item_count=item_count,
        vocabs={"uid": np.array([f"u{i}" for i in range(1, num_users + 1)]),
                "item": np.array([f"i{i}" for i in range(1, num_items + 1)]),
                "cate": np.array([f"c{i}" for i in range(1, num_cates + 1)])},
        counts={"users": num_users, "items": num_items, "categories": num_cates, "interactions": 0,
                "train_samples": n_train, "train_positives": int(train.label.sum()),
                "test_samples": n_test, "test_positives": int(test.label.sum())},
        report=Report(),
    )
    return write_dataset(built, out, {"source": {"type": "synthetic"}, "max_len": max_len, "seed": seed})


def concat_batches(batches: list[Any]) -> Any:
    """Join per-rank ``Batch``es (same keys) into one batch, rank 0's samples first."""
    from iacn_torchrec.data.loader import Batch

    keys = batches[0].sparse_features.keys()
    values, lengths = [], []
    for k in keys:
        for b in batches:
            jt = b.sparse_features[k]
            values.append(jt.values())
            lengths.append(jt.lengths())
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    return Batch(sparse_features=kjt, labels=torch.cat([b.labels for b in batches]))
