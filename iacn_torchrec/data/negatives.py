"""Negative samplers for IaCN's sampled softmax.

A sampler draws, for each sample of a batch, ``S`` item ids (``num_negatives``) that the loader
adds to the KJT as ``iacn_neg_item`` and ``iacn_neg_cate`` (length ``S`` each, categories through
``item2cate``). Draws are with replacement and independent of the row's target: a negative equal
to the target ("accidental hit") is the loss's business to mask.

``log_q[i]`` (``float32 [num_items + 1]``) is ``log q(i)``, where ``q(i)`` is the probability that
*one draw* returns item ``i`` (the expected inclusion count of ``i`` among ``S`` draws is
``S·q(i)``). The logQ correction of the sampled softmax subtracts it from the logits of sampled
items (and of the target); a constant ``log S`` would cancel in the softmax. ``log_q[0]`` (the
padding id, never drawn) is ``0``.

The loader calls :meth:`NegativeSampler.sample` with its own generator seeded by ``(sampler seed,
loader seed, epoch, batch index, rank)``, so negatives are reproducible batch by batch, even when
resuming mid-epoch.

In-batch negatives (the other positive rows' targets, sampler ``in_batch`` in the IaCN config) need
no features: pass ``iacn_negatives=None`` to the loader and let the loss use the batch's ``item``/
``cate`` features. They get no logQ correction (the design's choice: only ``log_uniform`` has one).
"""

from __future__ import annotations

import abc
import math

import numpy as np
import torch

__all__ = ["NegativeSampler", "UniformNegatives", "LogUniformNegatives", "PopularityNegativeBehaviours"]


class NegativeSampler(abc.ABC):
    """Abstract base: ``num_items``, ``num_negatives`` (S), ``seed``, ``log_q`` and :meth:`sample`."""

    num_items: int
    num_negatives: int
    seed: int
    log_q: torch.Tensor

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """``int64 [batch_size, num_negatives]`` item ids in ``1..num_items``."""

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(num_items={self.num_items}, num_negatives={self.num_negatives}, seed={self.seed})"


def _check(num_items: int, num_negatives: int) -> None:
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")


class UniformNegatives(NegativeSampler):
    """Uniform over items ``1..num_items``: ``q(i) = 1 / num_items``."""

    def __init__(self, num_items: int, num_negatives: int, seed: int = 0) -> None:
        _check(num_items, num_negatives)
        self.num_items, self.num_negatives, self.seed = int(num_items), int(num_negatives), int(seed)
        self.log_q = torch.full((self.num_items + 1,), -math.log(self.num_items), dtype=torch.float32)
        self.log_q[0] = 0.0

    def sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        return rng.integers(1, self.num_items + 1, size=(batch_size, self.num_negatives), dtype=np.int64)


class LogUniformNegatives(NegativeSampler):
    """Log-uniform (Zipf) over items ranked by popularity (``item_count``, most frequent first,
    ties by id): ``q(rank k) = log((k + 2) / (k + 1)) / log(N + 1)``, ``k = 0..N-1``, the sampler
    of TensorFlow's ``log_uniform_candidate_sampler`` applied to popularity ranks.

    Args:
        item_count: ``int [num_items + 1]`` popularity (``item_count.npy`` of a prepared dataset);
            entry 0 (padding) is ignored.
    """

    def __init__(self, item_count: np.ndarray | torch.Tensor, num_negatives: int, seed: int = 0) -> None:
        count = np.asarray(item_count, dtype=np.int64)
        n = len(count) - 1
        _check(n, num_negatives)
        self.num_items, self.num_negatives, self.seed = n, int(num_negatives), int(seed)
        # rank -> item: most popular first, ties by ascending id
        self.rank_to_item = (np.lexsort((np.arange(n), -count[1:])) + 1).astype(np.int64)
        k = np.arange(n, dtype=np.float64)
        log_p = np.log(np.log1p(1.0 / (k + 1.0))) - math.log(math.log(n + 1.0))
        log_q = np.zeros(n + 1, dtype=np.float64)
        log_q[self.rank_to_item] = log_p
        self.log_q = torch.from_numpy(log_q.astype(np.float32))
        self._log_range = math.log(n + 1.0)

    def sample(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        u = rng.random(size=(batch_size, self.num_negatives))
        # inverse CDF: P(rank <= k) = log(k + 2) / log(N + 1)
        k = np.floor(np.exp(u * self._log_range)).astype(np.int64) - 1
        np.clip(k, 0, self.num_items - 1, out=k)
        return self.rank_to_item[k]


class PopularityNegativeBehaviours:
    """DIEN's negative behaviours (its auxiliary loss's) as the reference data iterator draws them:
    for every history position an item in proportion to its interaction count (the reference picks
    from ``mid_list_for_random``, one entry per interaction), drawn anew for every batch, never the
    position's own item. The loader calls :meth:`sample` with its own generator seeded by ``(seed,
    loader seed, epoch, batch index, rank)``, so the draws are reproducible batch by batch.

    ``item_count``: ``[num_items + 1]`` interactions per item id (``[0]``, the padding id, is never
    drawn; neither is an item without interactions)."""

    def __init__(self, item_count: np.ndarray | torch.Tensor, seed: int = 0) -> None:
        counts = np.asarray(item_count, dtype=np.float64)[1:]
        if counts.size == 0 or (counts < 0).any() or int((counts > 0).sum()) < 2:
            raise ValueError("popularity negatives need at least two items with interactions "
                             "(one could be every position's own item)")
        self.num_items, self.seed = int(counts.size), int(seed)
        self._cdf = np.cumsum(counts) / counts.sum()
        self._cdf[-1] = 1.0  # a draw in [0, 1) always lands on an item

    def sample(self, rng: np.random.Generator, real: np.ndarray) -> np.ndarray:
        """``int64 [T]`` negatives for the history items ``real`` ``[T]``: ids in ``1..num_items``,
        ``P(i) ∝ count(i)``, each different from ``real`` at its position (redrawn until it is)."""
        neg = np.searchsorted(self._cdf, rng.random(real.size), side="right").astype(np.int64) + 1
        clash = np.flatnonzero(neg == real)
        while clash.size:  # the few draws of the position's own item, drawn again
            neg[clash] = np.searchsorted(self._cdf, rng.random(clash.size), side="right") + 1
            clash = clash[neg[clash] == real[clash]]
        return neg

    def __repr__(self) -> str:
        return f"PopularityNegativeBehaviours(num_items={self.num_items}, seed={self.seed})"

