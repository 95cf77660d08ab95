"""DIEN: AUGRU against nn.GRUCell and the paper's formula, the packed recurrence's hand-written
backward against finite differences and autograd, the whole forward and the next-behaviour
auxiliary loss against per-sample Python-loop references, padding invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iacn_torchrec.models.dien import AUGRU, DIEN, AUGRUCell, DIENConfig, packed_gru, packed_recurrence
from iacn_torchrec.modules.embeddings import EmbeddedBatch

B, L, DU, D = 6, 7, 5, 8


def rand_emb(seed: int, min_len: int = 0, garbage: float | None = None, extra: int = 0) -> EmbeddedBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, L + 1, (B,), generator=g)
    hist = torch.cat([torch.randn(B, L, D, generator=g), torch.zeros(B, extra, D)], 1)
    neg = torch.cat([torch.randn(B, L, D, generator=g), torch.zeros(B, extra, D)], 1)
    pad = torch.arange(L + extra).unsqueeze(0) >= lengths.unsqueeze(1)
    hist[pad] = 0.0 if garbage is None else garbage
    neg[pad] = 0.0 if garbage is None else -garbage
    return EmbeddedBatch(user=torch.randn(B, DU, generator=g), target=torch.randn(B, D, generator=g),
                         hist=hist,
                         hist_lengths=lengths, neg_hist=neg)


def jagged(emb: EmbeddedBatch) -> EmbeddedBatch:
    """The same batch as the lookups give it: jagged history / negative values, padded lazily."""
    lengths = emb.hist_lengths
    real = torch.arange(emb.hist.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    out = EmbeddedBatch(emb.user, emb.target, None, lengths, hist_values=emb.hist[real],
                        hist_offsets=offsets, max_len=emb.hist.shape[1])
    out.neg_hist_values = emb.neg_hist[real] if emb.neg_hist is not None else None
    return out


def as_given(emb: EmbeddedBatch) -> EmbeddedBatch:
    return emb


BOTH_PATHS = pytest.mark.parametrize("view", [as_given, jagged], ids=["padded", "jagged"])


def test_augru_cell_is_gru_cell_when_attention_is_one():
    torch.manual_seed(0)
    gru = torch.nn.GRUCell(4, 6)
    cell = AUGRUCell(4, 6)
    cell.load_state_dict(gru.state_dict())
    x = torch.randn(5, 10, 4)
    h_ref = h = torch.zeros(5, 6)
    for t in range(10):
        h_ref = gru(x[:, t], h_ref)
        h = cell(x[:, t], h, torch.ones(5))
        torch.testing.assert_close(h, h_ref)
    # attention 0 keeps the state; general a follows ũ = a·u, h = (1-ũ)h + ũ·h̃ with u = 1 - z
    torch.testing.assert_close(cell(x[:, 0], h, torch.zeros(5)), h)
    a = torch.rand(5)
    gi, gh = x[:, 0] @ gru.weight_ih.T + gru.bias_ih, h @ gru.weight_hh.T + gru.bias_hh
    r = torch.sigmoid(gi[:, :6] + gh[:, :6])
    z = torch.sigmoid(gi[:, 6:12] + gh[:, 6:12])
    cand = torch.tanh(gi[:, 12:] + r * gh[:, 12:])
    u = a[:, None] * (1 - z)
    torch.testing.assert_close(cell(x[:, 0], h, a), (1 - u) * h + u * cand)


def test_augru_stops_at_each_users_last_real_step():
    torch.manual_seed(0)
    augru = AUGRU(4, 6)
    x = torch.randn(5, 8, 4)
    lengths = torch.tensor([0, 1, 3, 8, 5])
    att = torch.rand(5, 8) * (torch.arange(8)[None] < lengths[:, None])
    out = augru(x, att)
    for b in range(5):
        h = torch.zeros(1, 6)
        for t in range(int(lengths[b])):
            h = augru.cell(x[b:b + 1, t], h, att[b:b + 1, t])
        torch.testing.assert_close(out[b:b + 1], h)


def reference_dien(model: DIEN, emb: EmbeddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loop: tower input and the auxiliary loss, on the unpadded sequences only."""
    xs, pos_terms, neg_terms = [], [], []
    for b in range(B):
        n = int(emb.hist_lengths[b])
        seq = emb.hist[b:b + 1, :n]
        h = torch.zeros(1, model.hidden_size)
        s = seq.sum(1)
        if n > 0:
            states, _ = model.gru(seq)  # [1, n, H]
            _, att = model.attention(emb.target[b:b + 1], states, torch.ones(1, n, dtype=torch.bool))
            for t in range(n):
                h = model.augru.cell(states[:, t], h, att[:, t])
            for t in range(n - 1):  # state after behaviour t vs the real / sampled behaviour t+1
                p = model.aux_net(torch.cat([states[0, t], emb.hist[b, t + 1]])[None])
                q = model.aux_net(torch.cat([states[0, t], emb.neg_hist[b, t + 1]])[None])
                pos_terms.append(-F.logsigmoid(p).squeeze())
                neg_terms.append(-F.logsigmoid(-q).squeeze())
        xs.append(torch.cat([emb.user[b:b + 1], emb.target[b:b + 1], s, emb.target[b:b + 1] * s, h], 1))
    aux = (torch.stack(pos_terms).sum() + torch.stack(neg_terms).sum()) / len(pos_terms)
    return torch.cat(xs), aux


