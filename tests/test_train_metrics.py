"""Metrics against hand-computed references."""

import numpy as np
import pytest
import torch

from iacn_torchrec.train.metrics import CTRMetrics, _by_user_then_score, group_auc


def _pairwise_auc(scores, labels):
    """Reference AUC: fraction of (pos, neg) pairs ordered correctly, ties count 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("scores_kind", ["float64", "float32"])
def test_group_auc_matches_per_user_reference(scores_kind):
    """float32 scores (model probabilities) take the one-key sort, others the lexsort: both equal
    the pairwise reference."""
    rng = np.random.default_rng(0)
    uids = rng.integers(0, 7, size=120)
    scores = np.round(rng.random(120), 1)  # many ties
    if scores_kind == "float32":
        scores = scores.astype(np.float32).astype(np.float64)
    labels = rng.random(120) < 0.4
    got, n = group_auc(uids, scores, labels)
    num = den = 0.0
    users = 0
    for u in np.unique(uids):
        m = uids == u
        if labels[m].any() and (~labels[m]).any():
            num += m.sum() * _pairwise_auc(scores[m], labels[m])
            den += m.sum()
            users += 1
    assert n == users
    assert got == pytest.approx(num / den, abs=1e-12)


@pytest.mark.parametrize("case", ["probabilities", "negative zero", "negative", "nan", "big ids",
                                  "not float32"])
def test_user_then_score_order_is_lexsorts(case):
    """The one-key sort orders (user, score) as ``np.lexsort`` does, where it applies; the others
    (a sign bit, NaN, ids past 31 bits, scores that are not float32 values) take the lexsort."""
    rng = np.random.default_rng(1)
    uids = rng.integers(0, 50, size=500)
    scores = np.round(rng.random(500), 2).astype(np.float32).astype(np.float64)
    if case == "negative zero":
        scores[:5] = -0.0
    elif case == "negative":
        scores[:5] = -0.25
    elif case == "nan":
        scores[3] = np.nan
    elif case == "big ids":
        uids[7] = 2**40
    elif case == "not float32":
        scores[0] = 0.1
    got = _by_user_then_score(uids, scores)
    ref = np.lexsort((scores, uids))
    assert np.array_equal(uids[got], uids[ref])
    np.testing.assert_array_equal(scores[got], scores[ref])  # NaN == NaN here


def test_a_nan_score_gives_nan_aucs_not_a_plausible_one():
    """A NaN probability (a damaged checkpoint, say) has no rank: AUC and GAUC are NaN, as the
    log-loss is, instead of the 0.5 that sorting NaN highest would give here."""
    m = CTRMetrics()
    m.update(torch.tensor([0.9, float("nan"), 0.2, 0.1]), torch.tensor([1.0, 0, 1, 0]),
             torch.tensor([1, 1, 2, 2]))
    out = m.compute()
    assert np.isnan(out["auc"]) and np.isnan(out["gauc"]) and np.isnan(out["logloss"])


def test_group_auc_skips_single_class_users_and_hand_value():
    # user 1: pos 0.9 > neg 0.1 -> 1.0 (2 samples); user 2: pos 0.2 < neg 0.8 -> 0.0 (2 samples);
    # user 3 only positives: skipped
    uids = np.array([1, 1, 2, 2, 3])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.5])
    labels = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert group_auc(uids, scores, labels) == (0.5, 2)


def test_ctr_metrics_auc_logloss():
    m = CTRMetrics()
    p = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.7])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    m.update(p[:2], y[:2], torch.tensor([1, 1]))
    m.update(p[2:], y[2:], torch.tensor([2, 2, 2]))
    r = m.compute()
    assert r["auc"] == pytest.approx(_pairwise_auc(p.tolist(), y.tolist()))
    ref_ll = -np.mean([np.log(0.9), np.log(0.8), np.log(0.4), np.log(0.4), np.log(0.7)])
    assert r["logloss"] == pytest.approx(ref_ll, rel=1e-6)
    assert r["samples"] == 5
    # GAUC by hand: user 1 ranks its pair right (AUC 1, 2 samples), user 2 one of its two pairs (0.5, 3)
    assert r["gauc"] == pytest.approx((2 * 1.0 + 3 * 0.5) / 5) and r["gauc_users"] == 2


@pytest.mark.parametrize("ties", [False, True])
def test_binary_auc_is_torchmetrics_auroc(ties):
    """The Mann-Whitney AUC with tie-averaged ranks (GAUC's code with one group) is the
    pairwise AUC exactly, ties in the scores included, and torchmetrics' ``binary_auroc`` up to the
    float32 its result is returned in; nan with one class."""
    from torchmetrics.functional.classification import binary_auroc

    from iacn_torchrec.train.metrics import binary_auc

    g = torch.Generator().manual_seed(3)
    p = torch.rand(5000, generator=g)
    if ties:
        p = (p * 20).round() / 20
    y = (torch.rand(5000, generator=g) < 0.3 + 0.4 * p).long()
    scores, labels = p.double().numpy(), y.numpy() > 0
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    exact = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
    got = binary_auc(scores, labels)
    assert got == pytest.approx(exact, abs=1e-12)
    assert got == pytest.approx(float(binary_auroc(p, y, thresholds=None)), abs=1e-6)
    assert np.isnan(binary_auc(p.double().numpy(), np.ones(5000, dtype=bool)))
