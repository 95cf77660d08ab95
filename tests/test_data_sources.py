"""Readers (tsv, amazon-json, dien, movielens) and every bad-input case."""

from __future__ import annotations

import gzip
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from iacn_torchrec.data.loader import PreparedDataset
from iacn_torchrec.data.prepare import prepare_dataset
from iacn_torchrec.data.sources import DataError, Report, read_amazon_json, read_dien, read_table, read_tsv

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DIEN_SAMPLE = SHARED / "data" / "dien-books-sample"
MOVIELENS = SHARED / "data" / "movielens-100k"

INTER = "user_id\titem_id\ttimestamp\n1\t10\t100\n1\t11\t200\n1\t12\t300\n2\t10\t50\n2\t12\t60\n2\t13\t70\n"
ITEMS = "item_id\tcate_leaf\n10\t5\n11\t5\n12\t6\n13\t7\n"


def prep(tmp: Path, inter: str = INTER, items: str = ITEMS, **kw) -> Path:
    (tmp / "i.tsv").write_text(inter)
    (tmp / "m.tsv").write_text(items)
    return prepare_dataset(
        "tsv", interactions=tmp / "i.tsv", items=tmp / "m.tsv", out=tmp / "out", progress=False, **kw
    )


def arrays(out: Path) -> dict[str, bytes]:
    meta = json.loads((out / "meta.json").read_text())
    return {k: (out / k).read_bytes() for k in meta["arrays"]}


# ---- tsv


def test_tsv_gzip_and_crlf_read_the_same(tmp_path):
    base = prep(tmp_path)
    for variant, text in (("gz", INTER), ("crlf", INTER.replace("\n", "\r\n"))):
        d = tmp_path / variant
        d.mkdir()
        if variant == "gz":
            with gzip.open(d / "i.tsv.gz", "wt") as f:
                f.write(text)
            inter = d / "i.tsv.gz"
        else:
            inter = d / "i.tsv"
            inter.write_bytes(text.encode())
        (d / "m.tsv").write_text(ITEMS)
        out = prepare_dataset("tsv", interactions=inter, items=d / "m.tsv", out=d / "out", progress=False)
        assert arrays(out) == arrays(base), variant


def test_tsv_string_ids_and_category_column(tmp_path):
    inter = "user_id\titem_id\ttimestamp\nbob\tB07\t3\nbob\tA01\t1\nbob\tC9\t2\n"
    items = "item_id\tcate_leaf\tcate_l1\nA01\tlip\tmakeup\nB07\teye\tmakeup\nC9\tsoap\tbath\n"
    out = prep(tmp_path, inter, items, category_column="cate_l1")
    ds = PreparedDataset.open(out)
    assert ds.vocab("item") == ["A01", "B07", "C9"] and ds.vocab("cate") == ["bath", "makeup"]
    assert ds.item2cate.tolist() == [0, 2, 2, 1]
    te = ds.split("test")
    assert te.item[0] == 2 and te.hist_item.tolist() == [1, 3, 1, 3]  # bob: A01(t1) C9(t2) B07(t3)


def test_tsv_ids_keep_leading_zeros(tmp_path):
    inter = "user_id\titem_id\ttimestamp\n1\t007\t1\n1\t7\t2\n1\t0070\t3\n"
    out = prep(tmp_path, inter, "item_id\tcate_leaf\n7\t1\n007\t2\n0070\t2\n")
    ds = PreparedDataset.open(out)
    assert ds.vocab("item") == ["007", "0070", "7"] and ds.item2cate.tolist() == [0, 2, 2, 1]


@pytest.mark.parametrize("blank", ["", "\n"])  # a blank line sends any file to the slow path
@pytest.mark.parametrize("a, b", [(" 0042", "42"), ("-0", "0"), ("+5", "5")])
def test_tsv_id_spelling_decides_identity_on_both_paths(tmp_path, blank, a, b):
    """Whether two ids are one item must not depend on unrelated formatting elsewhere in the file."""
    path = tmp_path / "t.tsv"
    path.write_text(f"user_id\titem_id\n1\t{a}\n{blank}1\t{b}\n")
    got = read_table(path, ["item_id"], report=Report())["item_id"]
    assert len(set(got.tolist())) == 2, got


def test_item_without_metadata_gets_category_zero(tmp_path):
    out = prep(tmp_path, items="item_id\tcate_leaf\n10\t5\n11\t5\n12\t\n")  # 12: empty category, 13: no row
    ds = PreparedDataset.open(out)
    assert ds.item2cate.tolist() == [0, 1, 1, 0, 0]
    rep = ds.meta["repaired"]
    assert rep["item_without_metadata"]["count"] == 2
    assert "category 0" in rep["item_without_metadata"]["reason"]
    assert rep["meta_rows_without_category"]["count"] == 1


def test_bad_malformed_line(tmp_path):
    with pytest.raises(
        DataError, match=r"i\.tsv: line 4: malformed line: 2 tab-separated field\(s\).*'timestamp'"
    ):
        prep(tmp_path, INTER.replace("1\t12\t300", "1\t12"))


@pytest.mark.parametrize("ids", ["int", "str"])  # all-integer: np.loadtxt's fast path; else the slow one
def test_bad_extra_fields(tmp_path, ids):
    inter = INTER if ids == "int" else INTER.replace("\n1\t", "\nu1\t").replace("\n2\t", "\nu2\t")
    bad = "malformed line: {} tab-separated field\\(s\\), expected {}$"
    with pytest.raises(DataError, match=r"i\.tsv: line 4: " + bad.format(4, 3)):
        prep(tmp_path, inter.replace("\t300\n", "\t300\textra\n"))
    with pytest.raises(DataError, match=r"m\.tsv: line 3: " + bad.format(3, 2)):
        prep(tmp_path, items=ITEMS.replace("11\t5\n", "11\t5\t9\n"))
    # a line lacking only an unread trailing column is still fine (the column is not needed)
    prep(tmp_path, items="item_id\tcate_leaf\tbrand\n10\t5\t1\n11\t5\n12\t6\t2\n13\t7\t2\n", overwrite=True)


