"""Prepared dataset -> ``Batch(KeyedJaggedTensor, labels)``.

``PreparedDataset.open(DIR)`` memory-maps every array (``np.load(mmap_mode="r")``): a dataset
larger than RAM streams from the page cache. ``BatchLoader`` walks one split in batches:

* **Order.** ``shuffle=True``: the permutation ``default_rng([seed, epoch]).permutation(N)``
  (call :meth:`BatchLoader.set_epoch` each epoch); ``shuffle=False``: file order.
* **Ranks.** The epoch is cut into *global* batches of ``world_size × batch_size`` samples; rank
  ``r`` reads the contiguous slice ``[r·batch_size, (r+1)·batch_size)`` of each. A last partial
  global batch of ``n`` samples is split evenly and contiguously: rank ``r`` takes
  ``[⌊r·n/W⌋, ⌊(r+1)·n/W⌋)``, so local sizes differ by at most one (a rank gets an empty batch,
  ``B = 0``, only when ``n < world_size``); ``drop_last=True`` drops it on every rank, and so does
  ``min_last_batch=m`` when a rank's share would be below ``m`` (training uses 2), while
  ``merge_short_last=True`` (evaluation) joins a last batch smaller than ``world_size`` to the one
  before, so that no rank gets an empty batch (a sharded forward cannot take one). Every other
  sample is read exactly once per epoch over all ranks, and every rank yields ``len(loader)``
  batches.
* **Resume.** :meth:`state_dict` holds the epoch and the index of the next batch;
  :meth:`load_state_dict` makes the next ``iter()`` continue from there with the same order and
  the same sampled negatives.

KJT keys, in order: ``uid``, ``item``, ``cate`` (length 1), ``hist_item``, ``hist_cate`` (length =
history length, oldest first), with ``with_neg_hist`` ``neg_hist_item``, ``neg_hist_cate`` (same
lengths), with an IaCN sampler ``iacn_neg_item``, ``iacn_neg_cate`` (length S for each label-1
sample, 0 for label-0 samples: ``L_IaCN`` scores positives only, so a negative's negatives would be
looked up, sent and dropped). Values and lengths are int64.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from iacn_torchrec.data.negatives import NegativeSampler, PopularityNegativeBehaviours
from iacn_torchrec.data.protocols import SPLIT_ARRAYS, SplitArrays, jagged_index
from iacn_torchrec.data.sources import DataError
from iacn_torchrec.data.store import (
    _AGAIN,
    META,
    check_vocab_bytes,
    check_vocab_lines,
    content_hash,
    read_meta,
)

__all__ = [
    "Batch",
    "PreparedDataset",
    "BatchLoader",
    "BASE_KEYS",
    "NEG_HIST_KEYS",
    "IACN_NEG_KEYS",
]

BASE_KEYS = ["uid", "item", "cate", "hist_item", "hist_cate"]
NEG_HIST_KEYS = ["neg_hist_item", "neg_hist_cate"]
IACN_NEG_KEYS = ["iacn_neg_item", "iacn_neg_cate"]


@dataclass
class Batch(Pipelineable):
    """One batch: ``sparse_features`` (KJT, keys above) and ``labels`` float32 ``[B]``."""

    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(sparse_features=self.sparse_features.pin_memory(), labels=self.labels.pin_memory())

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])


def _entropy(*key: int) -> list[int] | np.ndarray:
    """``key`` as a seed for ``np.random.default_rng``: a uint32 array when every part fits 32 bits.
    SeedSequence reads such an int as one 32-bit word either way, so the stream is the list's; the
    array skips its per-int conversion (half the generator's set-up, once per training batch)."""
    return np.array(key, dtype=np.uint32) if max(key) < 2**32 else list(key)


def _load(path: Path, spec: dict[str, Any] | None) -> np.ndarray:
    if not path.is_file():
        raise DataError(
            f"{path}: missing array file (half-written or damaged dataset; prepare it again with --force)"
        )
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable array ({e}); prepare the dataset again with --force") from e
    if spec is not None and (str(a.dtype) != spec["dtype"] or list(a.shape) != list(spec["shape"])):
        raise DataError(
            f"{path}: dtype/shape {a.dtype}{list(a.shape)} differ from {META} "
            f"({spec['dtype']}{spec['shape']}); prepare the dataset again with --force"
        )
    # a plain ndarray view of the map: fancy indexing on np.memmap goes through slow subclass hooks
    return np.asarray(a)


def _check_range(
    path: Path, a: np.ndarray, lo: int, hi: int, what: str, offsets: np.ndarray | None = None
) -> None:
    """Every value of ``a`` in ``[lo, hi]``, else a :class:`DataError` naming ``path``, the first bad
    row and the range. ``min``/``max`` read the (memory-mapped) array in place: no copy; the row is
    only searched for once the range is known to be broken. With ``offsets`` (a valid
    ``hist_offsets``), ``a`` is a flat history and the sample owning the bad row is named too."""
    if a.size == 0 or (lo <= a.min() and a.max() <= hi):
        return
    row = int(np.flatnonzero((a < lo) | (a > hi))[0])
    owner = "" if offsets is None else f" (history of sample {np.searchsorted(offsets, row, 'right') - 1})"
    raise DataError(f"{path}: row {row}{owner}: {what} {a[row]} is outside the valid range [{lo}, {hi}]; "
                    + _AGAIN)


class PreparedDataset:
    """A prepared dataset directory, memory-mapped. ``meta``, ``num_users``/``num_items``/
    ``num_cates``, ``max_len``, ``item2cate`` (int64 ``[num_items + 1]``), ``item_count``."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta
        counts = meta["counts"]
        self.num_users = int(counts["users"])
        self.num_items = int(counts["items"])
        self.num_cates = int(counts["categories"])
        self.max_len = int(meta.get("max_len", 0))
        self.protocol = meta["protocol"]
        self.item2cate = np.array(self._array("item2cate.npy"))  # small: keep in RAM
        self.item_count = np.array(self._array("item_count.npy"))
        for rel, a in (("item2cate.npy", self.item2cate), ("item_count.npy", self.item_count)):
            if a.shape != (self.num_items + 1,):
                raise DataError(f"{path / rel}: shape {list(a.shape)}, expected [{self.num_items + 1}] "
                                f"(counts.items + 1 in {META}); {_AGAIN}")
        # the samplers gather categories through item2cate and rank items by item_count
        _check_range(path / "item2cate.npy", self.item2cate, 0, self.num_cates, "category id")
        _check_range(path / "item_count.npy", self.item_count, 0, np.iinfo(np.int64).max, "count")
        self._splits: dict[str, SplitArrays] = {}

    def _array(self, rel: str) -> np.ndarray:
        return _load(self.path / rel, self.meta["arrays"].get(rel))

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> PreparedDataset:
        """Open ``path`` after checking ``meta.json`` (the fields read, :func:`read_meta`), that each
        vocabulary present has its recorded size or ``counts`` lines (:func:`check_vocab_lines`; the
        lines of a file of the recorded size are counted when it is read), that every listed array
        is present with the listed dtype/shape and that each split's values are in range
        (:meth:`_check_split`); ``verify=True`` also recomputes the content hash (reads it all)."""
        d = Path(path)
        meta = read_meta(d)
        check_vocab_lines(d, meta)
        missing = [n for n in meta["arrays"] if not (d / n).is_file()]
        if missing:
            raise DataError(
                f"{d}: array file(s) {missing} listed in {META} are missing; prepare it again with --force"
            )
        ds = cls(d, meta)
        for name in ("train", "test"):  # read_meta has checked that both are listed
            ds.split(name)
        if verify:
            ds.verify()
        return ds

    def split(self, name: str) -> SplitArrays:
        if name not in self._splits:
            if f"{name}/label.npy" not in self.meta["arrays"]:
                splits = sorted({n.split("/")[0] for n in self.meta["arrays"] if "/" in n})
                raise DataError(f"{self.path}: no split {name!r} (has {splits})")
            sa = SplitArrays(**{a: self._array(f"{name}/{a}.npy") for a in SPLIT_ARRAYS})
            self._check_split(name, sa)
            self._splits[name] = sa
        return self._splits[name]

    def _check_split(self, name: str, sa: SplitArrays) -> None:
        """What a damaged array would otherwise turn into a traceback deep in training (an id past
        its embedding table, a history longer than ``max_len``) or into silently wrong metrics
        (labels outside {0, 1}): ids within their vocabulary (0 = padding/unknown), labels 0 or 1,
        ``hist_offsets`` ``[N + 1]`` from 0, non-decreasing, ending at the histories' length, each
        history at most ``max_len`` long. Vectorised ``min``/``max``/``diff`` over the memory-mapped
        arrays (Beauty, both splits: a few tens of ms)."""
        d = self.path / name
        n = len(sa.label)
        for a in ("uid", "item", "cate"):
            if len(getattr(sa, a)) != n:
                raise DataError(f"{d / a}.npy: {len(getattr(sa, a))} rows, label.npy has {n}; {_AGAIN}")
        _check_range(d / "label.npy", sa.label, 0, 1, "label")
        o = sa.hist_offsets
        if len(o) != n + 1 or o[0] != 0:
            raise DataError(f"{d / 'hist_offsets.npy'}: expected {n + 1} offsets starting at 0, got {len(o)} "
                            f"starting at {o[0] if len(o) else 'none'}; {_AGAIN}")
        lens = np.diff(o)  # [N]: the only allocation here
        if n and lens.min() < 0:
            row = int(np.flatnonzero(lens < 0)[0]) + 1
            raise DataError(f"{d / 'hist_offsets.npy'}: row {row}: {o[row]} is below the previous offset "
                            f"{o[row - 1]} (offsets must not decrease); {_AGAIN}")
        if self.max_len and n and lens.max() > self.max_len:
            s = int(np.flatnonzero(lens > self.max_len)[0])
            raise DataError(f"{d / 'hist_offsets.npy'}: rows {s}-{s + 1}: sample {s}'s history has "
                            f"{lens[s]} items, more than max_len={self.max_len} ({META}); {_AGAIN}")
        for a in ("hist_item", "hist_cate", "neg_hist_item", "neg_hist_cate"):
            if len(getattr(sa, a)) != o[-1]:
                raise DataError(f"{d / a}.npy: {len(getattr(sa, a))} rows, but hist_offsets.npy ends at "
                                f"{o[-1]}; {_AGAIN}")
        vocab = {"uid": self.num_users, "item": self.num_items, "cate": self.num_cates}
        for a in SPLIT_ARRAYS:
            kind = a.rsplit("_", 1)[-1]  # hist_item, neg_hist_item -> item
            if kind in vocab:
                what = "uid" if kind == "uid" else f"{kind} id"
                hist = o if a.startswith(("hist", "neg")) else None
                _check_range(d / f"{a}.npy", getattr(sa, a), 0, vocab[kind], what, hist)

    def verify(self) -> None:
        """Recompute the content hash and compare it with ``meta.json``."""
        arrays = {n: self._array(n) for n in self.meta["arrays"]}
        vocab = {k: self.read_vocab_file(k) for k in ("uid", "item", "cate")}
        got = content_hash(arrays, vocab)
        if got != self.meta["content_hash"]:
            raise DataError(
                f"{self.path}: content hash {got} differs from {META}'s {self.meta['content_hash']}"
            )

    def vocab(self, kind: str) -> list[str]:
        """Raw ids of ``kind`` (``uid``/``item``/``cate``) in index order (entry ``i - 1`` is index ``i``)."""
        # bytes split on "\n" only: the writer allows any other character in an id (read_text would
        # turn a "\r\n" inside one into "\n", str.splitlines also splits on "\r", "\x1c", "\u2028" ...)
        p = self.path / "vocab" / f"{kind}.tsv"
        try:
            lines = self.read_vocab_file(kind).decode("utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not valid UTF-8 ({e.reason}); prepare it again with --force") from e
        return [ln.split("\t", 1)[0] for ln in lines[:-1]]

    def read_vocab_file(self, kind: str) -> bytes:
        """The content of ``vocab/<kind>.tsv``, checked to hold ``counts`` whole lines
        (:func:`check_vocab_bytes`): the open may not have read it."""
        p = self.path / "vocab" / f"{kind}.tsv"
        try:
            data = p.read_bytes()
        except OSError as e:
            raise DataError(f"{p}: cannot read the vocabulary ({e}); prepare it again with --force") from e
        check_vocab_bytes(p, data, kind, self.meta)
        return data

    def __repr__(self) -> str:
        c = self.meta["counts"]
        return (
            f"PreparedDataset({str(self.path)!r}, protocol={self.protocol!r}, users={self.num_users}, "
            f"items={self.num_items}, cates={self.num_cates}, train={c.get('train_samples')}, "
            f"test={c.get('test_samples')})"
        )


class BatchLoader:
    """Iterates ``Batch``es of one split (see the module docstring for order, ranks and resume).

    Args:
        ds: the dataset; split: ``"train"`` or ``"test"``; batch_size: samples per rank and batch.
        shuffle, seed: epoch order ``default_rng([seed, epoch]).permutation``; file order if False.
        rank, world_size: this process's slice of each global batch.
        drop_last: drop the last partial global batch.
        with_neg_hist: add DIEN's ``neg_hist_item``/``neg_hist_cate``.
        iacn_negatives: a :class:`NegativeSampler` adding ``iacn_neg_item``/``iacn_neg_cate``: S
            ids for each label-1 sample, none for label-0 samples. The sampler still draws ``[B, S]``
            per batch and the label-1 rows keep theirs, so a positive's negatives do not depend on
            its batch-mates' labels.
        limit: use only the first ``limit`` samples of the split (a fixed subset, e.g. for a quick
            evaluation; shuffling then permutes that subset); ``None`` = all.
        neg_hist_sampler: with ``with_neg_hist``, DIEN's negative behaviours drawn for every batch by
            this sampler (:class:`~iacn_torchrec.data.negatives.PopularityNegativeBehaviours`, as the
            reference's data iterator) instead of the prepared dataset's fixed ones.
        placeholder_features: the optional keys that ``with_neg_hist`` / ``iacn_negatives`` add are
            present with length 0 for every sample: the collections reading them find their keys,
            but nothing is sampled, gathered or looked up. For evaluation, where neither DIEN's
            auxiliary loss nor IaCN runs.
        min_last_batch: drop the last partial global batch when a rank's share of it would be
            smaller than this (training uses 2: BatchNorm cannot train on one sample); the samples
            dropped per epoch are :attr:`dropped_per_epoch`. 0: keep it whatever its size.
        merge_short_last: a last partial global batch of fewer than ``world_size`` samples (where a
            rank would get none) is read with the batch before it, split evenly over the ranks.
    """

    def __init__(
        self,
        ds: PreparedDataset,
        split: str,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        with_neg_hist: bool = False,
        iacn_negatives: NegativeSampler | None = None,
        limit: int | None = None,
        neg_hist_sampler: PopularityNegativeBehaviours | None = None,
        placeholder_features: bool = False,
        min_last_batch: int = 0,
        merge_short_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if iacn_negatives is not None and iacn_negatives.num_items != ds.num_items:
            raise ValueError(f"sampler has num_items={iacn_negatives.num_items}, the dataset {ds.num_items}")
        self.ds, self.split_name = ds, split
        self.data = ds.split(split)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.with_neg_hist = bool(with_neg_hist)
        self.iacn_negatives = iacn_negatives
        if neg_hist_sampler is not None and neg_hist_sampler.num_items != ds.num_items:
            raise ValueError(f"neg_hist_sampler has num_items={neg_hist_sampler.num_items}, the dataset "
                             f"{ds.num_items}")
        self.neg_hist_sampler = neg_hist_sampler
        self.placeholder_features = bool(placeholder_features)
        self.num_samples = len(self.data) if limit is None else max(0, min(int(limit), len(self.data)))
        self.min_last_batch = int(min_last_batch)
        self.merge_short_last = bool(merge_short_last)
        self.keys = (
            BASE_KEYS + (NEG_HIST_KEYS if with_neg_hist else []) + (IACN_NEG_KEYS if iacn_negatives else [])
        )
        self.epoch = 0
        self._next = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ---- epochs, length, resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._next = 0

    def __len__(self) -> int:
        full, rem = divmod(self.num_samples, self.batch_size * self.world_size)
        if rem and self._merges(rem, full):
            return full
        return full + (1 if rem and not self._drops(rem) else 0)

    def _merges(self, rem: int, full: int) -> bool:
        """Whether a last partial global batch of ``rem`` samples joins the ``full``-th batch."""
        return self.merge_short_last and rem < self.world_size and full > 0

    def _drops(self, rem: int) -> bool:
        """Whether a last partial global batch of ``rem`` samples is dropped."""
        return self.drop_last or rem // self.world_size < self.min_last_batch

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of the split this loader never yields (the dropped last partial batch)."""
        rem = self.num_samples % (self.batch_size * self.world_size)
        return rem if rem and self._drops(rem) else 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch"}``: ``batch`` is the index of the next batch to yield
        (``len(self)`` once the epoch is done), plus the settings a resume must match."""
        state = {
            "epoch": self.epoch,
            "batch": self._next,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
            "shuffle": int(self.shuffle),
            "drop_last": int(self.drop_last),
            "min_last_batch": self.min_last_batch,  # it changes len(self), as drop_last does
        }
        if self.iacn_negatives is not None:
            state["negatives_seed"] = self.iacn_negatives.seed
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key, value in mine.items():
            # a key the state lacks (older checkpoints) is not checked
            if key not in ("epoch", "batch") and key in state and int(state[key]) != value:
                raise ValueError(f"cannot resume: state has {key}={state[key]}, this loader {value}")
        if "negatives_seed" in state and "negatives_seed" not in mine:
            raise ValueError("cannot resume: the state's loader drew IaCN negatives, this one has no sampler")
        self.epoch = int(state["epoch"])
        self._next = int(state["batch"])

    def order(self) -> np.ndarray:
        """This epoch's sample order (int64 ``[N]``), shared by all ranks."""
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            n = self.num_samples
            o = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order_cache = (self.epoch, o.astype(np.int64, copy=False))
        return self._order_cache[1]

    def _global_size(self, b: int) -> int:
        g = self.batch_size * self.world_size
        n = max(0, min(g, self.num_samples - b * g))
        full, rem = divmod(self.num_samples, g)
        if b == full - 1 and rem and self._merges(rem, full):  # a short last batch joined to this one
            n += rem
        return n

    def global_batch_samples(self, b: int) -> int:
        """Samples that all ranks together read in batch ``b`` (the last one may be partial, or
        larger with ``merge_short_last``)."""
        return self._global_size(b)

    def rank_range(self, b: int) -> tuple[int, int]:
        """Positions ``[start, end)`` in :meth:`order` that this rank reads in batch ``b``."""
        g = self.batch_size * self.world_size
        lo = b * g
        n = self._global_size(b)
        if n == g:
            s = lo + self.rank * self.batch_size
            return s, s + self.batch_size
        return lo + self.rank * n // self.world_size, lo + (self.rank + 1) * n // self.world_size

    def __iter__(self):
        order = self.order()
        n_batches = len(self)
        start = self._next if self._next < n_batches else 0
        for b in range(start, n_batches):
            s, e = self.rank_range(b)
            batch = self.make_batch(order[s:e], b)
            self._next = b + 1
            yield batch

    # ---- batch assembly

    def make_batch(self, idx: np.ndarray, batch_index: int = 0) -> Batch:
        """Assemble the samples ``idx`` (int64 ``[B]``) into a :class:`Batch` (vectorised gathers)."""
        d = self.data
        B = len(idx)
        starts = d.hist_offsets[idx]
        lens = d.hist_offsets[idx + 1] - starts
        _, pos = jagged_index(starts, lens)  # the flat history positions of the batch's rows
        T = len(pos)

        real_neg_hist = self.with_neg_hist and not self.placeholder_features
        sampled_neg_hist = real_neg_hist and self.neg_hist_sampler is not None
        hist_arrays = [d.hist_item, d.hist_cate]
        if real_neg_hist and not sampled_neg_hist:
            hist_arrays += [d.neg_hist_item, d.neg_hist_cate]
        n_hist = 4 if real_neg_hist else 2  # history features in the KJT (the sampled ones filled below)
        S = self.iacn_negatives.num_negatives if self.iacn_negatives is not None else 0
        if self.placeholder_features:
            S = 0
        positive = d.label[idx] > 0 if S else np.zeros(B, dtype=bool)  # negatives: label-1 rows only
        P = int(positive.sum())
        n_sparse = 3 * B + n_hist * T + 2 * P * S
        values = np.empty(n_sparse, dtype=np.int64)
        np.take(d.uid, idx, out=values[:B])
        np.take(d.item, idx, out=values[B : 2 * B])
        np.take(d.cate, idx, out=values[2 * B : 3 * B])
        o = 3 * B
        for a in hist_arrays:
            np.take(a, pos, out=values[o : o + T])
            o += T
        if sampled_neg_hist:  # drawn for this batch, not the prepared dataset's
            rng = np.random.default_rng(_entropy(
                self.neg_hist_sampler.seed, self.seed, self.epoch, batch_index, self.rank, 1))
            neg = self.neg_hist_sampler.sample(rng, values[3 * B : 3 * B + T])
            values[o : o + T] = neg
            np.take(self.ds.item2cate, neg, out=values[o + T : o + 2 * T])
            o += 2 * T
        lengths = np.zeros(len(self.keys) * B, dtype=np.int64)  # placeholder keys keep length 0
        lengths[: 3 * B] = 1
        for k in range(n_hist):
            lengths[(3 + k) * B : (4 + k) * B] = lens
        if S:
            rng = np.random.default_rng(_entropy(
                self.iacn_negatives.seed, self.seed, self.epoch, batch_index, self.rank))
            neg = self.iacn_negatives.sample(rng, B)[positive].reshape(-1)
            values[o : o + P * S] = neg
            np.take(self.ds.item2cate, neg, out=values[o + P * S : o + 2 * P * S])
            k = 3 + n_hist
            lengths[k * B : (k + 1) * B] = lengths[(k + 1) * B : (k + 2) * B] = S * positive
        # per-key sizes from here (no torch sum + sync when the model slices the KJT by key)
        per_key = lengths.reshape(len(self.keys), B).sum(1).tolist() if B else [0] * len(self.keys)
        kjt = KeyedJaggedTensor(
            keys=self.keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths), stride=B,
            length_per_key=per_key, offset_per_key=[0, *itertools.accumulate(per_key)],
        )
        labels = torch.from_numpy(d.label[idx].astype(np.float32))
        return Batch(sparse_features=kjt, labels=labels)
