"""CTR metrics: AUC, log-loss and user-grouped AUC (GAUC).

`CTRMetrics` accumulates predictions per batch and computes over the *whole* test set: under
torch.distributed it gathers every rank's predictions first, so AUC is not an average of
per-rank AUCs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors


def group_auc(uids: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """User-grouped AUC (DIN paper): Σ_u n_u·AUC_u / Σ_u n_u over users with both labels.

    Per-user AUC via the Mann-Whitney rank sum with tie-averaged ranks, fully vectorised.
    Returns ``(gauc, number of users counted)``; ``nan`` when no user has both labels, or when a
    score is NaN (it has no rank: sorting would place it highest and give a plausible AUC).
    """
    uids = np.asarray(uids)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if len(uids) == 0 or np.isnan(scores).any():
        return float("nan"), 0
    order = _by_user_then_score(uids, scores)
    u, s, y = uids[order], scores[order], labels[order]
    n = len(u)
    # group boundaries by user, and tie blocks by (user, score)
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_tie = new_user | np.r_[True, s[1:] != s[:-1]]
    user_id = np.cumsum(new_user) - 1
    tie_id = np.cumsum(new_tie) - 1
    user_start = np.flatnonzero(new_user)
    pos_in_user = np.arange(n) - user_start[user_id] + 1  # 1-based rank within user
    tie_rank_sum = np.bincount(tie_id, weights=pos_in_user)
    tie_size = np.bincount(tie_id)
    rank = (tie_rank_sum / tie_size)[tie_id]
    n_pos = np.bincount(user_id, weights=y.astype(np.float64))
    n_all = np.bincount(user_id).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum_pos = np.bincount(user_id, weights=rank * y)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan"), 0
    auc = (rank_sum_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    w = n_all[ok]
    return float((auc * w).sum() / w.sum()), int(ok.sum())


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC over all rows: the Mann-Whitney statistic with tie-averaged ranks, which is the area
    under the exact ROC curve (torchmetrics' ``binary_auroc(..., thresholds=None)``; a test checks
    the two agree). It is :func:`group_auc` with one group: on the 44,726 Beauty test rows ~2 ms
    against ~5 ms for ``binary_auroc``. ``nan`` without both labels."""
    return group_auc(np.zeros(len(scores), dtype=np.int64), scores, labels)[0]


def _by_user_then_score(uids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The order of ``np.lexsort((scores, uids))`` up to ties of equal (user, score), which
    :func:`group_auc` averages anyway. Model probabilities are float32 values without a sign bit,
    whose bit patterns sort as the numbers do: then one sort of the int64 key ``uid·2³² + bits``
    does it, with torch's integer sort (on the 44,726 Beauty test rows: 0.7 ms; numpy's argsort of
    the key 1.9 ms, the two-key lexsort ~3x that)."""
    s32 = scores.astype(np.float32)
    if (uids.dtype.kind in "iu" and uids.min() >= 0 and uids.max() < 2**31
            and not np.signbit(s32).any() and np.array_equal(s32, scores)):  # NaN fails the last test
        key = (uids.astype(np.int64) << 32) | s32.view(np.uint32).astype(np.int64)
        return torch.sort(torch.from_numpy(key)).indices.numpy()
    return np.lexsort((scores, uids))


class CTRMetrics:
    """Accumulates (uid, probability, label) and computes AUC, log-loss and GAUC."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._uids: list[torch.Tensor] = []

    def update(self, probs: torch.Tensor, labels: torch.Tensor, uids: torch.Tensor) -> None:
        """probs, labels, uids: ``[B]``."""
        self._probs.append(probs.detach().float().cpu().reshape(-1))
        self._labels.append(labels.detach().float().cpu().reshape(-1))
        self._uids.append(uids.detach().long().cpu().reshape(-1))

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # a rank without test batches contributes empty tensors of the same dtypes (all_gather needs them)
        cat = [torch.cat(x) if x else torch.empty(0, dtype=dtype)
               for x, dtype in ((self._probs, torch.float32), (self._labels, torch.float32),
                                (self._uids, torch.int64))]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from iacn_torchrec.distributed.setup import collective_device  # noqa: PLC0415

            on = collective_device()  # gathered where the backend can (NCCL: CUDA only), kept on the CPU
            cat = [torch.cat(gather_all_tensors(t.to(on))).cpu() for t in cat]
        return cat[0], cat[1], cat[2]

    def compute(self) -> dict[str, float]:
        p, y, u = self._gathered()
        if len(y) == 0:
            raise ValueError("CTRMetrics.compute(): no predictions were accumulated")
        pc = p.double().clamp(1e-7, 1 - 1e-7)
        logloss = float(-(y * pc.log() + (1 - y) * (1 - pc).log()).mean())
        scores, labels = p.double().numpy(), y.numpy() > 0.5
        auc = binary_auc(scores, labels)
        gauc, n_users = group_auc(u.numpy(), scores, labels)
        return {"auc": auc, "logloss": logloss, "gauc": gauc, "gauc_users": n_users, "samples": int(len(y))}
