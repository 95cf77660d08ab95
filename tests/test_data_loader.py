"""Store -> BatchLoader: round trip, rank slicing, resume, IaCN negatives, atomic writing, CLI."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iacn_torchrec.cli import main as iacn_main
from iacn_torchrec.data import protocols, sources
from iacn_torchrec.data.loader import Batch, BatchLoader, PreparedDataset
from iacn_torchrec.data.negatives import LogUniformNegatives, UniformNegatives
from iacn_torchrec.data.prepare import prepare_dataset
from iacn_torchrec.data.sources import DataError


def synthetic_tsv(d: Path, n_users: int = 40, n_items: int = 30, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    rows = ["user_id\titem_id\ttimestamp"]
    for u in range(n_users):
        for t in range(int(rng.integers(2, 12))):
            rows.append(f"{u}\t{rng.integers(0, n_items)}\t{1000 + t}")
    d.mkdir(parents=True, exist_ok=True)
    (d / "i.tsv").write_text("\n".join(rows) + "\n")
    (d / "m.tsv").write_text("item_id\tcate_leaf\n" + "".join(f"{i}\t{i % 4}\n" for i in range(n_items)))
    return d / "i.tsv", d / "m.tsv"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small")
    inter, items = synthetic_tsv(d)
    return prepare_dataset(
        "tsv", interactions=inter, items=items, max_len=5, seed=1, out=d / "ds", progress=False
    )


def rows_of(batch: Batch) -> list[tuple]:
    """Per-sample tuples of every KJT feature (as lists) and the label."""
    kjt = batch.sparse_features
    per_key = {k: [t.tolist() for t in jt.to_dense()] for k, jt in kjt.to_dict().items()}
    return [
        tuple(per_key[k][i] for k in kjt.keys()) + (batch.labels[i].item(),) for i in range(batch.batch_size)
    ]


def source_rows(split: protocols.SplitArrays, idx, neg_hist: bool) -> list[tuple]:
    o = split.hist_offsets
    out = []
    for i in idx:
        h = slice(o[i], o[i + 1])
        r = (
            [split.uid[i]],
            [split.item[i]],
            [split.cate[i]],
            split.hist_item[h].tolist(),
            split.hist_cate[h].tolist(),
        )
        if neg_hist:
            r += (split.neg_hist_item[h].tolist(), split.neg_hist_cate[h].tolist())
        out.append(tuple(list(map(int, x)) for x in r) + (float(split.label[i]),))
    return out


def test_round_trip_equals_source_samples(small):
    ds = PreparedDataset.open(small)
    m = ds.meta
    raw = sources.read_tsv(m["source"]["files"]["interactions"], m["source"]["files"]["items"])
    built = protocols.build_din(
        protocols.index_interactions(raw), max_len=5, seed=1
    )  # in memory, not from disk
    for split in ("train", "test"):
        loader = BatchLoader(ds, split, batch_size=7, shuffle=False, with_neg_hist=True)
        got = [r for b in loader for r in rows_of(b)]
        assert got == source_rows(built.splits[split], range(len(built.splits[split])), True)
        b = next(iter(loader))
        assert b.sparse_features.keys() == [
            "uid",
            "item",
            "cate",
            "hist_item",
            "hist_cate",
            "neg_hist_item",
            "neg_hist_cate",
        ]
        assert b.labels.dtype == torch.float32 and b.sparse_features.values().dtype == torch.int64


def test_shuffled_batches_follow_the_epoch_permutation(small):
    ds = PreparedDataset.open(small)
    loader = BatchLoader(ds, "train", batch_size=16, shuffle=True, seed=3)
    loader.set_epoch(2)
    order = np.random.default_rng([3, 2]).permutation(len(ds.split("train")))
    got = [r for b in loader for r in rows_of(b)]
    assert got == source_rows(ds.split("train"), order, False)
    loader.set_epoch(3)
    assert [r for b in loader for r in rows_of(b)] != got


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_slicing_covers_epoch_once(small, world_size, drop_last):
    ds = PreparedDataset.open(small)
    n = len(ds.split("train"))
    bs = 11
    assert n % (bs * world_size) != 0  # a partial last global batch exists
    seen, lengths = [], []
    per_batch = collections.Counter()  # batch index -> samples over all ranks
    for rank in range(world_size):
        loader = BatchLoader(
            ds, "train", bs, shuffle=True, seed=0, rank=rank, world_size=world_size, drop_last=drop_last
        )
        loader.set_epoch(1)
        order = loader.order()
        batches = list(loader)
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        for b_i, b in enumerate(batches):
            s, e = loader.rank_range(b_i)
            assert rows_of(b) == source_rows(ds.split("train"), order[s:e], False)
            seen.append(order[s:e])
            per_batch[b_i] += e - s
    assert len(set(lengths)) == 1
    assert all(loader.global_batch_samples(b) == k for b, k in per_batch.items())
    seen = np.concatenate(seen)
    assert len(seen) == len(np.unique(seen))  # nothing read twice
    full = (n // (bs * world_size)) * bs * world_size
    assert len(seen) == (full if drop_last else n)  # nothing skipped (but the dropped tail)
    if not drop_last:  # the last partial global batch is split evenly: sizes differ by at most one
        g = bs * world_size
        sizes = [
            BatchLoader(ds, "train", bs, rank=r, world_size=world_size).rank_range(n // g)
            for r in range(world_size)
        ]
        widths = [e - s for s, e in sizes]
        assert sum(widths) == n - full and max(widths) - min(widths) <= 1


def test_resume_mid_epoch(small):
    ds = PreparedDataset.open(small)
    neg = UniformNegatives(ds.num_items, 4, seed=9)

    def make():
        lo = BatchLoader(
            ds, "train", 8, shuffle=True, seed=5, rank=1, world_size=2, with_neg_hist=True, iacn_negatives=neg
        )
        lo.set_epoch(4)
        return lo

    full = [rows_of(b) for b in make()]
    a = make()
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    assert state["epoch"] == 4 and state["batch"] == 3
    b = BatchLoader(
        ds, "train", 8, shuffle=True, seed=5, rank=1, world_size=2, with_neg_hist=True, iacn_negatives=neg
    )
    b.load_state_dict(json.loads(json.dumps(state)))
    rest = [rows_of(x) for x in b]
    assert rest == full[3:] and len(rest) == len(full) - 3
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, "train", 9, seed=5, world_size=2).load_state_dict(state)
    for other, key in ((dict(shuffle=False), "shuffle"), (dict(drop_last=True), "drop_last"),
                       (dict(min_last_batch=2), "min_last_batch"),
                       (dict(iacn_negatives=UniformNegatives(ds.num_items, 4, seed=8)), "negatives_seed")):
        kw = dict(shuffle=True, seed=5, rank=1, world_size=2, with_neg_hist=True, iacn_negatives=neg)
        with pytest.raises(ValueError, match=rf"cannot resume: state has {key}="):
            BatchLoader(ds, "train", 8, **{**kw, **other}).load_state_dict(state)
    with pytest.raises(ValueError, match="drew IaCN negatives, this one has no sampler"):
        BatchLoader(ds, "train", 8, shuffle=True, seed=5, rank=1, world_size=2).load_state_dict(state)


def test_iacn_negatives_features(small):
    ds = PreparedDataset.open(small)
    neg = LogUniformNegatives(ds.item_count, 6, seed=2)
    loader = BatchLoader(ds, "train", 10, shuffle=True, seed=0, iacn_negatives=neg)
    batches = list(loader)
    kjt = batches[0].sparse_features
    assert kjt.keys()[-2:] == ["iacn_neg_item", "iacn_neg_cate"]
    # the per-key sizes the loader passes in are the ones TorchRec computes from the lengths
    fresh = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths())
    assert kjt.length_per_key() == fresh.length_per_key() and kjt.offset_per_key() == fresh.offset_per_key()
    ni = kjt["iacn_neg_item"]
    # S = 6 negatives for each label-1 row, none for label-0 rows; a positive keeps the negatives of
    # the batch's full [B, S] draw, whatever its batch-mates' labels
    labels = batches[0].labels
    assert 0 < labels.sum() < len(labels)
    assert torch.equal(ni.lengths(), 6 * labels.long())
    assert torch.equal(kjt["iacn_neg_cate"].lengths(), ni.lengths())
    full = neg.sample(np.random.default_rng([neg.seed, loader.seed, 0, 0, loader.rank]), len(labels))
    assert torch.equal(ni.values(), torch.from_numpy(full[labels.numpy() > 0].reshape(-1)))
    assert torch.equal(kjt["iacn_neg_cate"].values(), torch.from_numpy(ds.item2cate)[ni.values()])
    assert ni.values().min() >= 1 and ni.values().max() <= ds.num_items
    again = [b.sparse_features["iacn_neg_item"].values() for b in loader]  # same (seed, epoch, batch, rank)
    assert all(torch.equal(x, b.sparse_features["iacn_neg_item"].values()) for x, b in zip(again, batches))
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader)).sparse_features["iacn_neg_item"].values(), ni.values())
    # a seed past 32 bits: the generator still follows default_rng([...]) of the key
    big = BatchLoader(ds, "train", 10, shuffle=True, seed=2**40 + 3, iacn_negatives=neg)
    first = next(iter(big))
    values, labels = first.sparse_features["iacn_neg_item"].values(), first.labels.numpy() > 0
    full = neg.sample(np.random.default_rng([neg.seed, 2**40 + 3, 0, 0, 0]), len(labels))
    assert torch.equal(values, torch.from_numpy(full[labels].reshape(-1)))


def test_samplers_match_their_log_q():
    count = np.array([0, 5, 50, 1, 20, 0, 9], dtype=np.int64)
    rng = np.random.default_rng(0)
    for sampler in (UniformNegatives(6, 50, seed=0), LogUniformNegatives(count, 50, seed=0)):
        q = sampler.log_q.double().exp()
        assert sampler.log_q.shape == (7,) and sampler.log_q[0] == 0
        assert abs(q[1:].sum().item() - 1) < 1e-6
        draws = sampler.sample(rng, 4000)
        assert draws.shape == (4000, 50) and draws.min() >= 1 and draws.max() <= 6
        freq = np.bincount(draws.ravel(), minlength=7)[1:] / draws.size
        assert np.abs(freq - q[1:].numpy()).max() < 0.005
    lu = LogUniformNegatives(count, 1)
    # ranks by popularity: item 2 (50) -> rank 0: q = log(2)/log(7); item 5 (0) ties item... last ranks
    assert lu.rank_to_item.tolist() == [2, 4, 6, 1, 3, 5]
    assert abs(lu.log_q[2].exp().item() - np.log(2) / np.log(7)) < 1e-6
    assert abs(lu.log_q[5].exp().item() - np.log(7 / 6) / np.log(7)) < 1e-6


def test_batch_feeds_a_real_embedding_collection(small):
    ds = PreparedDataset.open(small)
    b = next(iter(BatchLoader(ds, "train", 6, with_neg_hist=True)))
    b = b.to(torch.device("cpu"), non_blocking=False)
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name="uid", embedding_dim=4, num_embeddings=ds.num_users + 1, feature_names=["uid"]
            ),
            EmbeddingConfig(
                name="item",
                embedding_dim=4,
                num_embeddings=ds.num_items + 1,
                feature_names=["item", "hist_item", "neg_hist_item"],
            ),
            EmbeddingConfig(
                name="cate",
                embedding_dim=4,
                num_embeddings=ds.num_cates + 1,
                feature_names=["cate", "hist_cate", "neg_hist_cate"],
            ),
        ]
    )
    out = ec(b.sparse_features)
    lens = b.sparse_features["hist_item"].lengths()
    assert out["hist_item"].values().shape == (int(lens.sum()), 4)
    assert torch.equal(out["item"].values(), ec.embeddings["item"].weight[b.sparse_features["item"].values()])
    assert isinstance(b.sparse_features, KeyedJaggedTensor)


# ---- store: atomic writing, half-written directories, overwrite


def test_half_written_and_damaged_dirs(small, tmp_path, monkeypatch):
    d = tmp_path / "copy"
    shutil.copytree(small, d)
    (d / "meta.json").unlink()
    with pytest.raises(
        DataError, match=r"copy: no meta\.json: not a prepared dataset \(an interrupted"
    ):
        PreparedDataset.open(d)
    shutil.rmtree(d)
    shutil.copytree(small, d)
    (d / "train" / "hist_item.npy").unlink()
    with pytest.raises(
        DataError, match=r"array file\(s\) \['train/hist_item\.npy'\] listed in meta\.json are missing"
    ):
        PreparedDataset.open(d)
    shutil.rmtree(d)
    shutil.copytree(small, d)
    np.save(d / "train" / "label.npy", np.zeros(3, dtype=np.int8))
    with pytest.raises(DataError, match=r"label\.npy: dtype/shape int8\[3\] differ from meta\.json"):
        PreparedDataset.open(d)
    with pytest.raises(DataError, match=r"no such prepared dataset directory"):
        PreparedDataset.open(tmp_path / "absent")
    shutil.rmtree(d)
    shutil.copytree(small, d)
    whole = (d / "vocab" / "item.tsv").read_bytes()
    (d / "vocab" / "item.tsv").unlink()
    ds = PreparedDataset.open(d)  # the arrays are all there: training needs no vocabulary
    for read in (ds.verify, lambda: ds.vocab("item")):
        with pytest.raises(DataError, match=r"vocab/item\.tsv: cannot read the vocabulary"):
            read()
    (d / "vocab" / "item.tsv").write_bytes(b"\xff" + whole[1:])  # every line there, one byte not UTF-8
    with pytest.raises(DataError, match=r"vocab/item\.tsv: not valid UTF-8"):
        ds.vocab("item")
    # a crash while writing leaves neither the target nor anything that looks valid
    inter, items = synthetic_tsv(tmp_path / "raw")
    calls = {"n": 0}
    real_save = np.save

    def failing_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_save(*a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(DataError, match=r"crash: cannot write the dataset \(disk full\)"):
        prepare_dataset("tsv", interactions=inter, items=items, out=tmp_path / "crash", progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "crash").exists() and not list(tmp_path.glob(".crash*"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"afile/o: cannot create its parent folder"):
        prepare_dataset("tsv", interactions=inter, items=items, out=tmp_path / "afile" / "o", progress=False)


def _set(row: int, value: int):
    def f(a):
        a[row] = value
        return a
    return f


def _swap(a):  # offsets 3 and 4 in the wrong order
    a[3], a[4] = a[4], a[3]
    return a


def _last_minus_one(a):  # the last history one item shorter: the history arrays hold one too many
    a[-1] -= 1
    return a


def _zero_first_eight(a):  # still non-decreasing, but sample 7 owns every history up to offset 8
    a[1:8] = 0
    return a


OUT = "is outside the valid range"


@pytest.mark.parametrize(
    "rel, damage, message",
    [
        ("train/item.npy", _set(3, 999999), rf"train/item\.npy: row 3: item id 999999 {OUT} \[0, 30\]"),
        ("test/uid.npy", _set(1, 41), rf"test/uid\.npy: row 1: uid 41 {OUT} \[0, 40\]"),
        ("train/hist_item.npy", _set(2, -1),
         rf"train/hist_item\.npy: row 2 \(history of sample 2\): item id -1 {OUT} \[0, 30\]"),
        ("test/neg_hist_cate.npy", _set(0, 5),
         rf"neg_hist_cate\.npy: row 0 \(history of sample 0\): cate id 5 {OUT} \[0, 4\]"),
        ("train/label.npy", lambda a: a * 7, rf"train/label\.npy: row 0: label 7 {OUT} \[0, 1\]"),
        ("train/hist_offsets.npy", _swap, r"hist_offsets\.npy: row 4: \d+ is below the previous offset \d+"),
        ("train/hist_offsets.npy", _zero_first_eight,
         r"hist_offsets\.npy: rows 7-8: sample 7's history has \d+ items, more than max_len=5"),
        ("train/hist_offsets.npy", _set(0, 1),
         r"hist_offsets\.npy: expected \d+ offsets starting at 0, got \d+ starting at 1"),
        ("test/hist_offsets.npy", _last_minus_one,
         r"test/hist_item\.npy: (\d+) rows, but hist_offsets\.npy ends at (?!\1)\d+"),
        ("test/hist_offsets.npy", _set(-1, 0), r"test/hist_offsets\.npy: row 72: 0 is below"),
        ("item2cate.npy", _set(2, 9), rf"item2cate\.npy: row 2: category id 9 {OUT} \[0, 4\]"),
    ],
)
def test_damaged_array_values_are_refused(small, tmp_path, capsys, rel, damage, message):
    """A value out of range in a prepared array is refused when the dataset is opened (naming the
    file, the first bad row and the valid range), not met as an IndexError deep in training or as
    silently wrong metrics; ``iacn train`` prints it in one line."""
    d = tmp_path / "copy"
    shutil.copytree(small, d)
    a = np.load(d / rel)
    np.save(d / rel, damage(a.copy()).astype(a.dtype))  # same dtype and shape: meta.json still agrees
    with pytest.raises(DataError, match=message + r".*prepare it again with --force"):
        PreparedDataset.open(d)
    if rel == "train/item.npy":
        assert iacn_main(["train", "--data", str(d), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("iacn train: ") and err.count("\n") == 1 and "item id 999999" in err


@pytest.mark.parametrize("kind, count", [("item", "items"), ("uid", "users"), ("cate", "categories")])
def test_a_truncated_vocabulary_is_refused_on_open(small, tmp_path, kind, count):
    """A vocabulary whose line count disagrees with meta.json's counts would map ids to the wrong
    rows or to unknown once exported: refused when the dataset opens, naming the file and both
    numbers (a line count: cheap)."""
    d = tmp_path / "copy"
    shutil.copytree(small, d)
    n = json.loads((d / "meta.json").read_text())["counts"][count]
    lines = (d / "vocab" / f"{kind}.tsv").read_text().split("\n")
    (d / "vocab" / f"{kind}.tsv").write_text("\n".join(lines[: n // 2]) + "\n")
    with pytest.raises(DataError, match=rf"vocab/{kind}\.tsv: {n // 2} lines, but meta\.json's "
                                        rf"counts\.{count} is {n}; .*prepare it again with --force"):
        PreparedDataset.open(d)
    (d / "vocab" / f"{kind}.tsv").write_text("\n".join(lines)[:-3])  # cut inside its last line
    with pytest.raises(DataError, match=rf"vocab/{kind}\.tsv: the last line is cut short"):
        PreparedDataset.open(d)


def test_an_open_stats_the_vocabularies_and_a_read_counts_their_lines(small, tmp_path):
    """meta.json records each vocabulary's size, so an open reads none of them (a 10M-item
    vocabulary would be read whole at every process start): a file of the recorded size passes the
    open unread, and its lines are counted where it is read (``vocab``, ``vocab_bytes``, the
    export). A file of another size is read and refused at the open, naming what is wrong; a dataset
    prepared before the field existed has its lines counted at the open."""
    d = tmp_path / "copy"
    shutil.copytree(small, d)
    meta = json.loads((d / "meta.json").read_text())
    p = d / "vocab" / "item.tsv"
    data = p.read_bytes()
    sizes = {k: (d / "vocab" / f"{k}.tsv").stat().st_size for k in ("uid", "item", "cate")}
    assert meta["vocab_bytes"] == sizes
    n = meta["counts"]["items"]
    merged = data.replace(b"\n", b" ", 1)  # the same size, one line fewer: only a read can tell
    p.write_bytes(merged)
    ds = PreparedDataset.open(d)  # not read
    for read in (lambda: ds.vocab("item"), lambda: ds.read_vocab_file("item"), ds.verify):
        with pytest.raises(DataError, match=rf"vocab/item\.tsv: {n - 1} lines, but meta\.json's "
                                            rf"counts\.items is {n}"):
            read()
    assert ds.vocab("cate") == PreparedDataset.open(small).vocab("cate")
    p.write_bytes(data + b"x\t0\n")  # another size: read at the open, and its line count named
    with pytest.raises(DataError, match=rf"vocab/item\.tsv: {n + 1} lines, but meta\.json's counts\.items"):
        PreparedDataset.open(d)
    p.write_bytes(data.replace(b"\t1\n", b"\t01\n", 1))  # the lines add up, the size does not
    with pytest.raises(DataError, match=rf"vocab/item\.tsv: {len(data) + 1:,} bytes, but meta\.json's "
                                        rf"vocab_bytes\.item is {len(data):,}"):
        PreparedDataset.open(d)
    del meta["vocab_bytes"]  # prepared before the field: the open counts lines, as it did
    (d / "meta.json").write_text(json.dumps(meta))
    p.write_bytes(merged)
    with pytest.raises(DataError, match=rf"vocab/item\.tsv: {n - 1} lines"):
        PreparedDataset.open(d)
    p.write_bytes(data)
    assert PreparedDataset.open(d).vocab("item") == PreparedDataset.open(small).vocab("item")


def _drop(*path: str):
    def f(meta):
        *head, last = path
        for k in head:
            meta = meta[k]
        del meta[last]
    return f


def _put(value, *path: str):
    def f(meta):
        *head, last = path
        for k in head:
            meta = meta[k]
        meta[last] = value
    return f


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("counts", "users"), r"missing field 'counts\.users'"),
        (_put("many", "counts", "items"), r"field 'counts\.items': 'many' is not a non-negative integer"),
        (_put(True, "counts", "categories"), r"field 'counts\.categories': True is not a non-negative"),
        (_put(-1, "counts", "train_samples"), r"field 'counts\.train_samples': -1 is not a non-negative"),
        (_put([], "counts"), r"field 'counts': expected an object"),
        (_drop("max_len"), r"missing field 'max_len'"),
        (_put(None, "max_len"), r"field 'max_len': None is not a positive integer"),
        (_put(5.0, "max_len"), r"field 'max_len': 5\.0 is not a positive integer"),
        (_put(10**11, "max_len"), r"max_len 100,000,000,000 is above the supported 10,000 .*prepare it "
                                  r"again with a smaller --max-len"),
        (_put([], "arrays"), r"field 'arrays': expected an object"),
        (_drop("arrays", "train/label.npy"), r"field 'arrays': 'train/label\.npy' is not listed"),
        (_drop("arrays", "item2cate.npy"), r"field 'arrays': 'item2cate\.npy' is not listed"),
        (_put({"dtype": "int64"}, "arrays", "train/uid.npy"),
         r"field 'arrays\.train/uid\.npy': expected \{\"dtype\": str, \"shape\": \[int, \.\.\.\]\}"),
        (_put({"dtype": "int64", "shape": ["x"]}, "arrays", "test/item.npy"),
         r"field 'arrays\.test/item\.npy': expected"),
        (_put(7, "protocol"), r"field 'protocol': 7 is not a string"),
        (_put("12", "vocab_bytes", "item"), r"field 'vocab_bytes': expected .*'item': '12'"),
        (_put({"items": 12}, "vocab_bytes"), r"field 'vocab_bytes': expected .*'items': 12"),
    ],
    ids=["no-users", "items-str", "cate-bool", "negative-count", "counts-list", "no-max-len", "max-len-null",
         "max-len-float", "max-len-huge", "arrays-list", "no-train-label", "no-item2cate", "entry-no-shape",
         "entry-bad-shape", "protocol-int", "vocab-bytes-str", "vocab-bytes-kind"],
)
def test_an_edited_meta_json_is_refused_naming_the_field(small, tmp_path, capsys, edit, message):
    """Fields the code reads (counts, max_len, arrays, protocol) are checked for presence and type
    when the dataset opens: a one-line error naming meta.json and the field, not a KeyError,
    TypeError or AttributeError traceback in training."""
    d = tmp_path / "copy"
    shutil.copytree(small, d)
    meta = json.loads((d / "meta.json").read_text())
    edit(meta)
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"copy/meta\.json: " + message):
        PreparedDataset.open(d)
    if message.startswith("missing field 'counts"):
        assert iacn_main(["train", "--data", str(d), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("iacn train: ") and err.count("\n") == 1 and "counts.users" in err


def test_overwrite_rules(tmp_path, monkeypatch):
    inter, items = synthetic_tsv(tmp_path / "raw")
    kw = dict(interactions=inter, items=items, progress=False)
    out = prepare_dataset("tsv", out=tmp_path / "o", **kw)
    h0 = json.loads((out / "meta.json").read_text())["content_hash"]
    with pytest.raises(DataError, match=r"a prepared dataset already exists; pass --force"):
        prepare_dataset("tsv", out=out, seed=1, **kw)
    prepare_dataset("tsv", out=out, seed=1, overwrite=True, **kw)
    assert json.loads((out / "meta.json").read_text())["content_hash"] != h0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for force in (False, True):  # a folder of something else is never replaced, not even with --force
        with pytest.raises(DataError, match=r"exists, is not empty and is not a prepared dataset"):
            prepare_dataset("tsv", out=tmp_path / "mine", overwrite=force, **kw)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "o", "raw"]  # no temp siblings left
    # an overwrite whose final rename fails puts the previous dataset back
    h1 = json.loads((out / "meta.json").read_text())["content_hash"]
    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.startswith(".o.tmp-"):
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(DataError, match=r"o: cannot write the dataset \(disk gone\)"):
        prepare_dataset("tsv", out=out, seed=2, overwrite=True, **kw)
    monkeypatch.undo()
    assert json.loads((out / "meta.json").read_text())["content_hash"] == h1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "o", "raw"]
    # a dataset of ours that this code cannot open (an older format) is still ours to replace
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(DataError, match="format_version"):
        PreparedDataset.open(out)
    prepare_dataset("tsv", out=out, seed=1, overwrite=True, **kw)
    ds = PreparedDataset.open(out, verify=True)
    np.asarray(ds.split("train").item)  # mapped read-only
    assert not ds.split("train").item.flags.writeable


# ---- CLI


def test_cli_prepare_and_bench(tmp_path, capsys):
    inter, items = synthetic_tsv(tmp_path / "raw")
    rc = iacn_main(
        [
            "prepare",
            "--source",
            "tsv",
            "--interactions",
            str(inter),
            "--items",
            str(items),
            "--protocol",
            "dien",
            "--max-len",
            "4",
            "--seed",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert (
        rc == 0
        and "protocol dien" in out
        and "users 40" in out
        and "skipped:" in out
        and "content sha256:" in out
    )
    rc = iacn_main(
        [
            "prepare",
            "--source",
            "tsv",
            "--interactions",
            str(inter),
            "--items",
            str(items),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = iacn_main(
        [
            "bench",
            "data",
            "--data",
            str(tmp_path / "o"),
            "--batch-size",
            "16",
            "--min-seconds",
            "0.05",
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and res["loader_samples_per_s"] > 0 and "prepare_s" in res and res["batch_size"] == 16


def test_min_last_batch_drops_a_too_small_last_batch(small):
    """Training's loader drops a last batch that would give a rank fewer than 2 samples, and says
    how many samples that is."""
    ds = PreparedDataset.open(small)
    n = len(ds.split("train"))
    one = BatchLoader(ds, "train", n - 1, min_last_batch=2)  # a last batch of 1: dropped
    assert len(one) == 1 and one.dropped_per_epoch == 1 and sum(len(b.labels) for b in one) == n - 1
    two = BatchLoader(ds, "train", n - 2, min_last_batch=2)  # a last batch of 2: kept
    assert len(two) == 2 and two.dropped_per_epoch == 0 and sum(len(b.labels) for b in two) == n
    for rank in (0, 1):  # 2 ranks, a last global batch of 3: one rank would get 1 sample
        lo = BatchLoader(ds, "train", (n - 3) // 2 if (n - 3) % 2 == 0 else (n - 4) // 2, rank=rank,
                         world_size=2, min_last_batch=2)
        rem = n % (2 * lo.batch_size)
        assert lo.dropped_per_epoch == (rem if rem // 2 < 2 else 0)
        assert len(lo) == n // (2 * lo.batch_size) + (0 if lo.dropped_per_epoch or not rem else 1)
    assert len(BatchLoader(ds, "train", n - 1)) == 2  # the default keeps it


def test_limit_and_tiny_last_batch(small):
    ds = PreparedDataset.open(small)
    item = ds.split("test").item
    sizes = []
    for rank in range(4):
        lo = BatchLoader(ds, "test", 2, rank=rank, world_size=4, limit=3)
        (b,) = list(lo)  # one global batch of 3 < 4 ranks: rank 0 gets an empty batch
        sizes.append(b.batch_size)
        s, e = lo.rank_range(0)
        assert b.sparse_features["item"].values().tolist() == item[s:e].tolist()
        assert b.sparse_features.keys()[:3] == ["uid", "item", "cate"] and b.labels.shape == (e - s,)
    assert sizes == [0, 1, 1, 1]
    assert len(BatchLoader(ds, "test", 4, limit=10, drop_last=True)) == 2


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_cli_bench_data_refuses_a_bad_batch_size(value, capsys):
    with pytest.raises(SystemExit) as e:
        iacn_main(["bench", "data", "--batch-size", value])
    assert e.value.code == 2 and "argument --batch-size" in capsys.readouterr().err


def test_popularity_negative_behaviours_follow_the_counts_and_never_the_real_item():
    """Each draw is an item in proportion to its interaction count, redrawn when it is the
    position's own item: given the real item r, item i ≠ r comes with probability c_i / (C − c_r);
    the padding id and items without interactions never come."""
    from iacn_torchrec.data.negatives import PopularityNegativeBehaviours

    counts = np.array([0, 5, 0, 1, 10, 4])  # id 0: padding; id 2: no interactions
    s = PopularityNegativeBehaviours(counts, seed=0)
    real = np.random.default_rng(0).integers(1, 6, size=200_000)
    neg = s.sample(np.random.default_rng(1), real)
    assert neg.dtype == np.int64 and not (neg == real).any() and set(np.unique(neg).tolist()) == {1, 3, 4, 5}
    share = np.bincount(real, minlength=6) / real.size
    expected = sum(share[r] * np.where(np.arange(6) == r, 0, counts) / (counts.sum() - counts[r])
                   for r in range(1, 6))
    np.testing.assert_allclose(np.bincount(neg, minlength=6) / neg.size, expected, atol=0.004)
    again = [s.sample(np.random.default_rng(7), real[:100]) for _ in range(2)]
    assert np.array_equal(*again)  # the generator's state decides the draws
    with pytest.raises(ValueError, match="at least two items with interactions"):
        PopularityNegativeBehaviours(np.array([0, 3, 0]))


def test_the_loader_draws_dien_negative_behaviours_for_every_batch(small):
    """With a popularity sampler the negative behaviours are drawn per batch: never the real item at
    their position, categories through item2cate, the same for the same (seed, epoch, batch) (so a
    resumed epoch gets them back), others in the next epoch; the rest of the batch is unchanged."""
    from iacn_torchrec.data.negatives import PopularityNegativeBehaviours, UniformNegatives

    ds = PreparedDataset.open(small)
    sampler = PopularityNegativeBehaviours(ds.item_count, seed=3)
    iacn = UniformNegatives(ds.num_items, 4, seed=5)  # IaCN's negatives come after them in the KJT
    loader = BatchLoader(ds, "train", batch_size=16, shuffle=True, seed=0, with_neg_hist=True,
                         neg_hist_sampler=sampler, iacn_negatives=iacn)
    fixed = BatchLoader(ds, "train", batch_size=16, shuffle=True, seed=0, with_neg_hist=True,
                        iacn_negatives=iacn)

    def epoch(ld, e):
        ld.set_epoch(e)
        return [b.sparse_features.to_dict() for b in ld]

    first, again, fixed0 = epoch(loader, 0), epoch(loader, 0), epoch(fixed, 0)
    changed = 0
    for f, a, p in zip(first, again, fixed0, strict=True):
        neg, real = f["neg_hist_item"].values().numpy(), f["hist_item"].values().numpy()
        assert not (neg == real).any() and neg.min() >= 1 and neg.max() <= ds.num_items
        assert np.array_equal(f["neg_hist_cate"].values().numpy(), ds.item2cate[neg])
        assert torch.equal(f["neg_hist_item"].lengths(), f["hist_item"].lengths())
        assert torch.equal(a["neg_hist_item"].values(), f["neg_hist_item"].values())
        for k in ("uid", "item", "cate", "hist_item", "hist_cate", "iacn_neg_item", "iacn_neg_cate"):
            assert torch.equal(f[k].values(), p[k].values()), k
            assert torch.equal(f[k].lengths(), p[k].lengths()), k
        changed += not torch.equal(f["neg_hist_item"].values(), p["neg_hist_item"].values())
    assert changed == len(first)  # not the prepared draws
    in_order = BatchLoader(ds, "train", batch_size=16, seed=0, with_neg_hist=True, neg_hist_sampler=sampler)
    e0, e1 = epoch(in_order, 0), epoch(in_order, 1)  # the same samples in the same batches
    pairs = list(zip(e0, e1, strict=True))
    assert all(torch.equal(s["hist_item"].values(), t["hist_item"].values()) for s, t in pairs)
    assert not all(torch.equal(s["neg_hist_item"].values(), t["neg_hist_item"].values())
                   for s, t in pairs)  # another epoch, other negatives


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_a_short_last_evaluation_batch_joins_the_one_before(small, world_size):
    """With ``merge_short_last`` a last global batch of fewer samples than ranks (where a rank would
    get an empty batch, which a sharded forward cannot take) is read with the batch before it: every
    sample once, every rank's every batch non-empty, the same batch count on every rank."""
    ds = PreparedDataset.open(small)
    bs = 4
    g = bs * world_size
    for limit in (g + 1, 3 * g + world_size - 1, 2 * g, 2 * g + world_size):
        seen, counts = [], set()
        for rank in range(world_size):
            loader = BatchLoader(ds, "test", bs, rank=rank, world_size=world_size, limit=limit,
                                 merge_short_last=True)
            batches = list(loader)
            counts.add(len(batches))
            assert all(len(b.labels) > 0 for b in batches), (limit, rank)
            seen += [loader.order()[slice(*loader.rank_range(i))] for i in range(len(batches))]
            assert sum(loader.global_batch_samples(i) for i in range(len(loader))) == limit
        assert len(counts) == 1
        seen = np.concatenate(seen)
        assert sorted(seen.tolist()) == list(range(limit)), limit
    plain = BatchLoader(ds, "test", bs, rank=0, world_size=world_size, limit=g + 1)
    assert len(list(plain)[-1].labels) == 0  # without it, rank 0's last batch is empty