@BOTH_PATHS
@pytest.mark.parametrize("hidden", [None, 5])
def test_dien_forward_and_aux_loss_against_loop(hidden, view):
    torch.manual_seed(0)
    model = DIEN(DU, D, L, DIENConfig(aux_loss_weight=0.7, hidden_size=hidden))
    assert model.gru.hidden_size == model.augru.cell.hidden_size == (hidden or D)
    emb = rand_emb(1)
    assert (emb.hist_lengths == 0).any() and (emb.hist_lengths == L).any()
    seen = {}
    model.tower.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    logits, aux = model(view(emb))
    x_ref, aux_ref = reference_dien(model, emb)
    torch.testing.assert_close(seen["x"], x_ref)
    torch.testing.assert_close(aux, 0.7 * aux_ref)
    assert logits.shape == (B,)


def test_dien_aux_loss_ignores_negatives_it_must_not_see():
    """neg_hist is read at positions 1..n-1 only: position 0 and anything past the last real
    behaviour change nothing; a negative inside the range does."""
    torch.manual_seed(0)
    model = DIEN(DU, D, L)
    emb = rand_emb(2, min_len=2)
    _, aux = model(emb)
    changed = EmbeddedBatch(emb.user, emb.target, emb.hist, emb.hist_lengths, emb.neg_hist.clone())
    changed.neg_hist[:, 0] += 5.0
    for b in range(B):
        changed.neg_hist[b, int(emb.hist_lengths[b]):] = 9.0
    logits2, aux2 = model(changed)
    torch.testing.assert_close(aux2, aux)
    changed.neg_hist[:, 1] += 1.0
    _, aux3 = model(changed)
    assert not torch.allclose(aux3, aux)


def test_dien_jagged_path_equals_padded_path_with_gradients():
    """The packed (jagged) path and the padded path: same logits, auxiliary loss and gradients for
    every parameter and both inputs, including rows without behaviours."""
    torch.manual_seed(0)
    model = DIEN(DU, D, L, DIENConfig(hidden_size=5))
    emb = rand_emb(6)
    emb.hist_lengths[0] = 0
    emb.hist[0] = 0.0
    jag = jagged(emb)
    for e in (emb, jag):
        e.target.requires_grad_(True)
    jag.hist_values.requires_grad_(True)
    emb.hist.requires_grad_(True)
    results = []
    for e, hist in ((emb, emb.hist), (jag, jag.hist_values)):
        logits, aux = model(e)
        loss = (logits * torch.arange(1.0, B + 1)).sum() + aux
        grads = torch.autograd.grad(loss, [e.target, hist] + list(model.parameters()))
        results.append((logits, aux, grads))
    (la, aa, ga), (lb, ab, gb) = results
    torch.testing.assert_close(lb, la)
    torch.testing.assert_close(ab, aa)
    real = torch.arange(L).unsqueeze(0) < emb.hist_lengths.unsqueeze(1)
    torch.testing.assert_close(gb[0], ga[0])
    torch.testing.assert_close(gb[1], ga[1][real])
    for x, y in zip(gb[2:], ga[2:], strict=True):
        torch.testing.assert_close(x, y)