@pytest.mark.parametrize(
    "inter, shown",
    [
        (INTER.replace("1\t11\t200", "1\t11\x00\t200"), r"field 'item_id': '11\\x00'"),  # would merge into 11
        (INTER.replace("1\t11\t200", "1\t11\x0099\t200"), r"field 'item_id': '11\\x0099'"),  # a new item
        (INTER.replace("1\t11\t200", "1\x1c\t11\t200"), r"field 'user_id': '1\\x1c'"),
        (INTER.replace("1\t11\t200", "1\tx11\x7f\t200"), r"field 'item_id': 'x11\\x7f'"),  # slow path
        (INTER.replace("1\t11\t200", "1\t11\t2\x0000"), r"field 'timestamp': '2\\x0000'"),
    ],
    ids=["trailing-nul", "inner-nul", "unit-separator", "del-slow-path", "timestamp"],
)
def test_bad_control_character_in_a_field(tmp_path, inter, shown):
    with pytest.raises(DataError, match=rf"i\.tsv: line 3: {shown} contains the control character"):
        prep(tmp_path, inter)


def test_control_character_in_an_unread_column_is_harmless(tmp_path):
    out = prep(tmp_path, items="item_id\tcate_leaf\ttitle\n10\t5\ta\x01b\n11\t5\tx\n12\t6\t\x00\n13\t7\ty\n")
    assert PreparedDataset.open(out).item2cate.tolist() == [0, 1, 1, 2, 3]
    with pytest.raises(DataError, match=r"m\.tsv: line 3: field 'cate_leaf': '5\\x00'"):
        prep(tmp_path, items="item_id\tcate_leaf\ttitle\n10\t5\ta\x01b\n11\t5\x00\tx\n12\t6\t\n13\t7\ty\n",
             overwrite=True)


def test_bad_missing_column(tmp_path):
    with pytest.raises(DataError, match=r"i\.tsv: line 1: missing column\(s\) \['timestamp'\]"):
        prep(tmp_path, INTER.replace("timestamp", "time"))
    with pytest.raises(DataError, match=r"m\.tsv: line 1: missing column\(s\) \['cate_l1'\]"):
        prep(tmp_path, category_column="cate_l1")


def test_bad_non_numeric_timestamp(tmp_path):
    with pytest.raises(DataError, match=r"i\.tsv: line 3: field 'timestamp': 'noon' is not a number"):
        prep(tmp_path, INTER.replace("200", "noon"))
    with pytest.raises(DataError, match=r"line 2: field 'timestamp': '1.5' is not an integer"):
        prep(tmp_path, INTER.replace("\t100\n", "\t1.5\n"))


def test_bad_empty_id_field(tmp_path):
    with pytest.raises(DataError, match=r"i\.tsv: line 5: field 'user_id' is empty"):
        prep(tmp_path, INTER.replace("2\t10\t50", "\t10\t50"))


