"""Sampled-softmax loss of IaCN: ``-log P(e_t | v_u)`` against sampled negatives, positives only.

For a row b with user vector ``v_b`` and target ``t_b``, the candidate logits are dot products,
each minus the log of its sampling probability when one is given (logQ correction, which makes
the sampled softmax an unbiased estimate of the full softmax for non-uniform samplers)::

    o_b+   = v_b · t_b  - log Q(t_b)
    o_bs   = v_b · n_bs - log Q(n_bs)           sampled negatives s = 1..S
    o_bj   = v_b · t_j  - log Q(t_j)            in-batch: the targets of the other positive rows j
    loss_b = logsumexp(o_b+, o_b·) - o_b+

A candidate with the same item id as the target (an accidental hit) is dropped. The loss is the
mean of ``loss_b`` over rows with label 1; label-0 rows contribute nothing (neither as rows nor, in
in-batch mode, as candidates), so changing their targets or negatives leaves the loss unchanged.
"""

from __future__ import annotations

import torch


def _check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"sampled_softmax_loss: {name} must be {list(shape)}, got {list(t.shape)}")


def sampled_softmax_loss(
    user_vec: torch.Tensor,
    target: torch.Tensor,
    negatives: torch.Tensor | None,
    labels: torch.Tensor,
    neg_log_q: torch.Tensor | None = None,
    target_log_q: torch.Tensor | None = None,
    in_batch: bool = False,
    target_ids: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax of the target against negatives, averaged over label-1 rows.

    Args:
        user_vec: ``[B, h]`` v_u.
        target: ``[B, h]`` e_t, the target item's aux embedding.
        negatives: ``[B, S, h]`` sampled negatives per row, or None (then ``in_batch`` must be True).
        labels: ``[B]`` click labels (float or int); rows with label > 0.5 are positives.
        neg_log_q: ``[B, S]`` log sampling probability of each negative (subtracted), or None.
        target_log_q: ``[B]`` log sampling probability of each target (subtracted from the positive
            logit, and from the in-batch candidates' logits), or None.
        in_batch: also use the other positive rows' targets as negatives.
        target_ids: ``[B]`` int item ids of the targets: enables dropping accidental hits.
        negative_ids: ``[B, S]`` int item ids of the sampled negatives (needs ``target_ids``).

    Returns:
        a scalar; 0 (still attached to the graph) when the batch has no positive row.
    """
    if user_vec.dim() != 2:
        raise ValueError(f"sampled_softmax_loss: user_vec must be [B, h], got {list(user_vec.shape)}")
    batch, dim = user_vec.shape
    _check_shape("target", target, (batch, dim))
    _check_shape("labels", labels, (batch,))
    _check_shape("target_log_q", target_log_q, (batch,))
    _check_shape("target_ids", target_ids, (batch,))
    if negatives is None:
        if not in_batch:
            raise ValueError("sampled_softmax_loss: no negatives: pass negatives [B, S, h] or in_batch=True")
        if neg_log_q is not None or negative_ids is not None:
            raise ValueError("sampled_softmax_loss: neg_log_q / negative_ids given without negatives")
    else:
        if negatives.dim() != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim:
            raise ValueError(
                f"sampled_softmax_loss: negatives must be [{batch}, S, {dim}], got {list(negatives.shape)}"
            )
        _check_shape("neg_log_q", neg_log_q, tuple(negatives.shape[:2]))
        _check_shape("negative_ids", negative_ids, tuple(negatives.shape[:2]))
        if negative_ids is not None and target_ids is None:
            raise ValueError("sampled_softmax_loss: negative_ids needs target_ids to detect accidental hits")

    positive = labels > 0.5  # [B]
    if not bool(positive.all()):
        # only the label-1 rows enter the loss: select them first, so a label-0 row reaches neither
        # the loss nor any gradient (masking afterwards would still let 0·NaN through a backward).
        # IaCNTask passes positive rows only; this covers direct callers.
        rows = positive.nonzero().squeeze(1)
        user_vec, target, target_log_q, target_ids, negatives, neg_log_q, negative_ids = (
            None if t is None else t[rows]
            for t in (user_vec, target, target_log_q, target_ids, negatives, neg_log_q, negative_ids)
        )
        batch = len(rows)
    neg_inf = float("-inf")

    pos_logit = (user_vec * target).sum(-1)  # [B]
    if target_log_q is not None:
        pos_logit = pos_logit - target_log_q
    parts = [pos_logit.unsqueeze(1)]

    if negatives is not None:
        # broadcast multiply-sum, not einsum: einsum lowers to [B, 1, h] x [B, h, S] bmms whose
        # backward (K = 1 outer products) costs more than the elementwise form
        neg_logits = (negatives * user_vec.unsqueeze(1)).sum(-1)  # [B, S]
        if neg_log_q is not None:
            neg_logits = neg_logits - neg_log_q
        if negative_ids is not None:
            neg_logits = neg_logits.masked_fill(negative_ids == target_ids.unsqueeze(1), neg_inf)
        parts.append(neg_logits)

    if in_batch:
        cand = user_vec @ target.t()  # [B, B]: row b against every row's target
        if target_log_q is not None:
            cand = cand - target_log_q.unsqueeze(0)
        # The other (positive) rows' targets are candidates; the diagonal is o_b+ already.
        drop = torch.eye(batch, dtype=torch.bool, device=user_vec.device)
        if target_ids is not None:
            drop = drop | (target_ids.unsqueeze(0) == target_ids.unsqueeze(1))
        parts.append(cand.masked_fill(drop, neg_inf))

    logits = torch.cat(parts, dim=1)
    per_row = torch.logsumexp(logits, dim=1) - pos_logit  # -log P(t_b | v_b): [B'] positive rows
    return per_row.sum() / max(batch, 1)
