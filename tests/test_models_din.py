"""DIN and the shared layers: Dice and the attention unit against hand computations, the tower input,
padding invariance."""

from __future__ import annotations

import pytest
import torch

from iacn_torchrec.models.din import DIN, DINConfig
from iacn_torchrec.models.layers import (
    MLP,
    AttentionUnit,
    Dice,
    masked_sum,
    segment_ids,
    segment_sum,
    sequence_mask,
)
from iacn_torchrec.modules.embeddings import EmbeddedBatch

B, L, DU, D = 6, 7, 5, 8


def rand_emb(seed: int, min_len: int = 0, max_len: int = L, garbage: float | None = None) -> EmbeddedBatch:
    """Random dense views; zero (or ``garbage``) past each history length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, L + 1, (B,), generator=g)
    hist = torch.randn(B, max_len, D, generator=g)
    pad = torch.arange(max_len).unsqueeze(0) >= lengths.unsqueeze(1)
    hist[pad] = 0.0 if garbage is None else garbage
    return EmbeddedBatch(user=torch.randn(B, DU, generator=g), target=torch.randn(B, D, generator=g),
                         hist=hist,
                         hist_lengths=lengths)


def with_padding(emb: EmbeddedBatch, value: float, extra: int = 0) -> EmbeddedBatch:
    """Same batch, padded slots (and ``extra`` more columns) filled with ``value``."""
    hist = torch.cat([emb.hist, torch.zeros(B, extra, D)], 1)
    pad = torch.arange(hist.shape[1]).unsqueeze(0) >= emb.hist_lengths.unsqueeze(1)
    hist = torch.where(pad.unsqueeze(-1), torch.full_like(hist, value), hist)
    return EmbeddedBatch(emb.user, emb.target, hist, emb.hist_lengths)


def test_dice_matches_formula():
    torch.manual_seed(0)
    dice = Dice(4)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.1, -0.5, 2.0]))
    x = torch.randn(10, 4) * 3 + 1
    mean, var = x.mean(0), x.var(0, unbiased=False)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(dice(x), p * x + (1 - p) * dice.alpha * x)
    dice.eval()  # running statistics after one update: 0.9·(0, 1) + 0.1·(batch mean, unbiased var)
    rm, rv = 0.1 * mean, 0.9 + 0.1 * x.var(0, unbiased=True)
    p = torch.sigmoid((x - rm) / torch.sqrt(rv + 1e-8))
    torch.testing.assert_close(dice(x), p * x + (1 - p) * dice.alpha * x)


def test_mlp_prelu_and_dice_shapes():
    x = torch.randn(3, 4, 6)
    mlp = MLP(6, (5,), 1, activation="prelu")
    assert mlp(x).shape == (3, 4, 1)
    # on [B, T, H] the PReLU's channels are the last axis (nn.PReLU's would be T)
    lin, act, out = mlp.net
    with torch.no_grad():
        act.weight.copy_(torch.linspace(-0.5, 0.7, 5))
    z = x @ lin.weight.T + lin.bias
    torch.testing.assert_close(mlp(x), torch.where(z >= 0, z, act.weight * z) @ out.weight.T + out.bias)
    torch.testing.assert_close(mlp(x[:, 0]), mlp(x)[:, 0])  # 2-D: nn.PReLU's own path, same function
    assert MLP(6, (5, 2), None, activation="dice", input_bn=True)(x[:, 0]).shape == (3, 2)
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(6, (5,), activation="swishy")


def test_attention_unit_against_loop():
    torch.manual_seed(0)
    att = AttentionUnit(D, D)
    emb = rand_emb(1)
    mask = sequence_mask(emb.hist_lengths, L)
    out, w = att(emb.target, emb.hist, mask)
    for b in range(B):
        n = int(emb.hist_lengths[b])
        if n == 0:
            assert w[b].abs().sum() == 0 and out[b].abs().sum() == 0
            continue
        k = emb.hist[b, :n]
        q = emb.target[b].expand(n, D)
        h = torch.sigmoid(torch.cat([q, k, q - k, q * k], 1) @ att.mlp.net[0].weight.T + att.mlp.net[0].bias)
        h = torch.sigmoid(h @ att.mlp.net[2].weight.T + att.mlp.net[2].bias)
        s = (h @ att.mlp.net[4].weight.T + att.mlp.net[4].bias).squeeze(-1)
        a = torch.softmax(s, 0)
        torch.testing.assert_close(w[b, :n], a)
        assert w[b, n:].abs().sum() == 0
        torch.testing.assert_close(out[b], a @ k)
    # DIN paper variant: raw (unnormalised) scores, the same MLP's outputs, masked
    raw = AttentionUnit(D, D, softmax=False)
    raw.load_state_dict(att.state_dict())
    out_raw, w_raw = raw(emb.target, emb.hist, mask)
    assert (w_raw[~mask] == 0).all()
    for b in range(B):
        n = int(emb.hist_lengths[b])
        k, q = emb.hist[b, :n], emb.target[b].expand(n, D)
        h = torch.sigmoid(torch.cat([q, k, q - k, q * k], 1) @ att.mlp.net[0].weight.T + att.mlp.net[0].bias)
        h = torch.sigmoid(h @ att.mlp.net[2].weight.T + att.mlp.net[2].bias)
        s = (h @ att.mlp.net[4].weight.T + att.mlp.net[4].bias).squeeze(-1)
        torch.testing.assert_close(w_raw[b, :n], s)
        torch.testing.assert_close(out_raw[b], s @ k if n else torch.zeros(D))


@pytest.mark.parametrize("softmax", [True, False])
def test_attention_unit_query_proj_against_loop(softmax):
    """DIEN's ``din_fcn_attention``: the query first goes through Linear + per-channel PReLU to the
    key width, then the unit of DIN; padded and jagged forms against a per-row loop."""
    torch.manual_seed(0)
    Dq, Dk = D, 5
    att = AttentionUnit(Dq, Dk, query_proj=True, softmax=softmax)
    with torch.no_grad():  # distinct channel slopes, so a shared or missing PReLU shows
        att.query_proj[1].weight.copy_(torch.linspace(-0.5, 0.9, Dk))
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([0, 1, 4, L, 2, 3])
    query, keys = torch.randn(B, Dq, generator=g), torch.randn(B, L, Dk, generator=g)
    mask = sequence_mask(lengths, L)
    keys[~mask] = 1e6  # garbage in the padding
    out, w = att(query, keys, mask)
    values, segments = keys[mask], segment_ids(lengths)
    out_j, w_j = att.forward_jagged(query, values, segments, B)
    lin, prelu = att.query_proj[0], att.query_proj[1]
    net = att.mlp.net
    for b in range(B):
        n = int(lengths[b])
        z = query[b] @ lin.weight.T + lin.bias
        q = torch.where(z >= 0, z, prelu.weight * z).expand(n, Dk)
        k = keys[b, :n]
        h = torch.sigmoid(torch.cat([q, k, q - k, q * k], 1) @ net[0].weight.T + net[0].bias)
        h = torch.sigmoid(h @ net[2].weight.T + net[2].bias)
        s = (h @ net[4].weight.T + net[4].bias).squeeze(-1)
        a = torch.softmax(s, 0) if softmax else s
        torch.testing.assert_close(w[b, :n], a)
        assert not w[b, n:].any()
        torch.testing.assert_close(out[b], a @ k if n else torch.zeros(Dk))
        torch.testing.assert_close(w_j[segments == b], a)
        torch.testing.assert_close(out_j[b], a @ k if n else torch.zeros(Dk))


def test_din_tower_input_is_user_target_sum_product_attention():
    torch.manual_seed(0)
    model = DIN(DU, D, L)
    emb = rand_emb(2)
    seen = {}
    model.tower.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    logits, aux = model(emb)
    assert aux is None and logits.shape == (B,)
    mask = sequence_mask(emb.hist_lengths, L)
    s = masked_sum(emb.hist, mask)
    att, _ = model.attention(emb.target, emb.hist, mask)
    torch.testing.assert_close(seen["x"], torch.cat([emb.user, emb.target, s, emb.target * s, att], 1))
    assert isinstance(model.tower.net[0], torch.nn.BatchNorm1d)
    assert [m.out_features for m in model.tower.net if isinstance(m, torch.nn.Linear)] == [200, 80, 1]
    assert sum(isinstance(m, Dice) for m in model.tower.net) == 2
    prelu = DIN(DU, D, L, DINConfig(tower_activation="prelu"))
    assert sum(isinstance(m, torch.nn.PReLU) for m in prelu.tower.net) == 2


@pytest.mark.parametrize("train", [True, False])
def test_din_padding_has_no_effect(train):
    torch.manual_seed(0)
    model = DIN(DU, D, L).train(train)
    emb = rand_emb(3)
    ref, _ = model(emb)
    for value, extra in ((1e3, 0), (-7.5, 0), (3.0, 4)):
        out, _ = model(with_padding(emb, value, extra))
        torch.testing.assert_close(out, ref)


def test_din_backward_with_empty_history_is_finite():
    torch.manual_seed(0)
    model = DIN(DU, D, L)
    emb = rand_emb(4)
    emb.hist_lengths[0] = 0
    emb.hist[0] = 0
    emb.hist.requires_grad_(True)
    logits, _ = model(emb)
    logits.sum().backward()
    assert torch.isfinite(logits).all() and torch.isfinite(emb.hist.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segment_sum_with_offsets_is_the_same_sum(dtype):
    """Given the row-major offsets, a sum without a gradient to record runs as ``embedding_bag``:
    bit for bit the ``index_add`` sum (the same order), rows without values included; with a
    gradient to record it stays ``index_add`` and the gradient reaches the values."""
    lengths = torch.tensor([2, 0, 3, 1, 0, 4])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values = torch.randn(int(lengths.sum()), 5, dtype=dtype)
    seg = segment_ids(lengths, values.shape[0])
    want = segment_sum(values, seg, 6)
    with torch.no_grad():
        got = segment_sum(values, seg, 6, offsets)
    assert torch.equal(got, want) and float(got[1].abs().sum()) == 0
    v = values.clone().requires_grad_()
    segment_sum(v, seg, 6, offsets).sum().backward()
    assert torch.equal(v.grad, torch.ones_like(values))
