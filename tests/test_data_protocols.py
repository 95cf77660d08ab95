"""Sample building: hand-made inputs under both protocols, Beauty counts, the reference builder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from iacn_torchrec.data.loader import PreparedDataset
from iacn_torchrec.data.prepare import prepare_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# user 30 has 2 interactions (< 3: skipped); user 20 has a timestamp tie (file order kept);
# item 500 is in items.tsv but never interacted with.
TINY_INTER = """user_id\titem_id\ttimestamp
10\t100\t5
10\t200\t3
10\t300\t7
20\t200\t1
20\t100\t2
20\t400\t2
20\t300\t9
30\t100\t1
30\t200\t2
"""
TINY_ITEMS = "item_id\tcate_leaf\tbrand\n100\t7\t1\n200\t7\t1\n300\t9\t2\n400\t8\t2\n500\t9\t3\n"


def write_tiny(tmp: Path, inter: str = TINY_INTER, items: str = TINY_ITEMS) -> tuple[Path, Path]:
    (tmp / "interactions.tsv").write_text(inter)
    (tmp / "items.tsv").write_text(items)
    return tmp / "interactions.tsv", tmp / "items.tsv"


def jagged(split, name: str) -> list[list[int]]:
    off = split.hist_offsets
    a = getattr(split, name)
    return [a[off[i] : off[i + 1]].tolist() for i in range(len(off) - 1)]


def test_din_tiny_exact(tmp_path):
    inter, items = write_tiny(tmp_path)
    out = prepare_dataset(
        "tsv",
        interactions=inter,
        items=items,
        protocol="din",
        max_len=2,
        seed=5,
        out=tmp_path / "p",
        progress=False,
    )
    ds = PreparedDataset.open(out, verify=True)
    # ids: users 10,20,30 -> 1,2,3; items 100..400 -> 1..4; categories 7,8,9 -> 1,2,3
    assert ds.vocab("uid") == ["10", "20", "30"] and ds.vocab("item") == ["100", "200", "300", "400"]
    assert ds.vocab("cate") == ["7", "8", "9"]
    assert ds.item2cate.tolist() == [0, 1, 1, 3, 2]
    # time-sorted sequences: user 1 = [2, 1, 3]; user 2 = [2, 1, 4, 3] (tie 100/400 keeps file order)
    pos = np.array([1, 3, 1, 4, 3])  # positives in (user, k) order: u1k1 u1k2 u2k1 u2k2 u2k3
    r = np.random.default_rng(5).integers(1, 4, size=5)
    neg = r + (r >= pos)
    assert (neg != pos).all()
    tr, te = ds.split("train"), ds.split("test")
    assert tr.uid.tolist() == [1, 1, 2, 2, 2, 2] and te.uid.tolist() == [1, 1, 2, 2]
    assert tr.item.tolist() == [1, neg[0], 1, neg[2], 4, neg[3]]
    assert te.item.tolist() == [3, neg[1], 3, neg[4]]
    assert tr.label.tolist() == [1, 0, 1, 0, 1, 0] and te.label.tolist() == [1, 0, 1, 0]
    assert tr.cate.tolist() == ds.item2cate[tr.item].tolist()
    assert jagged(tr, "hist_item") == [[2], [2], [2], [2], [2, 1], [2, 1]]
    assert jagged(te, "hist_item") == [[2, 1], [2, 1], [1, 4], [1, 4]]  # max_len 2 keeps the last two
    assert jagged(te, "hist_cate") == [[1, 1], [1, 1], [1, 2], [1, 2]]
    # DIEN negative behaviours: never the real item, pos/neg rows of a pair share them
    for s in (tr, te):
        assert (s.neg_hist_item != s.hist_item).all() and (s.neg_hist_item >= 1).all()
        assert (s.neg_hist_cate == ds.item2cate[s.neg_hist_item]).all()
        nh = jagged(s, "neg_hist_item")
        assert nh[0::2] == nh[1::2]
    # train popularity: every event but each kept user's last (user 3 is skipped)
    assert ds.item_count.tolist() == [0, 2, 2, 0, 1]
    meta = ds.meta
    assert meta["counts"] == {
        "users": 3,
        "items": 4,
        "categories": 3,
        "interactions": 9,
        "train_samples": 6,
        "train_positives": 3,
        "test_samples": 4,
        "test_positives": 2,
    }
    assert meta["skipped"]["users_below_min_len"]["count"] == 1
    assert meta["skipped"]["interactions_of_skipped_users"]["count"] == 2
    assert meta["skipped"]["items_without_interactions"]["count"] == 1
    assert meta["protocol"] == "din" and meta["max_len"] == 2 and meta["seed"] == 5


def test_dien_tiny_exact(tmp_path):
    inter, items = write_tiny(tmp_path)
    out = prepare_dataset(
        "tsv",
        interactions=inter,
        items=items,
        protocol="dien",
        max_len=20,
        seed=3,
        out=tmp_path / "p",
        progress=False,
    )
    ds = PreparedDataset.open(out)
    tr, te = ds.split("train"), ds.split("test")
    # 2 kept users, ceil(2 / 10) = 1 test user chosen by default_rng([seed, 2]).permutation
    test_user = int(np.random.default_rng([3, 2]).permutation(2)[0]) + 1
    assert te.uid.tolist() == [test_user] * 2 and tr.uid.tolist() == [3 - test_user] * 2
    hist = {1: [2, 1], 2: [2, 1, 4]}
    for s in (tr, te):
        u = int(s.uid[0])
        assert s.item[0] == 3 and s.label.tolist() == [1, 0]  # last interaction of both users is item 3
        assert s.item[1] != 3 and 1 <= s.item[1] <= 4
        assert jagged(s, "hist_item") == [hist[u], hist[u]]
    assert ds.meta["counts"]["train_samples"] == 2 and ds.meta["counts"]["test_samples"] == 2
    # item_count: all events of the train user
    train_user = 3 - test_user
    expect = np.bincount(hist[train_user] + [3], minlength=5)
    assert ds.item_count.tolist() == expect.tolist()


def test_dien_negatives_follow_popularity(tmp_path):
    # every user: P, Q, then a unique item; popularity-proportional negatives for the last
    # interaction are P or Q with probability ~ 3000 / (6000 + 2999) each, uniform would give ~0.
    n = 3000
    rows = ["user_id\titem_id\ttimestamp"]
    for u in range(n):
        rows += [f"{u}\t1\t1", f"{u}\t2\t2", f"{u}\t{100 + u}\t3"]
    items = ["item_id\tcate_leaf", "1\t1", "2\t1"] + [f"{100 + u}\t2" for u in range(n)]
    inter, itf = write_tiny(tmp_path, "\n".join(rows) + "\n", "\n".join(items) + "\n")
    out = prepare_dataset(
        "tsv", interactions=inter, items=itf, protocol="dien", seed=0, out=tmp_path / "p", progress=False
    )
    ds = PreparedDataset.open(out)
    neg = np.concatenate([ds.split(s).item[ds.split(s).label == 0] for s in ("train", "test")])
    pos = np.concatenate([ds.split(s).item[ds.split(s).label == 1] for s in ("train", "test")])
    assert len(neg) == n and (neg != pos).all()
    frac = np.isin(neg, [1, 2]).mean()  # item ids 1, 2 = raw 1, 2
    assert abs(frac - 6000 / 8999) < 0.03
    assert len(ds.split("test")) == 2 * 300


def test_seed_determinism(tmp_path):
    inter, items = write_tiny(tmp_path)
    outs = [
        prepare_dataset(
            "tsv", interactions=inter, items=items, seed=s, out=tmp_path / f"p{i}", progress=False
        )
        for i, s in enumerate((0, 0, 1))
    ]
    metas = [json.loads((o / "meta.json").read_text()) for o in outs]
    assert metas[0]["content_hash"] == metas[1]["content_hash"] != metas[2]["content_hash"]
    for rel in metas[0]["arrays"]:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    a, c = PreparedDataset.open(outs[0]).split("train"), PreparedDataset.open(outs[2]).split("train")
    assert (a.item[0::2] == c.item[0::2]).all()  # same positives
    assert not ((a.item[1::2] == c.item[1::2]).all() and (a.neg_hist_item == c.neg_hist_item).all())


def test_beauty_counts(beauty_prepared):
    ds = PreparedDataset.open(beauty_prepared)
    c = ds.meta["counts"]
    assert (c["users"], c["items"], c["categories"]) == (22363, 12101, 195)
    assert (c["train_samples"], c["test_samples"]) == (307552, 44726)
    assert c["train_positives"] * 2 == c["train_samples"] and c["test_positives"] * 2 == c["test_samples"]
    assert len(ds.split("train")) == 307552 and ds.split("train").label.sum() == 153776
    assert ds.meta["skipped"] == {} and ds.meta["repaired"] == {}
    assert ds.meta["content_hash"].startswith("sha256:") and ds.meta["versions"]["numpy"] == np.__version__
    assert np.diff(ds.split("train").hist_offsets).max() == 20


def test_beauty_equals_reference_builder(beauty_prepared):
    ref_path = SHARED / "bench" / "make_samples.py"
    raw = SHARED / "data" / "amazon-beauty"
    if not ref_path.exists() or not (raw / "interactions.tsv").exists():
        pytest.skip("shared reference builder or raw Beauty data absent")
    spec = importlib.util.spec_from_file_location("make_samples", ref_path)
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    ref, ref_item2cate, ref_meta = ms.build(str(raw), max_len=20, min_len=3, seed=0)
    ds = PreparedDataset.open(beauty_prepared)
    assert np.array_equal(ds.item2cate, ref_item2cate)
    for name in ("train", "test"):
        s, r = ds.split(name), ref[name]
        for key in ("uid", "item", "cate", "label"):
            assert np.array_equal(getattr(s, key), r[key]), (name, key)
        lens = np.diff(s.hist_offsets)
        assert np.array_equal(lens, r["hist_len"])
        mask = np.arange(20)[None, :] < lens[:, None]
        for key in ("hist_item", "hist_cate"):
            padded = np.zeros((len(lens), 20), dtype=np.int64)
            padded[mask] = getattr(s, key)
            assert np.array_equal(padded, r[key]), (name, key)


def test_negative_behaviours_of_unknown_positions_cover_every_item():
    """dien-files positions whose item is unknown (0) draw uniformly over all of 1..n_items (the last
    item was never drawn); positions with a real item keep the scalar-bound draws byte for byte."""
    from iacn_torchrec.data.protocols import _other_items

    counts = np.bincount(_other_items(np.random.default_rng(0), np.zeros(30_000, np.int64), 3), minlength=4)
    assert counts[0] == 0 and counts[1:].min() > 9_000
    real = np.random.default_rng(1).integers(1, 51, size=1000)
    r = np.random.default_rng(2).integers(1, 50, size=1000)
    assert np.array_equal(_other_items(np.random.default_rng(2), real, 50), r + (r >= real))
    mixed = _other_items(np.random.default_rng(3), np.r_[real, np.zeros(1000, np.int64)], 50)
    assert (mixed[:1000] != real).all() and mixed.min() >= 1 and mixed.max() == 50


def _header(rows: list[str]) -> str:
    """An interactions file of ``rows`` (``user\titem\ttimestamp``)."""
    return "user_id\titem_id\ttimestamp\n" + "\n".join(rows) + "\n"


def test_din_negative_behaviours_are_the_recorded_stream(tmp_path):
    """A mutation review's P04 (negative behaviours from ``default_rng(seed)``, the target negatives' stream).
    meta.json records ``neg_hist: default_rng([seed, 1])``: one draw per event, uniform over the
    other items, gathered like the histories."""
    inter, items = write_tiny(tmp_path)
    out = prepare_dataset("tsv", interactions=inter, items=items, protocol="din", max_len=2, seed=5,
                          out=tmp_path / "p", progress=False)
    ds = PreparedDataset.open(out)
    assert ds.meta["random_streams"]["neg_hist"] == "default_rng([seed, 1])"
    # events in (user, time) order: u1 = items [2, 1, 3], u2 = [2, 1, 4, 3], u3 = [1, 2]
    event_item = np.array([2, 1, 3, 2, 1, 4, 3, 1, 2])
    r = np.random.default_rng([5, 1]).integers(1, 4, size=len(event_item))
    neg_of_event = r + (r >= event_item)
    hist_events = {"train": [[0], [0], [3], [3], [3, 4], [3, 4]],
                   "test": [[0, 1], [0, 1], [4, 5], [4, 5]]}
    for name, evs in hist_events.items():
        s = ds.split(name)
        assert jagged(s, "hist_item") == [event_item[e].tolist() for e in evs]
        assert jagged(s, "neg_hist_item") == [neg_of_event[e].tolist() for e in evs], name


def test_dien_history_keeps_the_last_max_len_items(tmp_path):
    """A mutation review's P11 (dien keeps the *first* max_len items before the last interaction). Under both
    protocols a history is the last ``max_len`` items before the target, oldest first."""
    rows = [f"1\t{10 * k}\t{k}" for k in range(1, 7)] + ["2\t30\t1", "2\t20\t2", "2\t10\t3"]
    inter, items = write_tiny(tmp_path, _header(rows), "item_id\tcate_leaf\n" + "".join(
        f"{10 * k}\t1\n" for k in range(1, 7)))
    out = prepare_dataset("tsv", interactions=inter, items=items, protocol="dien", max_len=2, seed=0,
                          out=tmp_path / "p", progress=False)
    ds = PreparedDataset.open(out)
    item_id = {raw: i + 1 for i, raw in enumerate(ds.vocab("item"))}
    want = {1: [item_id["40"], item_id["50"]], 2: [item_id["30"], item_id["20"]]}
    seen = set()
    for name in ("train", "test"):
        s = ds.split(name)
        for row, hist in enumerate(jagged(s, "hist_item")):
            user = int(ds.vocab("uid")[s.uid[row] - 1])
            assert hist == want[user], (name, row, hist)
            seen.add(user)
    assert seen == {1, 2}


def test_dien_test_split_is_the_ceiling_of_a_tenth_of_the_users(tmp_path):
    """A mutation review's P06 (``n_users // 10`` test users). The dien protocol's test split is the first
    ``ceil(n_users / 10)`` users of ``default_rng([seed, 2]).permutation(n_users)``."""
    rows = [f"{u:02d}\t{(u + k) % 7}\t{k}" for u in range(25) for k in range(3)]
    inter, items = write_tiny(tmp_path, _header(rows),
                              "item_id\tcate_leaf\n" + "".join(f"{i}\t1\n" for i in range(7)))
    out = prepare_dataset("tsv", interactions=inter, items=items, protocol="dien", seed=4,
                          out=tmp_path / "p", progress=False)
    ds = PreparedDataset.open(out)
    test_users = set(ds.split("test").uid.tolist())
    expect = {int(i) + 1 for i in np.random.default_rng([4, 2]).permutation(25)[:3]}
    assert len(test_users) == 3 and test_users == expect
    assert len(ds.split("train")) == 2 * 22