def test_bad_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: file not found"):
        prepare_dataset(
            "tsv",
            interactions=tmp_path / "nope.tsv",
            items=tmp_path / "m.tsv",
            out=tmp_path / "o",
            progress=False,
        )
    (tmp_path / "bad.tsv.gz").write_bytes(b"not gzip at all")
    (tmp_path / "m.tsv").write_text(ITEMS)
    with pytest.raises(DataError, match=r"bad\.tsv\.gz: cannot read"):
        prepare_dataset(
            "tsv",
            interactions=tmp_path / "bad.tsv.gz",
            items=tmp_path / "m.tsv",
            out=tmp_path / "o",
            progress=False,
        )
    with pytest.raises(DataError, match=r"needs --items"):
        prepare_dataset("tsv", interactions=tmp_path / "m.tsv", out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_short_users_skipped_and_counted(tmp_path):
    out = prep(tmp_path, INTER + "3\t10\t1\n4\t11\t1\n4\t12\t2\n")
    sk = PreparedDataset.open(out).meta["skipped"]
    assert sk["users_below_min_len"]["count"] == 2 and sk["interactions_of_skipped_users"]["count"] == 3


def test_read_tsv_returns_raw_columns(tmp_path):
    (tmp_path / "i.tsv").write_text(INTER)
    (tmp_path / "m.tsv").write_text(ITEMS)
    r = read_tsv(tmp_path / "i.tsv", tmp_path / "m.tsv")
    assert r.user.tolist() == [1, 1, 1, 2, 2, 2] and r.timestamp.dtype == np.int64
    assert r.item_ids.tolist() == [10, 11, 12, 13] and r.item_cate.tolist() == [5, 5, 6, 7]


# ---- amazon-json


def write_amazon(tmp: Path, reviews: list[str], meta: list[str]) -> tuple[Path, Path]:
    rp, mp = tmp / "reviews_Beauty_5.json.gz", tmp / "meta_Beauty.json.gz"
    with gzip.open(rp, "wt") as f:
        f.write("\n".join(reviews) + "\n")
    with gzip.open(mp, "wt") as f:
        f.write("\n".join(meta) + "\n")
    return rp, mp


REVIEWS = [  # strict JSON, as the 2014 review files are
    '{"reviewerID": "U1", "asin": "B01", "overall": 5.0, "unixReviewTime": 1300000000}',
    '{"reviewerID": "U1", "asin": "B02", "unixReviewTime": 1200000000}',
    '{"reviewerID": "U1", "asin": "B03", "unixReviewTime": 1400000000}',
    '{"reviewerID": "U2", "asin": "B01", "unixReviewTime": 1100000000}',
    '{"reviewerID": "U2", "asin": "B04", "unixReviewTime": 1100000001}',
    '{"reviewerID": "U2", "asin": "B02", "unixReviewTime": 1100000002}',
]
META = [  # Python literals, as the 2014 metadata files are
    "{'asin': 'B01', 'categories': [['Beauty', 'Skin Care', 'Face'], ['Beauty', 'Bath']], 'price': 9.5}",
    "{'asin': 'B02', 'categories': [['Beauty', 'Makeup']], 'title': \"L'Or\\u00e9al\"}",
    '{"asin": "B03", "categories": [["Beauty", "Skin Care", "Face"]]}',
    "{'asin': 'B05', 'categories': []}",
]


def test_amazon_json_reader(tmp_path):
    rp, mp = write_amazon(tmp_path, REVIEWS, META)
    raw = read_amazon_json(rp, mp)
    assert raw.user.tolist() == ["U1"] * 3 + ["U2"] * 3
    assert raw.timestamp.tolist()[:2] == [1300000000, 1200000000]
    assert dict(zip(raw.item_ids.tolist(), raw.item_cate.tolist())) == {
        "B01": "Face",
        "B02": "Makeup",
        "B03": "Face",
    }
    assert raw.report.repaired["meta_rows_without_category"]["count"] == 1  # B05
    out = prepare_dataset("amazon-json", reviews=rp, meta=mp, out=tmp_path / "out", progress=False)
    ds = PreparedDataset.open(out)
    assert ds.vocab("item") == ["B01", "B02", "B03", "B04"] and ds.vocab("cate") == ["Face", "Makeup"]
    assert ds.item2cate.tolist() == [0, 1, 2, 1, 0]  # B04 has no metadata
    assert ds.meta["repaired"]["item_without_metadata"]["count"] == 1
    te = ds.split("test")  # U1: B02 B01 B03 ; U2: B01 B04 B02
    assert te.item[0::2].tolist() == [3, 2] and te.hist_item.tolist() == [2, 1, 2, 1, 1, 4, 1, 4]


def test_amazon_json_bad_lines(tmp_path):
    rp, mp = write_amazon(tmp_path, REVIEWS[:2] + ['{"reviewerID": "U3", "asin": "B01"}'], META)
    with pytest.raises(
        DataError, match=r"reviews_Beauty_5\.json\.gz: line 3: missing field 'unixReviewTime'"
    ):
        read_amazon_json(rp, mp)
    rp, mp = write_amazon(
        tmp_path, REVIEWS[:2] + ['{"reviewerID": "U3", "asin": "B01", "unixReviewTime": "x"}'], META
    )
    with pytest.raises(DataError, match=r"line 3: field 'unixReviewTime': 'x' is not a number"):
        read_amazon_json(rp, mp)
    # the first non-empty category path counts
    rp, mp = write_amazon(tmp_path, REVIEWS, META[:1] + ["{'asin': 'B02', 'categories': [[], ['Bath']]}"])
    raw = read_amazon_json(rp, mp)
    assert dict(zip(raw.item_ids.tolist(), raw.item_cate.tolist()))["B02"] == "Bath"
    # categories must be a list of category paths: a flat list or a string is refused, naming the line
    for bad in ("['Beauty']", "'Beauty'"):
        rp, mp = write_amazon(tmp_path, REVIEWS, META[:1] + [f"{{'asin': 'B02', 'categories': {bad}}}"])
        with pytest.raises(DataError, match=r"meta_Beauty\.json\.gz: line 2: field 'categories': expected a "
                                            r"list of category paths"):
            read_amazon_json(rp, mp)
    # code is never evaluated: ast.literal_eval refuses calls
    evil = "{'asin': __import__('os').getcwd(), 'categories': [['x']]}"
    rp, mp = write_amazon(tmp_path, REVIEWS, META[:1] + [evil])
    with pytest.raises(
        DataError, match=r"meta_Beauty\.json\.gz: line 2: malformed line: neither JSON nor a Python"
    ):
        read_amazon_json(rp, mp)


# ---- dien


needs_dien = pytest.mark.skipif(not DIEN_SAMPLE.exists(), reason="shared DIEN sample absent")


@needs_dien
def test_dien_sample_rows(tmp_path):
    out = prepare_dataset("dien", path=DIEN_SAMPLE, seed=0, out=tmp_path / "d", progress=False)
    ds = PreparedDataset.open(out, verify=True)
    assert ds.meta["protocol"] == "dien-files"
    uid, item, cate = ds.vocab("uid"), ds.vocab("item"), ds.vocab("cate")
    assert cate == ["Books"] and not any("\r" in t for t in uid + item)  # CRLF stripped

    def row(split: str, i: int):
        s = ds.split(split)
        o = s.hist_offsets
        names = lambda ids, voc: [voc[j - 1] if j else 0 for j in ids]  # noqa: E731
        return (
            int(s.label[i]),
            uid[s.uid[i] - 1],
            item[s.item[i] - 1],
            names([s.cate[i]], cate)[0],
            names(s.hist_item[o[i] : o[i + 1]], item),
            names(s.hist_cate[o[i] : o[i + 1]], cate),
        )

    # local_train line 1: 1 A38AAPXSJN4C5G 0000230022 Books 0000015393 default_cat
    assert row("train", 0) == (1, "A38AAPXSJN4C5G", "0000230022", "Books", ["0000015393"], [0])
    # local_test line 1: 0 A38AAPXSJN4C5G 0001714384 Books 0000015393^B0000230022 default_cat^BBooks
    assert row("test", 0) == (
        0,
        "A38AAPXSJN4C5G",
        "0001714384",
        "Books",
        ["0000015393", "0000230022"],
        [0, "Books"],
    )
    # local_test line 6: 1 A39J92OJUYHVNK 0001857029 default_cat 000102521X Books
    assert row("test", 5) == (1, "A39J92OJUYHVNK", "0001857029", 0, ["000102521X"], ["Books"])
    c = ds.meta["counts"]
    assert (c["train_samples"], c["train_positives"], c["test_samples"], c["test_positives"]) == (
        1,
        1,
        38,
        19,
    )
    assert c["users"] == 19 and c["categories"] == 1
    assert "blank_lines" not in ds.meta["skipped"]
    assert ds.meta["repaired"]["dien_default_cat"]["count"] > 0
    for s in ("train", "test"):
        sp = ds.split(s)
        assert (sp.neg_hist_item != sp.hist_item).all() and (sp.neg_hist_item >= 1).all()


@needs_dien
def test_dien_reviews_info_path(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    for f in ("reviews-info", "item-info"):
        shutil.copy(DIEN_SAMPLE / f, d / f)
    raw = read_dien(d)
    assert len(raw.user) == 1000 and raw.item_ids.dtype.kind == "U"
    out = prepare_dataset("dien", path=d, protocol="din", out=tmp_path / "o", progress=False)
    ds = PreparedDataset.open(out)
    lines = [ln.split("\t") for ln in (d / "reviews-info").read_text().splitlines()]
    info = {ln.split("\t")[0] for ln in (d / "item-info").read_text().splitlines()}
    assert ds.num_users == len({ln[0] for ln in lines}) and ds.num_items == len({ln[1] for ln in lines})
    assert ds.meta["repaired"]["item_without_metadata"]["count"] == len({ln[1] for ln in lines} - info)


def write_dien(d: Path, train: list[str], test: list[str]) -> None:
    d.mkdir(exist_ok=True)
    (d / "local_train_splitByUser").write_bytes(("\r\n".join(train) + "\r\n").encode())
    (d / "local_test_splitByUser").write_bytes(("\r\n".join(test) + "\r\n").encode())


def test_dien_vocab_pkl_unknown_ids_and_empty_history(tmp_path):
    d = tmp_path / "dien"
    write_dien(
        d,
        ["1\tu1\tm2\tc1\tm1\x02m3\tc1\x02c2", "0\tu1\tm9\tc1\tm1\x02m3\tc1\x02c2", "1\tu2\tm1\tc1\t\t"],
        ["1\tu2\tm3\tc2\tm1\tc1", "0\tu2\tm2\tc1\tm1\tc1"],
    )
    with open(d / "mid_voc.pkl", "wb") as f:
        pickle.dump({"default_mid": 0, "m3": 1, "m1": 2, "m2": 3}, f)  # DIEN order: by frequency
    ds = PreparedDataset.open(prepare_dataset("dien", path=d, out=tmp_path / "o", progress=False))
    assert ds.vocab("item") == ["m3", "m1", "m2"]  # the pkl's order, default_mid -> 0
    tr = ds.split("train")
    assert tr.item.tolist() == [3, 0]  # m9 is not in mid_voc.pkl -> 0 (unknown)
    assert tr.hist_item.tolist() == [2, 1, 2, 1]
    m = ds.meta
    assert m["repaired"]["unknown_item_ids"]["count"] == 1
    assert m["skipped"]["empty_history"]["count"] == 1
    assert "empty history" in m["skipped"]["empty_history"]["reason"]


def test_dien_bad_rows_and_pickles(tmp_path):
    d = tmp_path / "dien"
    write_dien(d, ["1\tu1\tm2\tc1\tm1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    with pytest.raises(
        DataError,
        match=r"local_train_splitByUser: line 1: malformed line: 5 tab-separated fields.*"
        r"missing field\(s\) \['hist_cats'\]",
    ):
        read_dien(d)
    write_dien(d, ["1\tu1\tm2\tc1\tm1\x02m2\tc1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    with pytest.raises(DataError, match=r"line 1: field 'hist_cats' has 1 entries but 'hist_mids' has 2"):
        read_dien(d)
    write_dien(d, ["yes\tu1\tm2\tc1\tm1\tc1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    with pytest.raises(DataError, match=r"line 1: field 'label': 'yes' is not 0 or 1"):
        read_dien(d)
    write_dien(d, ["1\tu1\tm2\x00\tc1\tm1\tc1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    with pytest.raises(DataError, match=r"line 1: field 'mid': 'm2\\x00' contains the control character"):
        read_dien(d)
    write_dien(d, ["1\tu1\tm2\tc1\tm1\x02m0\x00\tc1\x02c1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    with pytest.raises(DataError, match=r"line 1: field 'hist_mids': 'm1\\x02m0\\x00' contains the control "
                                        r"character '\\x00'"):  # the separator itself is allowed
        read_dien(d)
    write_dien(d, ["1\tu1\tm2\tc1\tm1\tc1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    (d / "uid_voc.pkl").write_bytes(pickle.dumps(Path("x")))  # a class, not a plain dict
    with pytest.raises(DataError, match=r"uid_voc\.pkl: cannot read the vocabulary \(refusing to load"):
        read_dien(d)
    with pytest.raises(DataError, match=r"no DIEN files found"):
        read_dien(tmp_path)


def test_dien_empty_splits_and_files_are_refused(tmp_path):
    d = tmp_path / "dien"
    write_dien(d, ["1\tu1\tm2\tc1\tm1\tc1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    (d / "local_test_splitByUser").write_bytes(b"")  # a failed download
    with pytest.raises(DataError, match=r"local_test_splitByUser: no data lines"):
        read_dien(d)
    (d / "local_test_splitByUser").write_bytes(b"\r\n\r\n")
    with pytest.raises(DataError, match=r"local_test_splitByUser: no data lines"):
        read_dien(d)
    # every test row without a history: the reader skips (and counts) them, the build refuses
    write_dien(d, ["1\tu1\tm2\tc1\tm1\tc1"], ["1\tu2\tm3\tc2\t\t", "0\tu2\tm1\tc1\t\t"])
    with pytest.raises(DataError, match=r"local_test_splitByUser: no test sample has a behaviour history"):
        prepare_dataset("dien", path=d, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_dien_python2_vocab_keys_are_utf8(tmp_path):
    """DIEN's pickles come from Python 2: byte-string keys (opcode U), which are UTF-8 like the samples."""
    d = tmp_path / "dien"
    write_dien(d, ["1\tu1\tCaf\u00e9\tc1\tm1\tc1"], ["1\tu2\tm1\tc1\tCaf\u00e9\tc1"])
    # {'Caf\xc3\xa9': 1, 'm1': 2} as Python 2's pickle.dump(..., 2) writes it
    (d / "mid_voc.pkl").write_bytes(b"\x80\x02}(U\x05Caf\xc3\xa9K\x01U\x02m1K\x02u.")
    ds = PreparedDataset.open(prepare_dataset("dien", path=d, out=tmp_path / "o", progress=False))
    assert ds.vocab("item") == ["Caf\u00e9", "m1"]
    assert "unknown_item_ids" not in ds.meta["repaired"]
    assert ds.split("train").item.tolist() == [1] and ds.split("test").hist_item.tolist() == [1]
    (d / "mid_voc.pkl").write_bytes(b"\x80\x02}(U\x02\xff\xfeK\x01u.")
    with pytest.raises(DataError, match=r"mid_voc\.pkl: key b'\\xff\\xfe' is not valid UTF-8"):
        read_dien(d)


# ---- movielens


@pytest.mark.skipif(not MOVIELENS.exists(), reason="shared MovieLens copy absent")
def test_movielens(tmp_path):
    ds = PreparedDataset.open(
        prepare_dataset("movielens", path=MOVIELENS, out=tmp_path / "m", progress=False)
    )
    c = ds.meta["counts"]
    assert (c["users"], c["items"], c["interactions"]) == (943, 1682, 100000)
    assert c["test_samples"] == 2 * 943 and c["train_samples"] == 2 * (100000 - 2 * 943)
    cate = ds.vocab("cate")
    items = ds.vocab("item")
    # 1 Toy Story: "Animation Children's Comedy" -> Animation
    # 2 GoldenEye: "Action Adventure Thriller" -> Action
    assert cate[ds.item2cate[items.index("1") + 1] - 1] == "Animation"
    assert cate[ds.item2cate[items.index("2") + 1] - 1] == "Action"
    assert items[:3] == ["1", "2", "3"]  # numeric ids, numeric order
    assert ds.meta["source"]["category_column"] == "class"  # the column actually read


# ---- ids, tokens and columns that must not pass silently


def test_id_order_comes_from_the_interactions(tmp_path):
    # one non-integer id in the item table must not turn the integer ids' order into text order
    inter = "user_id\titem_id\ttimestamp\n1\t9\t1\n1\t100\t2\n1\t10\t3\n"
    ds = PreparedDataset.open(prep(tmp_path, inter, "item_id\tcate_leaf\n9\ta\n10\tb\n100\tc\nX1\td\n"))
    assert ds.vocab("item") == ["9", "10", "100"]
    assert ds.item2cate.tolist() == [0, 1, 2, 3]
    assert ds.meta["skipped"]["items_without_interactions"]["count"] == 1  # X1


def test_plus_signed_ids_stay_apart_on_both_read_paths(tmp_path):
    inter = "user_id\titem_id\ttimestamp\n1\t+5\t1\n1\t5\t2\n1\t6\t3\n"
    for items in ("item_id\tcate_leaf\n5\t1\n6\t1\n", "item_id\tcate_leaf\n5\tx\n6\tx\n"):
        ds = PreparedDataset.open(prep(tmp_path, inter, items, overwrite=True))
        assert sorted(ds.vocab("item")) == ["+5", "5", "6"]


def test_bad_timestamp_out_of_int64_range(tmp_path):
    for big in ("99999999999999999999", "1e30"):
        msg = rf"i\.tsv: line 3: field 'timestamp': '{big}' is out of the int64 range"
        with pytest.raises(DataError, match=msg):
            prep(tmp_path, INTER.replace("\t200\n", f"\t{big}\n"))


def test_bad_seed_and_empty_splits(tmp_path):
    with pytest.raises(DataError, match=r"seed must be >= 0"):
        prep(tmp_path, seed=-1)
    short = "user_id\titem_id\ttimestamp\n1\t10\t1\n1\t11\t2\n2\t12\t1\n"
    for protocol in ("din", "dien"):
        msg = rf"protocol '{protocol}' built no train and no test samples: 0 user"
        with pytest.raises(DataError, match=msg):
            prep(tmp_path, short, protocol=protocol)
    # dien: the one user goes to the test split (ceil(1/10)), none is left to train on
    with pytest.raises(DataError, match=r"'dien' built no train samples: 1 user\(s\) have at least 3"):
        prep(tmp_path, INTER.split("2\t10")[0], protocol="dien")
    assert not (tmp_path / "out").exists()


def test_vocab_ids_with_unusual_characters_round_trip(tmp_path):
    # characters str.splitlines splits on (an ASCII control character such as "\x1c" is refused
    # in a TSV id: test_bad_control_character_in_a_field)
    ids = ["a\x85b", "c\u2028d", "g"]
    inter = "user_id\titem_id\ttimestamp\n" + "".join(f"1\t{t}\t{k}\n" for k, t in enumerate(ids))
    (tmp_path / "i.tsv").write_bytes(inter.encode())
    (tmp_path / "m.tsv").write_bytes(("item_id\tcate_leaf\n" + "".join(f"{t}\tc\n" for t in ids)).encode())
    out = prepare_dataset("tsv", interactions=tmp_path / "i.tsv", items=tmp_path / "m.tsv",
                          out=tmp_path / "out", progress=False)
    assert PreparedDataset.open(out).vocab("item") == sorted(ids)


def test_amazon_json_null_and_empty_ids(tmp_path):
    for bad, shown in (('""', "is empty"), ("null", "None is not an id"), ("[1]", r"\[1\] is not an id")):
        line = f'{{"reviewerID": {bad}, "asin": "B01", "unixReviewTime": 1}}'
        rp, mp = write_amazon(tmp_path, REVIEWS[:2] + [line], META)
        with pytest.raises(DataError, match=rf"_5\.json\.gz: line 3: field 'reviewerID'.*{shown}"):
            read_amazon_json(rp, mp)
    rp, mp = write_amazon(tmp_path, REVIEWS, META + ['{"asin": null, "categories": [["x"]]}'])
    with pytest.raises(DataError, match=r"meta_Beauty\.json\.gz: line 5: field 'asin': None is not an id"):
        read_amazon_json(rp, mp)
    line = '{"reviewerID": "U\\t3", "asin": "B01", "unixReviewTime": 1}'  # JSON's \t: a real tab
    rp, mp = write_amazon(tmp_path, REVIEWS[:2] + [line], META)
    with pytest.raises(DataError, match=r"_5\.json\.gz: line 3: field 'reviewerID': 'U\\t3' contains the "
                       r"control character '\\t'"):
        read_amazon_json(rp, mp)
    meta = META + ['{"asin": "B09", "categories": [["Beauty", "Skin\\nCare"]]}']
    rp, mp = write_amazon(tmp_path, REVIEWS, meta)
    with pytest.raises(DataError, match=r"meta_Beauty\.json\.gz: line 5: field 'categories': .*'\\n'"):
        read_amazon_json(rp, mp)
    line = '{"reviewerID": "U1", "asin": "B01\\u0000", "unixReviewTime": 1}'  # a NUL numpy would drop
    rp, mp = write_amazon(tmp_path, REVIEWS[:2] + [line], META)
    with pytest.raises(DataError, match=r"line 3: field 'asin': 'B01\\x00' contains the control character"):
        read_amazon_json(rp, mp)
    rp, mp = write_amazon(tmp_path, [r.replace('"U2"', "7") for r in REVIEWS], META)  # integer ids are ids
    assert read_amazon_json(rp, mp).user.tolist() == ["U1"] * 3 + ["7"] * 3


def test_dien_empty_history_tokens_and_vocab_files(tmp_path):
    d = tmp_path / "dien"
    for row, msg in (("m1\x02\x02m3\tc1\x02c1\x02c2", "field 'hist_mids': entry 2 is empty"),
                     ("m1\x02m3\t\x02c2", "field 'hist_cats': entry 1 is empty"),
                     ("m1\tc1\x02", "field 'hist_cats' has 2 entries but 'hist_mids' has 1")):
        write_dien(d, [f"1\tu1\tm2\tc1\t{row}"], ["1\tu2\tm3\tc2\tm1\tc1"])
        with pytest.raises(DataError, match=rf"local_train_splitByUser: line 1: {msg}"):
            read_dien(d)
    write_dien(d, ["1\tu1\tm2\tc1\tm1\tc1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    for name, voc in (("mid_voc.pkl", {"m1": 0, "m2": 1, "m3": 2}), ("cat_voc.pkl", {"c1": 0, "c2": 1})):
        (d / name).write_bytes(pickle.dumps(voc))
    files = read_dien(d).files
    assert files["item"] == str(d / "mid_voc.pkl") and files["cate"] == str(d / "cat_voc.pkl")
    assert "uid" not in files and all(Path(p).exists() for p in files.values())


@pytest.mark.skipif(not MOVIELENS.exists(), reason="shared MovieLens copy absent")
def test_movielens_category_column_is_checked(tmp_path):
    with pytest.raises(DataError, match=r"\.item: no column 'genre_typo' for the category; columns: \["):
        prepare_dataset("movielens", path=MOVIELENS, category_column="genre_typo", out=tmp_path / "m",
                        progress=False)
    assert not (tmp_path / "m").exists()


# ---- line ends, duplicate columns, --max-len bound (robustness review)


def test_a_lone_cr_is_a_control_character_not_a_line_break(tmp_path):
    """Only CRLF is a line end: a lone CR inside an unread column is ignored (no phantom row), one
    that also carries a tab is a malformed line, one in a read column an error, and line numbers
    count LF-terminated lines only."""
    items = "item_id\tcate_leaf\tcate_l1\tbrand\n10\t5\t1\tA\r13\n11\t5\t1\tB\n12\t6\t1\tC\n13\t7\t1\tD\n"
    out = prep(tmp_path, items=items)  # "A\r13" is one brand value, not a row for item 13
    ds = PreparedDataset.open(out)
    assert ds.item2cate.tolist() == [0, 1, 1, 2, 3] and "duplicate_item_rows" not in ds.meta["repaired"]
    # the review's row: the CR hides a second row for item 12 with category 7
    with pytest.raises(DataError, match=r"m\.tsv: line 2: malformed line: 5 tab-separated field\(s\), "
                                        r"expected 4"):
        prep(tmp_path, items=items.replace("A\r13\n", "Brand\r12\t7\n"), overwrite=True)
    with pytest.raises(DataError, match=r"i\.tsv: line 3: field 'item_id': '11\\r12' contains the control "
                                        r"character '\\r'"):
        prep(tmp_path, INTER.replace("1\t11\t200", "1\t11\r12\t200"), overwrite=True)
    # CRLF still reads as before
    prep(tmp_path, INTER.replace("\n", "\r\n"), ITEMS.replace("\n", "\r\n"), overwrite=True)
    # a file whose every line ends with a lone CR (old Mac exports) says so, not "missing column"
    with pytest.raises(DataError, match=r"i\.tsv: lines end with a lone CR .*convert the file"):
        prep(tmp_path, INTER.replace("\n", "\r"), overwrite=True)


@pytest.mark.parametrize("which", ["interactions", "items"])
def test_duplicate_header_column_is_refused(tmp_path, which):
    if which == "interactions":
        rows = INTER.split("\n", 1)[1].replace("\n", "\t99\n")
        kw = {"inter": "user_id\titem_id\ttimestamp\titem_id\n" + rows}
        error = r"i\.tsv: line 1: column 'item_id' appears twice in the header"
    else:
        kw = {"items": "item_id\tcate_leaf:token\tcate_leaf:float\n10\t5\t1\n11\t5\t1\n12\t6\t1\n13\t7\t1\n"}
        error = r"m\.tsv: line 1: column 'cate_leaf' appears twice in the header"
    with pytest.raises(DataError, match=error):
        prep(tmp_path, **kw)
    # a repeated column that is not read is no ambiguity: accepted
    rows = "".join(f"{i}\t{c}\ta\tb\n" for i, c in zip((10, 11, 12, 13), "5567"))
    items = "item_id\tcate_leaf\tbrand\tbrand\n" + rows
    prep(tmp_path, items=items, overwrite=True)


def test_max_len_has_an_upper_bound(tmp_path):
    """A --max-len the models cannot allocate (training sizes buffers and padded batches by it) is
    refused before any work, not met as a 14.8 TB allocation in training."""
    with pytest.raises(DataError, match=r"max_len must be <= 10,000 .*got 100000000000"):
        prep(tmp_path, max_len=100_000_000_000)
    assert not (tmp_path / "out").exists()
    assert PreparedDataset.open(prep(tmp_path, max_len=10_000)).max_len == 10_000


# ---- review round (session 21): each case below was accepted silently or crashed before


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    """Windows tools write a BOM first: in a headerless DIEN file it used to become part of the first
    user's id (splitting that user in two), in a TSV header part of the first column's name."""
    d = tmp_path / "bom"
    d.mkdir()
    rows = "".join(f"U{u}\tI{i}\t4.0\t{100 * i}\n" for u in (1, 2) for i in (1, 2, 3))
    (d / "reviews-info").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    (d / "item-info").write_bytes(b"\xef\xbb\xbfI1\tBooks\nI2\tBooks\nI3\tToys\n")
    raw = read_dien(d)
    assert sorted(set(raw.user.tolist())) == ["U1", "U2"] and raw.item_ids.tolist()[0] == "I1"
    assert raw.report.repaired == {}
    out = prep(tmp_path, inter="\ufeff" + INTER)
    assert PreparedDataset.open(out).num_users == 2


def test_a_lone_surrogate_is_refused_where_it_is_read(tmp_path):
    """JSON's "\\ud800" escape decodes to half a UTF-16 pair, which no vocabulary file can store: the
    line and field are named at read time, not a UnicodeEncodeError when the dataset is written."""
    bad = REVIEWS[:2] + ['{"reviewerID": "U\\ud800", "asin": "B01", "unixReviewTime": 1}']
    rp, mp = write_amazon(tmp_path, bad, META)
    with pytest.raises(DataError, match=r"line 3: field 'reviewerID': .* contains the lone surrogate"):
        read_amazon_json(rp, mp)
    rp, mp = write_amazon(tmp_path, REVIEWS, META + ['{"asin": "B09", "categories": [["B", "C\\udc00"]]}'])
    with pytest.raises(DataError, match=r"line 5: field 'categories': .* contains the lone surrogate"):
        read_amazon_json(rp, mp)


def test_amazon_categories_must_be_strings_and_a_blank_one_is_counted(tmp_path):
    for cat, line in (("None", 5), ("7", 5), ("['Skin', 'Care']", 5)):
        rp, mp = write_amazon(tmp_path, REVIEWS, META + [f"{{'asin': 'B09', 'categories': [['B', {cat}]]}}"])
        with pytest.raises(DataError, match=rf"line {line}: field 'categories': the category .* is not a "):
            read_amazon_json(rp, mp)
    rp, mp = write_amazon(tmp_path, REVIEWS, META + ["{'asin': 'B04', 'categories': [['B', '   ']]}"])
    raw = read_amazon_json(rp, mp)
    assert raw.report.repaired["meta_rows_without_category"]["count"] == 2  # B05's [] and B04's blank
    assert "B04" not in raw.item_ids.tolist()


@pytest.mark.parametrize("ts", ["1_000", "\uff12\uff10", "\u0663\u0660", "1_0.0"])
def test_a_timestamp_is_ascii_digits(tmp_path, ts):
    """Python's int() and float() read "1_000", full-width and Arabic-Indic digits: such a timestamp
    would silently order the events; it is refused like any other non-number."""
    inter = INTER.replace("\t200\n", f"\t{ts}\n")
    with pytest.raises(DataError, match=rf"i\.tsv: line 3: field 'timestamp': '{ts}' is not a number"):
        prep(tmp_path, inter=inter)


def test_the_first_bad_line_is_the_one_named(tmp_path):
    """The slow path checks lines and then each column; the error names the first bad line of all."""
    head = "user_id\titem_id\ttimestamp\n"
    for body, want in (("1\t5\tnoon\n\t6\t11\n", r"line 2: field 'timestamp': 'noon'"),
                       ("1\t5\tnoon\n1\t6\n", r"line 2: field 'timestamp': 'noon'"),
                       ("1\t5\t10\n1\t6\n\t7\t12\n", r"line 3: malformed line: 2 tab-separated"),
                       ("1\t5\t10\n\t6\tnoon\n", r"line 3: field 'user_id' is empty")):
        (tmp_path / "t.tsv").write_text(head + body)
        with pytest.raises(DataError, match=want):
            read_table(tmp_path / "t.tsv", ["user_id", "item_id", "timestamp"], int_columns={"timestamp"})


def test_trailing_blank_lines_are_counted_like_the_others(tmp_path):
    for body in (INTER + "\n\n", INTER.replace("1\t11\t200\n", "1\t11\t200\n\n") + "\n"):
        (tmp_path / "t.tsv").write_text(body)
        r = Report()
        read_table(tmp_path / "t.tsv", ["user_id", "item_id", "timestamp"], int_columns={"timestamp"},
                   report=r)
        assert r.skipped["blank_lines"]["count"] == 2, body  # (the fast path, then the slow one)


def test_integer_ids_sort_numerically_in_every_reader(tmp_path):
    """docs/data.md: numeric order when every id of a column is an integer, for JSON (integer or
    string ids) and DIEN's reviews-info as for TSV."""
    reviews = [f'{{"reviewerID": {u}, "asin": "{i}", "unixReviewTime": {t}}}'
               for t, (u, i) in enumerate([(2, 10), (2, 9), (2, 100), (10, 9), (10, 10), (10, 100)])]
    meta = [f"{{'asin': '{i}', 'categories': [['B', 'C{i}']]}}" for i in (9, 10, 100)]
    rp, mp = write_amazon(tmp_path, reviews, meta)
    ds = PreparedDataset.open(prepare_dataset("amazon-json", reviews=rp, meta=mp, out=tmp_path / "a",
                                              progress=False))
    assert ds.vocab("uid") == ["2", "10"] and ds.vocab("item") == ["9", "10", "100"]
    d = tmp_path / "dien"
    d.mkdir()
    pairs = [(2, 10), (2, 9), (2, 100), (10, 9), (10, 10), (10, 100)]
    (d / "reviews-info").write_text("".join(f"{u}\t{i}\t4.0\t{t}\n" for t, (u, i) in enumerate(pairs)))
    (d / "item-info").write_text("9\tx\n10\tx\n100\ty\n")
    ds = PreparedDataset.open(prepare_dataset("dien", path=d, out=tmp_path / "d", progress=False))
    assert ds.vocab("uid") == ["2", "10"] and ds.vocab("item") == ["9", "10", "100"]


def test_damaged_vocabulary_pickles_are_refused_naming_the_file(tmp_path):
    d = tmp_path / "dien"
    write_dien(d, ["1\tu1\tm2\tc1\tm1\tc1"], ["1\tu2\tm3\tc2\tm1\tc1"])
    for blob in (b"}K\x01a.", pickle.dumps({"a": 1})[:-1], b"\x80\x05\x95" + b"\xff" * 8):
        (d / "mid_voc.pkl").write_bytes(blob)
        with pytest.raises(DataError, match=r"mid_voc\.pkl: cannot read the vocabulary \("):
            read_dien(d)
    (d / "mid_voc.pkl").write_bytes(pickle.dumps({"default_mid": 0, "a": 1, "a\x00": 2}))
    with pytest.raises(DataError, match=r"mid_voc\.pkl: key 'a\\x00' contains the control character"):
        read_dien(d)


def test_a_json_line_nested_too_deep_is_a_malformed_line(tmp_path):
    rp, mp = write_amazon(tmp_path, REVIEWS[:1] + ["[" * 100_000 + "]" * 100_000], META)
    with pytest.raises(DataError, match=r"line 2: malformed line"):
        read_amazon_json(rp, mp)


def test_prepare_refuses_inputs_its_source_does_not_read_and_non_integer_settings(tmp_path):
    rp, mp = write_amazon(tmp_path, REVIEWS, META)
    with pytest.raises(DataError, match=r"source 'amazon-json' does not read --interactions, "
                                        r"--category-column: it reads --reviews, --meta"):
        prepare_dataset("amazon-json", reviews=rp, meta=mp, category_column="brand",
                        interactions=tmp_path / "nope", out=tmp_path / "o", progress=False)
    for kw, want in (({"max_len": "3"}, "max_len must be an integer, got '3'"),
                     ({"seed": 1.5}, "seed must be an integer, got 1.5")):
        with pytest.raises(DataError, match=want):
            prepare_dataset("amazon-json", reviews=rp, meta=mp, out=tmp_path / "o", progress=False, **kw)
    assert not (tmp_path / "o").exists()