def test_augru_packed_equals_padded():
    from iacn_torchrec.models.layers import pack_history

    torch.manual_seed(0)
    augru = AUGRU(4, 6)
    lengths = torch.tensor([3, 0, 8, 1, 8, 5])
    real = torch.arange(8)[None] < lengths[:, None]
    x = torch.randn(6, 8, 4)
    att = torch.rand(6, 8) * real
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    packed = pack_history(lengths, offsets)
    assert packed.batch_sizes.tolist() == [5, 4, 4, 3, 3, 2, 2, 2]
    assert packed.order.tolist() == [2, 4, 5, 0, 3, 1]
    by_rank = augru.forward_packed(x[real][packed.index], att[real][packed.index], packed.batch_sizes, 6)
    assert by_rank.shape == (6, 6)
    torch.testing.assert_close(by_rank, augru(x, att)[packed.order])
    assert not by_rank[5].any()  # the empty row's rank: a zero state, as the padded loop leaves it
    # rows and has_next: each packed entry's row, and whether its row goes on
    t = torch.arange(8).unsqueeze(0).expand(6, 8)[real][packed.index]
    assert torch.equal(lengths[packed.rows] > t + 1, packed.has_next)


@pytest.mark.parametrize("train", [True, False])
def test_dien_padding_has_no_effect(train):
    torch.manual_seed(0)
    model = DIEN(DU, D, L).train(train)
    ref_logits, ref_aux = model(rand_emb(3))
    for garbage, extra in ((50.0, 0), (-3.0, 3)):
        logits, aux = model(rand_emb(3, garbage=garbage, extra=extra))
        torch.testing.assert_close(logits, ref_logits)
        if train:
            torch.testing.assert_close(aux, ref_aux)
        else:
            assert aux is None and ref_aux is None


def test_dien_needs_neg_hist_only_for_training():
    torch.manual_seed(0)
    model = DIEN(DU, D, L)
    emb = rand_emb(4)
    emb.neg_hist = None
    with pytest.raises(ValueError, match="neg_hist"):
        model(emb)
    model.eval()
    logits, aux = model(emb)
    assert aux is None and torch.isfinite(logits).all()
    no_aux = DIEN(DU, D, L, DIENConfig(aux_loss_weight=0.0))
    assert no_aux(emb)[1] is None


@BOTH_PATHS
def test_dien_single_behaviour_histories_give_zero_aux_loss(view):
    torch.manual_seed(0)
    model = DIEN(DU, D, L)
    emb = rand_emb(5)
    emb.hist_lengths.clamp_(max=1)
    emb.hist[:, 1:] = 0
    logits, aux = model(view(emb))
    assert aux.item() == 0.0 and torch.isfinite(logits).all()
    (logits.sum() + aux).backward()


def test_build_model_keeps_dien_hidden_at_the_plain_item_width():
    """IaCN widens what DIEN reads (E_orig ⊕ E_aux), not its GRU: H = 2·emb_dim either way, as the
    reference code's fixed HIDDEN_SIZE; ``dien_hidden`` overrides it."""
    from iacn_torchrec.models.framework import build_model
    from iacn_torchrec.modules.iacn import IaCNConfig

    plain = build_model("dien", 9, 30, 4, L, emb_dim=6)
    with_iacn = build_model("dien", 9, 30, 4, L, emb_dim=6, iacn=IaCNConfig(enabled=True, aux_dim=4))
    assert (plain.main_model.gru.input_size, plain.main_model.gru.hidden_size) == (12, 12)
    assert (with_iacn.main_model.gru.input_size, with_iacn.main_model.gru.hidden_size) == (20, 12)
    assert with_iacn.main_model.augru.cell.hidden_size == 12
    wide = build_model("dien", 9, 30, 4, L, emb_dim=6, iacn=IaCNConfig(enabled=True, aux_dim=4),
                       dien_hidden=20)
    assert wide.main_model.gru.hidden_size == 20
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        DIEN(DU, D, L, DIENConfig(hidden_size=0))


SIZES = torch.tensor([5, 5, 4, 2, 2, 1])  # rows live per step: histories of 6, 5, 3, 3, 2 steps


@pytest.mark.parametrize("sizes", [SIZES, torch.tensor([4]), torch.tensor([3, 3, 3]), torch.tensor([4, 1])],
                         ids=["uneven", "one-step", "equal", "drop"])
