"""`iacn bench train` smoke test on a tiny prepared dataset (no timing assertions), and the jagged DIN
fast path against the padded computation it replaces."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_app

from iacn_torchrec.models.din import DIN
from iacn_torchrec.models.layers import MASK_FILL, AttentionUnit, masked_sum, sequence_mask
from iacn_torchrec.modules.embeddings import EmbeddedBatch
from iacn_torchrec.train import bench


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory) -> Path:
    from iacn_torchrec.data.prepare import prepare_dataset

    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("tiny")
    rows = ["user_id\titem_id\ttimestamp"]
    for u in range(1, 41):
        for t, i in enumerate(rng.choice(np.arange(1, 61), size=int(rng.integers(3, 12)), replace=False)):
            rows.append(f"{u}\t{i}\t{1000 + t}")
    (tmp / "inter.tsv").write_text("\n".join(rows) + "\n")
    (tmp / "items.tsv").write_text("item_id\tcate_leaf\n" + "".join(f"{i}\t{i % 7}\n" for i in range(1, 61)))
    out = tmp / "prep"
    prepare_dataset(source="tsv", interactions=tmp / "inter.tsv", items=tmp / "items.tsv", protocol="din",
                    max_len=8, seed=0, out=out, progress=False)
    return out


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args([])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_epoch_worker_measures_our_loop_like_the_peer(tiny_prepared):
    """speedup_vs_deepctr compares whole epochs of each library's own loop: the worker runs `iacn
    train` for one epoch (for --quick and DIEN, an epoch of the first --peer-limit rows, the peer's
    --limit)."""
    from iacn_torchrec.data.loader import PreparedDataset

    n_train = len(PreparedDataset.open(tiny_prepared).split("train").label)
    full = bench.worker_auc(_args(data=str(tiny_prepared), threads=1, arms=["din:0:16:0"]))
    assert full["train_samples"] == n_train and full["train_samples_per_s"] > 0
    assert 0.0 < full["test_auc"] < 1.0
    short = bench.worker_auc(_args(data=str(tiny_prepared), threads=1, arms=["din:0:16:0"], train_limit=37))
    assert short["train_samples"] == 37  # one epoch of 37 rows: 2 batches of 16 and one of 5


def test_the_first_n_train_samples_are_the_ones_trained_on(tiny_prepared):
    """``data.num_train_samples=N``: every epoch reads the first N rows of the train split (the rows
    the peer's --limit takes), shuffled, each once."""
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.train.config import ConfigError, TrainConfig
    from iacn_torchrec.train.loop import make_loaders

    cfg = TrainConfig().override([f"data.path={json.dumps(str(tiny_prepared))}", "data.batch_size=8",
                                  "data.num_train_samples=21"])
    ds = PreparedDataset.open(tiny_prepared)
    train_loader, _, _ = make_loaders(cfg, ds, 0, 1)
    items = ds.split("train").item
    for epoch in (0, 1):
        train_loader.set_epoch(epoch)
        seen = np.concatenate([b.sparse_features["item"].values().numpy() for b in train_loader])
        assert sorted(seen) == sorted(items[:21])
    with pytest.raises(ConfigError, match="num_train_samples must be positive"):
        TrainConfig().override(["data.num_train_samples=0"])


def _measured(**extra) -> dict:
    """A results dictionary as `orchestrate` returns it (the figures made up, the keys real)."""
    res = {"machine": {"cpu": "x", "cores": 2}, "threads": 1, "load_before": "1", "load_after": "1",
           "throughput": {"din@128": {"step_ms": 10.0, "samples_per_s": 12800.0}},
           "iacn_overhead_by_arm": {}}
    res.update(extra)
    return res


def test_arguments_are_checked_before_any_timing(tiny_prepared, tmp_path):
    from iacn_torchrec.data.sources import DataError
    from iacn_torchrec.errors import UserError

    a = _args(data=str(tiny_prepared), out=str(tmp_path / "new" / "perf-v1.2"))
    bench.check_arguments(a)
    assert a.meta["max_len"] == 8 and (tmp_path / "new").is_dir()
    bad = (("threads", 0), ("rounds", 0), ("block_samples", 0), ("warmup", -1), ("peer_limit", 0))
    for flag, value in bad:
        with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} must be at least"):
            bench.check_arguments(_args(data=str(tiny_prepared), **{flag: value}))
    with pytest.raises(UserError, match="no such prepared dataset"):
        bench.check_arguments(_args(data=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="meta.json"):
        bench.check_arguments(_args(data=str(tmp_path)))  # a folder, not a prepared dataset
    (tmp_path / "x.json").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        bench.check_arguments(_args(data=str(tiny_prepared), out=str(tmp_path / "x")))


def test_out_is_a_prefix_even_with_dots(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "orchestrate", lambda a: _measured())
    bench.run(_args(data=str(tiny_prepared), out=str(tmp_path / "perf-v1.2")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perf-v1.2.json", "perf-v1.2.png"]


def test_the_peer_builds_the_datasets_samples_and_is_checked_against_them(tiny_prepared, monkeypatch):
    """The peer gets the dataset's max_len and seed (not a flag of its own), and its record says
    whether it trained and tested on as many samples as we have."""
    a = _args(data=str(tiny_prepared))
    bench.check_arguments(a)
    a.meta = dict(a.meta, max_len=7, seed=3)
    calls = []
    monkeypatch.setattr(bench, "check_peer", lambda a: None)
    monkeypatch.setattr(bench, "run_process", lambda cmd: (calls.append(cmd), ({}, 1.0))[1])
    bench.run_peer(a, "dien", 30)
    cmd = calls[0]
    assert cmd[cmd.index("--max-len") + 1] == "7" and cmd[cmd.index("--seed") + 1] == "3"
    assert cmd[cmd.index("--limit") + 1] == "30" and cmd[cmd.index("--model") + 1] == "dien"
    counts = a.meta["counts"]
    peer = {"train_samples_per_s": 100.0, "per_epoch": [{"test_auc": 0.7}], "eval_samples_per_s": 1e3,
            "n_train": counts["train_samples"], "n_test": counts["test_samples"], "versions": {"torch": "t"}}
    assert bench.peer_record(peer, 1.0, a, None)["same_samples"]
    assert bench.peer_record(dict(peer, n_train=20), 1.0, a, 20)["same_samples"]
    assert not bench.peer_record(dict(peer, n_test=counts["test_samples"] + 1), 1.0, a, None)["same_samples"]
    rec = bench.peer_record(dict(peer, n_train=5), 1.0, a, None)
    text = bench.render(_measured(peer={"din": rec}, ours_din_128_samples_per_s=[300.0, 310.0],
                                  speedup_vs_deepctr=3.05, speedup_vs_deepctr_fused_estimate=2.0))
    assert "WARNING: the peer's din trained/tested on 5/" in text
    assert "(estimate, not measured against the peer)" in text and "speedup_vs_deepctr 3.05" in text


def test_throughput_worker_runs_every_arm(tiny_prepared):
    from iacn_torchrec.data.loader import PreparedDataset

    a = _args(data=str(tiny_prepared), threads=1, rounds=2, block_samples=32, warmup=1,
              arms=["din:0:16:0", "din:1:16:0", "dien:0:16:0", "dien:1:16:0", "din:0:8:e"])
    res = bench.worker_throughput(a)
    assert set(res["step_s"]) == {"din@16", "din+iacn@16", "dien@16", "dien+iacn@16", "din/eval@8"}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in res["step_s"].values())
    # the evaluation arm times whole passes over the test split (one per round)
    assert res["samples_per_step"] == {"din/eval@8": len(PreparedDataset.open(tiny_prepared).split("test"))}
    assert bench.parse_arm("din:0:2048:e") == (bench.arm_overrides("din", "0", 128)
                                                + ["data.eval_batch_size=2048"], "din/eval@2048")
    with pytest.raises(ValueError, match="variant must be"):
        bench.parse_arm("din:0:128:x")


def test_scaling_worker_dense_and_fused_vocab(tiny_prepared, monkeypatch):
    # the fused arm goes through TorchRec's DMP with a fused row-wise Adagrad table optimizer
    dense, fused = "din:0:8:0:6:500", "din:1:8:1:6:500"
    a = _args(threads=1, rounds=2, block_steps=2, warmup=1, arms=[dense, fused])
    drawn, synthetic_batches = [], bench.synthetic_batches
    monkeypatch.setattr(bench, "synthetic_batches", lambda *p, **k: drawn.append(synthetic_batches(*p, **k))
                        or drawn[-1])
    res = bench.worker_scaling(a)
    # a batch of its own for every step an arm takes (warm-up included): no step reads rows that an
    # earlier step left in cache
    assert [len(b) for b in drawn] == [1 + 2 * 2] * 2
    assert set(res["step_s"]) == {dense, fused}
    assert all(len(ts) == 2 and min(ts) > 0 for ts in res["step_s"].values())  # a time per round
    assert res["tables"][dense] == {"sharded": False, "embedding_optimizer": "adam", "kernels": {}}
    f = res["tables"][fused]
    assert f["sharded"] and f["embedding_optimizer"] == "rowwise_adagrad"
    # every table, aux ones included (IaCN is on), on TorchRec's fused kernel
    assert {k.rsplit(".", 1)[1] for k in f["kernels"]} == {"uid", "item_orig", "cate_orig", "item_aux",
                                                           "cate_aux"}
    assert set(f["kernels"].values()) == {"table_wise/fused"}


def test_synthetic_batches_layout():
    bs = bench.synthetic_batches(4, 5, num_users=10, num_items=20, num_cates=3, neg_hist=True,
                                 num_negatives=2, seed=1, count=2)
    kjt = bs[0].sparse_features
    assert kjt.keys() == ["uid", "item", "cate", "hist_item", "hist_cate", "neg_hist_item", "neg_hist_cate",
                          "iacn_neg_item", "iacn_neg_cate"]
    lengths = kjt.lengths().view(len(kjt.keys()), 4)
    assert torch.equal(lengths[3], lengths[5]) and bool((lengths[3] >= 1).all() and (lengths[3] <= 5).all())
    # the loader's layout: S = 2 negatives for each label-1 row, none for the others
    assert torch.equal(lengths[7], 2 * bs[0].labels.long()) and torch.equal(lengths[8], lengths[7])
    again = bench.synthetic_batches(4, 5, 10, 20, 3, True, 2, seed=1, count=2)
    assert torch.equal(again[1].sparse_features.values(), bs[1].sparse_features.values())


def test_run_process_reports_json_and_rss(tmp_path):
    import sys

    code = "import json; print('noise'); print(json.dumps({'x': 1}))"
    out, rss = bench.run_process([sys.executable, "-c", code])
    assert out == {"x": 1} and rss > 1
    with pytest.raises(RuntimeError, match="exit 3"):
        bench.run_process([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])


def test_render_and_plot(tmp_path):
    res = {"machine": {"cpu": "x", "cores": 2}, "threads": 2, "load_before": "1", "load_after": "1",
           "throughput": {"din@128": {"step_ms": 10.0, "samples_per_s": 12800.0, "peak_rss_mib": 500.0},
                          "din+iacn@128": {"step_ms": 11.0, "samples_per_s": 11636.0}},
           "iacn_overhead_by_arm": {"din@128": 1.1}, "iacn_overhead": 1.1,
           "iacn_overhead_spread_by_arm": {"din@128": [1.04, 1.15]},
           "scaling_length": [{"L": 10, "din_ms": 1.0, "din_iacn_ms": 1.2, "iacn_overhead": 1.2}],
           "scaling_vocab": [{"items": 10, "dense_adam_ms": 1.0, "fused_rowwise_adagrad_ms": 1.0,
                              "dense_vs_12k": 1.0, "fused_vs_12k": 1.0}]}
    text = bench.render(res)
    assert "din+iacn@128" in text and "| 10 |" in text
    assert "din@128 1.100 (1.04–1.15)" in text
    assert "| din@128 | 10.00 | 12,800 | 500 |" in text and "| din+iacn@128 | 11.00 | 11,636 | – |" in text
    bench.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    json.dumps(res)


# ------------------------------------------------------------------ jagged DIN ≡ padded computation
def _padded_reference(att: AttentionUnit, q: torch.Tensor, hist: torch.Tensor, lengths: torch.Tensor):
    """DIN's attention on the padded [B, L, D] history, written out from the paper's formula."""
    mask = sequence_mask(lengths, hist.shape[1])
    qe = q.unsqueeze(1).expand_as(hist)
    scores = att.mlp(torch.cat([qe, hist, qe - hist, qe * hist], -1)).squeeze(-1)
    w = torch.softmax(scores.masked_fill(~mask, MASK_FILL), 1) * mask
    return torch.bmm(w.unsqueeze(1), hist).squeeze(1), masked_sum(hist, mask)


@pytest.mark.parametrize("softmax", [True, False])
def test_jagged_attention_matches_padded(softmax):
    torch.manual_seed(0)
    B, L, D = 7, 6, 8
    att = AttentionUnit(D, D, (5, 3), "sigmoid", softmax=softmax)
    lengths = torch.tensor([0, 1, 6, 3, 2, 6, 4])
    hist = torch.randn(B, L, D) * sequence_mask(lengths, L).unsqueeze(-1)
    hist.requires_grad_(True)
    q = torch.randn(B, D, requires_grad=True)
    mask = sequence_mask(lengths, L)
    values, segments = hist[mask], torch.repeat_interleave(torch.arange(B), lengths)
    out, w = att.forward_jagged(q, values, segments, B)
    if softmax:
        ref = _padded_reference(att, q, hist, lengths)[0]
    else:  # unnormalised scores on the real positions
        qe = q.unsqueeze(1).expand_as(hist)
        scores = att.mlp(torch.cat([qe, hist, qe - hist, qe * hist], -1)).squeeze(-1)
        ref = torch.bmm((scores * mask).unsqueeze(1), hist).squeeze(1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert out[0].abs().sum() == 0  # empty history → zero output
    if softmax:  # weights sum to 1 per non-empty row
        sums = torch.zeros(B).index_add(0, segments, w.detach())
        torch.testing.assert_close(sums[lengths > 0], torch.ones(int((lengths > 0).sum())))
    g = torch.randn(B, D)
    ga = torch.autograd.grad((out * g).sum(), [q, hist] + list(att.parameters()))
    gb = torch.autograd.grad((ref * g).sum(), [q, hist] + list(att.parameters()))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_din_jagged_values_equal_padded_view():
    """An EmbeddedBatch carrying the lookup's jagged values gives DIN the same logits and gradients as
    the padded view alone (the serving path)."""
    torch.manual_seed(1)
    B, L, D, DU = 5, 4, 6, 3
    din = DIN(DU, D, L).eval()
    lengths = torch.tensor([2, 0, 4, 1, 3])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values = torch.randn(int(lengths.sum()), D, requires_grad=True)
    user, target = torch.randn(B, DU), torch.randn(B, D)
    lazy = EmbeddedBatch(user, target, None, lengths, hist_values=values, hist_offsets=offsets, max_len=L)
    padded = EmbeddedBatch(user, target, lazy.hist, lengths)  # the lazily padded view
    assert padded.hist.shape == (B, L, D) and padded.hist[1].abs().sum() == 0
    a, _ = din(lazy)
    b, _ = din(padded)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a.sum(), values)[0]
    gb = torch.autograd.grad(b.sum(), values)[0]
    torch.testing.assert_close(ga, gb)
    assert not math.isnan(float(a.sum()))


def test_warmup_zero_times_from_the_first_step():
    import itertools

    taken = itertools.count()

    def steps():
        while True:
            next(taken)
            yield torch.zeros(()), None

    times = bench._interleaved({"a": (steps(), 3)}, rounds=2, warmup=0)
    assert len(times["a"]) == 2 and next(taken) == 6  # no untimed step
    bench._interleaved({"a": (steps(), 3)}, rounds=2, warmup=4)
    assert next(taken) == 7 + 4 + 6


def test_interleaved_rounds_rotate_the_arm_order():
    order = []

    def steps(name):
        while True:
            order.append(name)
            yield torch.zeros(()), None

    bench._interleaved({n: (steps(n), 1) for n in "abc"}, rounds=4, warmup=0)
    assert "".join(order) == "abc" + "bca" + "cab" + "abc"


def test_paired_ratio_and_its_spread():
    num, den = [2.0, 3.0, 4.0, 10.0, 6.0], [1.0, 1.0, 1.0, 1.0, 1.0]
    assert bench._paired(num, den) == 4.0
    # inclusive quartiles of the ratios 2, 3, 4, 6, 10: 3 and 6
    assert bench._paired_spread(num, den) == [3.0, 6.0]
    assert bench._paired_spread([3.0], [2.0]) == [1.5, 1.5]
    with pytest.raises(ValueError):
        bench._paired_spread([1.0, 2.0], [1.0])


# ------------------------------------------------- round-2 fast paths ≡ the computations they replace
def test_render_reports_capacity_matched_overhead():
    res = {"machine": {"cpu": "x", "cores": 2}, "threads": 2, "load_before": "1", "load_after": "1",
           "throughput": {"din@128": {"step_ms": 10.0, "samples_per_s": 12800.0}},
           "iacn_overhead_by_arm": {"din@128": 1.5},
           "iacn_overhead_vs_capacity_matched_by_arm": {"din@128": 1.2},
           "width_overhead_by_arm": {"din@128": 1.25}}
    text = bench.render(res)
    assert "vs aux tables, λ=0): din@128 1.200" in text and "vs plain): din@128 1.250" in text


def test_capacity_matched_arm_is_width_without_capsules(tiny_prepared):
    from iacn_torchrec.train.config import TrainConfig

    cfg = TrainConfig().override(bench.arm_overrides("din", "w", 16))
    assert cfg.iacn.enabled and cfg.iacn.lam == 0.0 and cfg.iacn.sampler == "in_batch"
    assert bench.arm_name("din", "w", 16) == "din+aux@16" and bench.arm_name("din", "1", 16) == "din+iacn@16"
    a = _args(data=str(tiny_prepared), threads=1, rounds=1, block_samples=32, warmup=1,
              arms=["din:0:16:0", "din:w:16:0", "din:1:16:0"])
    assert set(bench.worker_throughput(a)["step_s"]) == {"din@16", "din+aux@16", "din+iacn@16"}


def test_keep_width_arm_is_iacn_at_the_plain_width(tiny_prepared):
    from iacn_torchrec.train.config import TrainConfig

    cfg = TrainConfig().override(bench.arm_overrides("dien", "k", 16))
    assert cfg.iacn.enabled and cfg.iacn.keep_width and cfg.iacn.lam == 1.0
    assert cfg.iacn.aux_dim == bench.SMALL_AUX_DIM < cfg.model.emb_dim
    assert bench.arm_name("dien", "k", 16) == "dien+iacn/keep@16"
    a = _args(data=str(tiny_prepared), threads=1, rounds=1, block_samples=32, warmup=1,
              arms=["din:0:16:0", "din:k:16:0"])
    assert set(bench.worker_throughput(a)["step_s"]) == {"din@16", "din+iacn/keep@16"}
    res = {"machine": {"cpu": "x", "cores": 2}, "threads": 2, "load_before": "1", "load_after": "1",
           "throughput": {}, "iacn_overhead_by_arm": {}, "iacn_overhead_keep_width_by_arm": {"din@128": 1.07}}
    assert "E_orig 12 ⊕ E_aux 6 per table): din@128 1.070" in bench.render(res)


def test_small_aux_arm_widens_the_main_model_by_the_small_aux_dim(tiny_prepared):
    """``+iacn/aux6``: IaCN at λ = 1 with ``iacn.aux_dim`` 6 and the paper's concatenation, so the
    main model reads E_orig 18 ⊕ E_aux 6 per item-side table."""
    from iacn_torchrec.train.config import TrainConfig

    cfg = TrainConfig().override(bench.arm_overrides("dien", "a", 16))
    assert cfg.iacn.enabled and not cfg.iacn.keep_width and cfg.iacn.lam == 1.0
    assert cfg.iacn.sampler == TrainConfig().iacn.sampler and cfg.model.iacn_worker
    assert cfg.iacn.aux_dim == bench.SMALL_AUX_DIM < cfg.model.emb_dim
    assert bench.arm_name("dien", "a", 16) == "dien+iacn/aux6@16"
    a = _args(data=str(tiny_prepared), threads=1, rounds=1, block_samples=32, warmup=1,
              arms=["din:0:16:0", "din:a:16:0"])
    assert set(bench.worker_throughput(a)["step_s"]) == {"din@16", "din+iacn/aux6@16"}
    res = {"machine": {"cpu": "x", "cores": 2}, "threads": 2, "load_before": "1", "load_after": "1",
           "throughput": {}, "iacn_overhead_by_arm": {}, "iacn_overhead_small_aux_by_arm": {"dien@128": 1.04}}
    assert "(iacn.aux_dim=6: E_orig 18 ⊕ E_aux 6 per table): dien@128 1.040" in bench.render(res)


def test_one_lookup_per_table_equals_torchrec_collection():
    """InterestAwareEmbeddings looks each table up once (all its features' ids together, sliced from
    the KJT without to_dict); values and the summed table gradients must equal TorchRec's
    per-feature EmbeddingCollection forward, and the key slices the KJT's own per-key view."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from iacn_torchrec.modules.embeddings import InterestAwareEmbeddings, _collection_lookup, _key_slices

    torch.manual_seed(0)
    emb = InterestAwareEmbeddings(9, 30, 4, max_len=5, orig_dim=3, aux_dim=2, user_dim=3, with_neg_hist=True,
                                  with_iacn_negatives=True)
    kjt = bench.synthetic_batches(6, 5, 9, 30, 4, neg_hist=True, num_negatives=2, seed=3, count=1)[0]
    kjt = kjt.sparse_features

    def fresh() -> KeyedJaggedTensor:  # no shared caches between the two paths
        return KeyedJaggedTensor.from_lengths_sync(kjt.keys(), kjt.values(), kjt.lengths())

    features, ref_jts = _key_slices(fresh()), fresh().to_dict()
    assert list(features) == kjt.keys()
    for k, (ids, lengths) in features.items():
        assert torch.equal(ids, ref_jts[k].values()) and torch.equal(lengths, ref_jts[k].lengths())
    for ec in emb.collections().values():
        fast, ref = _collection_lookup(ec, fresh(), features), ec(fresh())
        assert set(fast) == set(ref)
        g = {k: torch.randn(v.values().shape) for k, v in ref.items()}
        ga = torch.autograd.grad(sum((fast[k] * g[k]).sum() for k in g), list(ec.parameters()))
        gb = torch.autograd.grad(sum((ref[k].values() * g[k]).sum() for k in g), list(ec.parameters()))
        for k in ref:
            torch.testing.assert_close(fast[k], ref[k].values(), rtol=0, atol=0)
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_jagged_routing_equals_padded_routing():
    """S c_i on the jagged values, then padded, ≡ the padded computation (values and gradients)."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from iacn_torchrec.modules.capsule import InterestCapsuleRouting

    torch.manual_seed(0)
    B, L, h, Du = 6, 8, 5, 3
    routing = InterestCapsuleRouting(item_dim=h, max_len=L, routing_iters=3, user_dim=Du)
    lengths = torch.tensor([1, 8, 3, 0, 5, 2])
    values = torch.randn(int(lengths.sum()), h, requires_grad=True)
    user = torch.randn(B, Du)
    init = torch.randn(B, routing.k_max, L)
    padded = torch.ops.fbgemm.jagged_to_padded_dense(
        values, [torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)], [L], 0.0)
    ref = routing.route(padded, lengths, user=user, init_logits=init)
    out = routing.route(JaggedTensor(values=values, lengths=lengths), user=user, init_logits=init)
    for x, y in zip(out, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref.capsules)
    params = [values] + list(routing.parameters())
    for x, y in zip(torch.autograd.grad((out.capsules * g).sum(), params),
                    torch.autograd.grad((ref.capsules * g).sum(), params), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds max_len"):
        routing.route(JaggedTensor(values=torch.randn(9, h), lengths=torch.tensor([9])))


@pytest.mark.parametrize("model_name", ["din", "dien"])
def test_placeholder_eval_loader_predicts_the_same(tiny_prepared, model_name):
    """The evaluation loader's length-0 placeholders (no IaCN negatives, no DIEN negative history)
    give the same predictions as the full batches, and training on them fails loudly."""
    from iacn_torchrec.data.loader import BatchLoader, PreparedDataset
    from iacn_torchrec.data.negatives import UniformNegatives
    from iacn_torchrec.models.framework import build_model
    from iacn_torchrec.modules.iacn import IaCNConfig

    ds = PreparedDataset.open(tiny_prepared)
    sampler = UniformNegatives(ds.num_items, 3, seed=0)
    kw = dict(batch_size=16, with_neg_hist=model_name == "dien", iacn_negatives=sampler)
    full = next(iter(BatchLoader(ds, "test", **kw)))
    lean = next(iter(BatchLoader(ds, "test", placeholder_features=True, **kw)))
    assert lean.sparse_features.keys() == full.sparse_features.keys()
    assert int(lean.sparse_features["iacn_neg_item"].lengths().sum()) == 0
    assert lean.sparse_features.values().numel() < full.sparse_features.values().numel()
    torch.manual_seed(0)
    model = build_model(model_name, ds.num_users, ds.num_items, ds.num_cates, int(ds.meta["max_len"]),
                        IaCNConfig(enabled=True, aux_dim=2, num_negatives=3), emb_dim=3)
    model.eval()
    torch.testing.assert_close(model.predict(lean), model.predict(full), rtol=0, atol=0)
    model.train()
    with pytest.raises(ValueError, match="needs"):
        model(lean)


def test_compile_submodules_in_place_matches_eager():
    """Opt-in torch.compile of the main model: same logits and gradients as eager, same state_dict keys."""
    from iacn_torchrec.models.framework import build_model
    from iacn_torchrec.modules.iacn import IaCNConfig

    torch.manual_seed(0)
    eager = build_model("din", 9, 30, 4, 5, IaCNConfig(enabled=True, aux_dim=2, num_negatives=2), emb_dim=3)
    torch.manual_seed(0)
    comp = build_model("din", 9, 30, 4, 5, IaCNConfig(enabled=True, aux_dim=2, num_negatives=2), emb_dim=3)
    keys = list(comp.state_dict())
    comp.compile_submodules()
    assert list(comp.state_dict()) == keys
    for seed in (1, 2):  # two batch shapes: dynamic, no failure on the second
        batch = bench.synthetic_batches(6 + seed, 5, 9, 30, 4, neg_hist=False, num_negatives=2, seed=seed,
                                        count=1)[0]
        torch.manual_seed(seed)
        loss_e, (logit_e, _, _) = eager(batch)
        torch.manual_seed(seed)
        loss_c, (logit_c, _, _) = comp(batch)
        torch.testing.assert_close(logit_c, logit_e, rtol=1e-4, atol=1e-5)
        ge = torch.autograd.grad(loss_e, list(eager.main_model.parameters()))
        gc = torch.autograd.grad(loss_c, list(comp.main_model.parameters()))
        for x, y in zip(gc, ge, strict=True):  # inductor reorders float32 sums: ≤ 2e-8 measured here
            torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-7)


def test_width_floor_times_the_layers_the_models_have(tiny_prepared, capsys):
    """apps/width_floor.py's shapes are the real models' layers at the plain and the paper width, and
    its floor is the sum of what it timed."""
    from iacn_torchrec.data.loader import PreparedDataset

    width_floor = load_app("width_floor")
    ds = PreparedDataset.open(tiny_prepared)
    work = width_floor.width_work(ds.num_items, ds.num_cates, batch=16, behaviours=50)
    layers = {name: (rows, f0, f1, out) for name, _, rows, f0, f1, out in work["layers"]}

    def real(model: str, iacn: bool) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of the layers that grow with the item width, and the aux tables' shapes."""
        setup = bench._setup_on_dataset(str(tiny_prepared), bench.arm_overrides(model, iacn, 16), 1, 0)[3]
        m = dict(setup.model.named_modules())
        p = dict(setup.model.named_parameters())
        tower = m["main_model.tower.net.1"]
        out = {"tower": (tower.in_features, tower.out_features),
               "aux_tables": sorted(tuple(v.shape) for k, v in p.items() if k.startswith("embeddings.aux."))}
        if model == "din":
            att = m["main_model.attention.mlp.net.0"]  # on [q, k, q-k, q·k]: 4 × the item width
            out["attention"] = (att.in_features // 4, att.out_features)
        else:
            w = p["main_model.gru.weight_ih_l0"]
            aux = m["main_model.aux_net.net.0"]
            out["gru"] = (w.shape[1], w.shape[0])
            out["aux_loss"] = (aux.in_features, aux.out_features)
        return out

    names = {"din": {"tower": "DIN tower, first layer",
                     "attention": "DIN attention, first layer (behaviour part)"},
             "dien": {"tower": "DIEN tower, first layer", "gru": "DIEN GRU input projection",
                      "aux_loss": "DIEN auxiliary loss, first layer"}}
    for model, rows in names.items():
        plain, wide = real(model, False), real(model, True)
        assert plain["aux_tables"] == [] and wide["aux_tables"] == sorted(work["aux_tables"])
        for key, name in rows.items():
            _, f0, f1, out = layers[name]
            assert (f0, out) == plain[key] and (f1, out) == wide[key], (model, key)
    assert layers["DIEN auxiliary loss, first layer"][0] == 2 * (50 - 16)  # a positive and a negative each

    out = tiny_prepared.parent / "width-floor.json"
    assert width_floor.main(["--data", str(tiny_prepared), "--calls", "2", "--repeats", "1", "--json",
                             "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == res
    offsets = ds.split("train").hist_offsets
    assert res["behaviours"] == round(128 * (offsets[-1] - offsets[0]) / (len(offsets) - 1))
    for model in ("din", "dien"):
        extra = sum(r["extra_us"] for r in res["rows"] if model in r["models"])
        assert res["floor_ms"][model] == pytest.approx(extra / 1e3)
    with pytest.raises(SystemExit):
        width_floor.main(["--data", str(tiny_prepared), "--calls", "0"])
    with pytest.raises(SystemExit):
        width_floor.main(["--data", str(tiny_prepared.parent / "missing")])
    assert "missing: no such prepared dataset directory" in capsys.readouterr().err
