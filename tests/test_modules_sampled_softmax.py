"""Sampled softmax: hand-computed values, logQ correction, positives only, accidental hits, in-batch."""

from __future__ import annotations

import math

import pytest
import torch

from iacn_torchrec.modules.sampled_softmax import sampled_softmax_loss

F64 = torch.float64


def nll(pos: float, others: list[float]) -> float:
    """-log(e^pos / (e^pos + Σ e^other))."""
    return -pos + math.log(math.exp(pos) + sum(math.exp(o) for o in others))


def test_hand_computed_value() -> None:
    user = torch.tensor([[1.0, 0.0], [0.5, 2.0], [3.0, 3.0]], dtype=F64)
    target = torch.tensor([[2.0, 1.0], [1.0, -1.0], [9.0, 9.0]], dtype=F64)
    negatives = torch.tensor(
        [[[1.0, 1.0], [-1.0, 0.0]], [[0.0, 1.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=F64
    )
    labels = torch.tensor([1.0, 1.0, 0.0])
    # row 0: pos 2, negs 1, -1;  row 1: pos 0.5 - 2 = -1.5, negs 2, 5;  row 2 is label 0.
    expected = (nll(2.0, [1.0, -1.0]) + nll(-1.5, [2.0, 5.0])) / 2
    loss = sampled_softmax_loss(user, target, negatives, labels)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_logq_correction_value() -> None:
    user = torch.tensor([[1.0, 2.0]], dtype=F64)
    target = torch.tensor([[1.0, 1.0]], dtype=F64)  # logit 3
    negatives = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=F64)  # logits 2, 1
    neg_log_q = torch.tensor([[math.log(0.5), math.log(0.1)]], dtype=F64)
    target_log_q = torch.tensor([math.log(0.2)], dtype=F64)
    labels = torch.tensor([1])
    loss = sampled_softmax_loss(
        user, target, negatives, labels, neg_log_q=neg_log_q, target_log_q=target_log_q
    )
    expected = nll(3 - math.log(0.2), [2 - math.log(0.5), 1 - math.log(0.1)])
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # Without the correction the value differs (the test is not vacuous).
    assert sampled_softmax_loss(user, target, negatives, labels).item() == pytest.approx(nll(3, [2, 1]))
    assert abs(nll(3, [2, 1]) - expected) > 0.05


@pytest.mark.parametrize("in_batch", [False, True])
def test_label_zero_rows_do_not_matter(in_batch: bool) -> None:
    g = torch.Generator().manual_seed(0)
    B, S, h = 6, 4, 3
    user = torch.randn(B, h, generator=g, dtype=F64, requires_grad=True)
    target = torch.randn(B, h, generator=g, dtype=F64)
    negatives = torch.randn(B, S, h, generator=g, dtype=F64)
    labels = torch.tensor([1, 0, 1, 0, 0, 1])
    ids = torch.arange(B)
    zero = labels == 0
    target2, negatives2, ids2 = target.clone(), negatives.clone(), ids.clone()
    target2[zero] = torch.randn(int(zero.sum()), h, generator=g, dtype=F64) * 10
    negatives2[zero] = torch.randn(int(zero.sum()), S, h, generator=g, dtype=F64) * 10
    ids2[zero] = ids[0]  # even a label-0 row sharing a positive's id changes nothing
    a = sampled_softmax_loss(user, target, negatives, labels, in_batch=in_batch, target_ids=ids)
    b = sampled_softmax_loss(user, target2, negatives2, labels, in_batch=in_batch, target_ids=ids2)
    assert torch.equal(a, b)
    (gu,) = torch.autograd.grad(a, user)
    assert torch.all(gu[zero] == 0) and torch.all(gu[~zero] != 0)
    # non-finite values in label-0 rows reach neither the loss nor any gradient
    user3, target3, negatives3 = user.detach().clone(), target.clone(), negatives.clone()
    user3[zero], target3[zero], negatives3[zero] = float("nan"), float("inf"), float("nan")
    leaves = [x.requires_grad_() for x in (user3, target3, negatives3)]
    c = sampled_softmax_loss(*leaves, labels, in_batch=in_batch, target_ids=ids)
    torch.testing.assert_close(c, a, rtol=0, atol=1e-12)
    for grad in torch.autograd.grad(c, leaves):
        assert torch.isfinite(grad).all() and torch.all(grad[zero] == 0)


def test_no_positive_row_gives_zero_with_graph() -> None:
    user = torch.randn(3, 2, requires_grad=True)
    loss = sampled_softmax_loss(user, torch.randn(3, 2), torch.randn(3, 4, 2), torch.zeros(3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(user.grad, torch.zeros(3, 2))


def test_accidental_hit_is_dropped() -> None:
    g = torch.Generator().manual_seed(1)
    user = torch.randn(2, 3, generator=g, dtype=F64)
    target = torch.randn(2, 3, generator=g, dtype=F64)
    negatives = torch.randn(2, 3, 3, generator=g, dtype=F64)
    target_ids = torch.tensor([5, 8])
    negative_ids = torch.tensor([[1, 5, 2], [3, 4, 6]])  # row 0's second negative is its own target
    labels = torch.ones(2)
    loss = sampled_softmax_loss(
        user, target, negatives, labels, target_ids=target_ids, negative_ids=negative_ids
    )
    r0 = sampled_softmax_loss(user[:1], target[:1], negatives[:1, [0, 2]], labels[:1])
    r1 = sampled_softmax_loss(user[1:], target[1:], negatives[1:], labels[1:])
    assert loss.item() == pytest.approx((r0.item() + r1.item()) / 2, abs=1e-12)
    assert loss.item() != pytest.approx(sampled_softmax_loss(user, target, negatives, labels).item())


def test_in_batch_hand_computed_with_duplicates() -> None:
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]], dtype=F64)
    target = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [7.0, 7.0]], dtype=F64)
    ids = torch.tensor([10, 20, 10, 30])  # rows 0 and 2 have the same item: not each other's negative
    labels = torch.tensor([1, 1, 1, 0])  # row 3 is no row and no candidate
    loss = sampled_softmax_loss(user, target, None, labels, in_batch=True, target_ids=ids)
    # row 0 (u=[1,0]): pos t0=1; candidates t1=3 (t2 dropped: same id)
    # row 1 (u=[0,1]): pos t1=-1; candidates t0=2, t2=0.5
    # row 2 (u=[1,1]): pos t2=1; candidates t1=2 (t0 dropped)
    expected = (nll(1, [3]) + nll(-1, [2, 0.5]) + nll(1, [2])) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # Without ids the duplicate is a (false) negative and the value changes.
    no_ids = sampled_softmax_loss(user, target, None, labels, in_batch=True)
    expected_no_ids = (nll(1, [3, 0.5]) + nll(-1, [2, 0.5]) + nll(1, [3, 2])) / 3
    assert no_ids.item() == pytest.approx(expected_no_ids, abs=1e-12)
    # logQ correction in in-batch mode: every candidate (and the positive) minus its log Q.
    lq = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    corr = sampled_softmax_loss(user, target, None, labels, in_batch=True, target_ids=ids, target_log_q=lq)
    expected_corr = (
        nll(1 - 0.1, [3 - 0.2]) + nll(-1 - 0.2, [2 - 0.1, 0.5 - 0.3]) + nll(1 - 0.3, [2 - 0.2])
    ) / 3
    assert corr.item() == pytest.approx(expected_corr, abs=1e-12)


def test_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    args = [torch.randn(*s, generator=g, dtype=F64, requires_grad=True) for s in ((4, 3), (4, 3), (4, 5, 3))]
    labels = torch.tensor([1, 0, 1, 1])
    assert torch.autograd.gradcheck(
        lambda u, t, n: sampled_softmax_loss(u, t, n, labels, in_batch=True), args
    )


def test_bad_inputs() -> None:
    u, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="no negatives"):
        sampled_softmax_loss(u, t, None, torch.ones(2))
    with pytest.raises(ValueError, match="negatives must be"):
        sampled_softmax_loss(u, t, torch.randn(2, 4, 2), torch.ones(2))
    with pytest.raises(ValueError, match="neg_log_q"):
        sampled_softmax_loss(u, t, torch.randn(2, 4, 3), torch.ones(2), neg_log_q=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="labels"):
        sampled_softmax_loss(u, t, torch.randn(2, 4, 3), torch.ones(3))
    with pytest.raises(ValueError, match="target_ids"):
        sampled_softmax_loss(u, t, torch.randn(2, 4, 3), torch.ones(2), negative_ids=torch.zeros(2, 4))
