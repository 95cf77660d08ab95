"""Wide & Deep: the wide and deep parts against a hand computation, padding invariance, and
`iacn train --model wide_deep` through export and scoring."""

from __future__ import annotations

import torch
from test_dlrm_plugin import cli_train_export_score

from iacn_torchrec.models.wide_deep import WideDeep
from iacn_torchrec.modules.embeddings import EmbeddedBatch

B, L, DU, D = 6, 7, 5, 8


def rand_emb(seed: int, garbage: float = 0.0) -> EmbeddedBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    hist = torch.randn(B, L, D, generator=g)
    hist[torch.arange(L).unsqueeze(0) >= lengths.unsqueeze(1)] = garbage
    return EmbeddedBatch(user=torch.randn(B, DU, generator=g), target=torch.randn(B, D, generator=g),
                         hist=hist,
                         hist_lengths=lengths)


def test_wide_and_deep_against_hand_computation():
    """The reference ``Model_WideDeep`` (DIEN's code): wide on ``[e_t, s, e_t·s]``; deep ``bn1`` →
    dense 200 → PReLU → dense 80 → PReLU → output on ``[user, e_t, s]`` (training: batch statistics)."""
    torch.manual_seed(0)
    model = WideDeep(DU, D, L)
    with torch.no_grad():  # PReLU slopes and BN affine away from their initial values
        for m in model.deep.net:
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.5)
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    emb = rand_emb(1)
    logits, aux = model(emb)
    assert aux is None
    s = torch.stack([emb.hist[b, : int(emb.hist_lengths[b])].sum(0) for b in range(B)])
    w, bias = model.wide.weight[0], model.wide.bias
    wide = emb.target @ w[:D] + s @ w[D:2 * D] + (emb.target * s) @ w[2 * D:] + bias
    bn = model.deep.net[0]
    lin = [m for m in model.deep.net if isinstance(m, torch.nn.Linear)]
    slopes = [m.weight for m in model.deep.net if isinstance(m, torch.nn.PReLU)]
    assert isinstance(bn, torch.nn.BatchNorm1d) and [m.out_features for m in lin] == [200, 80, 1]
    assert [a.shape[0] for a in slopes] == [200, 80]
    h = torch.cat([emb.user, emb.target, s], 1)
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    for i, m in enumerate(lin):
        h = h @ m.weight.T + m.bias
        if i < len(lin) - 1:
            h = torch.where(h > 0, h, slopes[i] * h)
    torch.testing.assert_close(logits, wide + h.squeeze(1))


def test_wide_deep_padding_has_no_effect():
    torch.manual_seed(0)
    model = WideDeep(DU, D, L)
    ref, _ = model(rand_emb(2))
    out, _ = model(rand_emb(2, garbage=123.0))
    torch.testing.assert_close(out, ref)


def test_cli_wide_deep_trains_exports_and_scores(tmp_path, capsys):
    """`iacn train --model wide_deep --iacn` → `iacn export` → `iacn score`: the written scores are the
    checkpoint's eager predictions and the reported AUC their rank AUC (see the helper)."""
    out = cli_train_export_score("wide_deep", tmp_path, capsys, ["--emb-dim", "8", "--aux-dim", "8"])
    main = out["model"].main_model
    assert isinstance(main, WideDeep) and main.item_dim == 2 * (8 + 8)