@pytest.mark.parametrize("with_att", [True, False], ids=["augru", "gru"])
def test_packed_recurrence_backward_matches_finite_differences(with_att, sizes):
    torch.manual_seed(0)
    N, H = int(sizes.sum()), 3
    gi = torch.randn(N, 3 * H, dtype=torch.double, requires_grad=True)
    att = torch.rand(N, dtype=torch.double, requires_grad=True)
    w = torch.randn(3 * H, H, dtype=torch.double, requires_grad=True)
    b = torch.randn(3 * H, dtype=torch.double, requires_grad=True)
    if with_att:
        assert torch.autograd.gradcheck(lambda *t: packed_recurrence(*t, sizes), (gi, att, w, b))
    else:
        assert torch.autograd.gradcheck(lambda g, w, b: packed_recurrence(g, None, w, b, sizes), (gi, w, b))


def test_packed_gru_is_nn_gru_on_a_packed_sequence():
    """States and every gradient (input, both weights, both biases) as ``nn.GRU`` computes them."""
    from torch.nn.utils.rnn import PackedSequence

    torch.manual_seed(0)
    gru = torch.nn.GRU(4, 3, batch_first=True).double()
    x = torch.randn(int(SIZES.sum()), 4, dtype=torch.double, requires_grad=True)
    weights = torch.randn(int(SIZES.sum()), 3, dtype=torch.double)
    ref = gru(PackedSequence(x, SIZES))[0].data
    ours = packed_gru(gru, x, SIZES)
    torch.testing.assert_close(ours, ref)
    g_ref = torch.autograd.grad((ref * weights).sum(), [x, *gru.parameters()])
    g_ours = torch.autograd.grad((ours * weights).sum(), [x, *gru.parameters()])
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="one-layer"):
        packed_gru(torch.nn.GRU(4, 3, num_layers=2), x.float(), SIZES)


def test_augru_packed_gradients_equal_the_step_loop():
    """forward_packed (hand-written backward) against the autograd loop over AUGRUCell.step on the
    padded batch: gradients of inputs, attention and every parameter."""
    from iacn_torchrec.models.layers import pack_history

    torch.manual_seed(1)
    augru = AUGRU(4, 6).double()
    lengths = torch.tensor([3, 0, 8, 1, 8, 5])
    real = torch.arange(8)[None] < lengths[:, None]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    packed = pack_history(lengths, offsets)
    x = torch.randn(6, 8, 4, dtype=torch.double, requires_grad=True)
    att = (torch.rand(6, 8, dtype=torch.double) * real).requires_grad_()
    weights = torch.randn(5, 6, dtype=torch.double)
    live = augru.forward_packed(x[real][packed.index], att[real][packed.index], packed.batch_sizes, 6)[:5]
    ref = augru(x, att)[packed.order[:5]]
    torch.testing.assert_close(live, ref)
    params = list(augru.parameters())
    g_ours = torch.autograd.grad((live * weights).sum(), [x, att, *params])
    g_ref = torch.autograd.grad((ref * weights).sum(), [x, att, *params])
    # padded positions: the packed path never reads them (zero gradient); the loop's gradient there
    # is zero for x (attention 0 carries the state) but not for att, so compare att on real positions
    torch.testing.assert_close(g_ours[0], g_ref[0])
    torch.testing.assert_close(g_ours[1][real], g_ref[1][real])
    for a, b in zip(g_ours[2:], g_ref[2:], strict=True):
        torch.testing.assert_close(a, b)


def test_packed_recurrence_without_gradients_and_under_autocast():
    """No gradient needed: the same states (nothing saved). Under bfloat16 autocast (gi bf16, the
    weights and attention fp32) it runs in the promoted dtype, forward and backward."""
    torch.manual_seed(0)
    augru = AUGRU(4, 6)
    x = torch.randn(int(SIZES.sum()), 4)
    att = torch.rand(int(SIZES.sum()))
    ref = augru.forward_packed(x, att, SIZES, int(SIZES[0]))
    with torch.no_grad():
        torch.testing.assert_close(augru.forward_packed(x, att, SIZES, int(SIZES[0])), ref, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = augru.forward_packed(x, att, SIZES, int(SIZES[0]))
    out.sum().backward()
    assert out.dtype == torch.float32 and augru.cell.weight_hh.grad is not None
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)  # gi went through a bf16 matmul
