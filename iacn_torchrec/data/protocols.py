"""Sample building: raw interactions -> CTR samples under the ``din`` or ``dien`` protocol.

Both protocols share the indexing step (:func:`index_interactions`): ids are remapped to
contiguous ints in sorted raw-id order (numeric when every id is an integer), ``0`` reserved for
padding/unknown; events are sorted by (user, timestamp), ties keeping file order; users with
fewer than ``min_len`` (3) interactions build no sample (counted in the report, they keep their
vocabulary id).

``din`` (default; exactly the reference builder ``shared/bench/make_samples.py``): for each
user's interactions ``i_0..i_{n-1}`` and each ``k = 1..n-1`` a positive (history = the last
``max_len`` items before ``i_k``, target ``i_k``, label 1) followed by a negative (same history,
target drawn uniformly over all items but ``i_k``, label 0); ``k = n-1`` goes to ``test``, the
rest to ``train``. The target negatives are the draws ``r = default_rng(seed).integers(1,
n_items, size=m); neg = r + (r >= pos)`` over all ``m`` positives in (user, k) order.

``dien`` (DIEN's original recipe, Zhou et al. 2019, ``process_data.py`` + ``split_by_user.py``):
one pos/neg pair per user at the last interaction (history = the last ``max_len`` items before
it); the negative is drawn in proportion to item popularity (interaction counts over all events,
as DIEN samples from the list of all review rows) and redrawn while equal to the positive
(stream ``default_rng(seed)``); users are split 9:1 into train/test by a seeded shuffle
(``default_rng([seed, 2]).permutation``, the first ``ceil(n_users / 10)`` go to test).

Both: DIEN's auxiliary-loss negative behaviours are drawn once per event from the separate
stream ``default_rng([seed, 1])`` (uniform over all items but the real one at that position) and
gathered like the histories, so ``neg_hist_item[t] != hist_item[t]`` everywhere and the pos/neg
rows of a pair share them. Every array is a pure function of (input, protocol, max_len, seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iacn_torchrec.data.sources import DIEN_DEFAULTS, DataError, Interactions, PrebuiltSamples, Report

__all__ = [
    "SplitArrays",
    "BuiltDataset",
    "IndexedInteractions",
    "index_interactions",
    "build_din",
    "build_dien",
    "build_prebuilt",
    "MIN_LEN",
]

MIN_LEN = 3  # users with fewer interactions build no sample (as in the reference builder)
SPLIT_ARRAYS = (
    "uid",
    "item",
    "cate",
    "label",
    "hist_offsets",
    "hist_item",
    "hist_cate",
    "neg_hist_item",
    "neg_hist_cate",
)


@dataclass
class SplitArrays:
    """One split, columnar. ``uid``/``item``/``cate`` int64 ``[N]``, ``label`` int8 ``[N]``,
    ``hist_offsets`` int64 ``[N + 1]``; ``hist_item``/``hist_cate``/``neg_hist_item``/
    ``neg_hist_cate`` int64 ``[hist_offsets[-1]]``, oldest first (sample ``s`` owns
    ``[hist_offsets[s], hist_offsets[s + 1])``)."""

    uid: np.ndarray
    item: np.ndarray
    cate: np.ndarray
    label: np.ndarray
    hist_offsets: np.ndarray
    hist_item: np.ndarray
    hist_cate: np.ndarray
    neg_hist_item: np.ndarray
    neg_hist_cate: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in SPLIT_ARRAYS}

    def __len__(self) -> int:
        return len(self.label)

    def hist_lengths(self) -> np.ndarray:
        """int64 ``[N]`` history length per sample."""
        return np.diff(self.hist_offsets)


@dataclass
class BuiltDataset:
    """Everything the store writes. ``vocabs[k][i - 1]`` is the raw id of index ``i``."""

    protocol: str
    splits: dict[str, SplitArrays]
    item2cate: np.ndarray
    item_count: np.ndarray
    vocabs: dict[str, np.ndarray]
    counts: dict[str, int]
    report: Report


@dataclass
class IndexedInteractions:
    """Events sorted by (user, time) with contiguous ids. ``uid``/``item`` int64 ``[M]``."""

    uid: np.ndarray
    item: np.ndarray
    item2cate: np.ndarray
    vocabs: dict[str, np.ndarray]
    report: Report

    @property
    def num_items(self) -> int:
        return len(self.vocabs["item"])


def _as_common_ids(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compare ids of two files in one type (int when both are int, else str)."""
    if a.dtype.kind == b.dtype.kind:
        return a, b
    return a.astype(str), b.astype(str)


def index_interactions(inter: Interactions) -> IndexedInteractions:
    """Remap ids (sorted raw order, from 1), attach categories, sort events by (user, time)."""
    report = inter.report
    user_vocab, uinv = np.unique(inter.user, return_inverse=True)
    # the id order comes from the interactions alone (numeric when all their item ids are integers);
    # the item table only has to be compared with them, in one common type
    item_vocab, iinv = np.unique(inter.item, return_inverse=True)
    n_items = len(item_vocab)
    vocab_ids, tab_ids = _as_common_ids(item_vocab, inter.item_ids)

    # item -> category through the item table (sorted lookup, no Python loop)
    srt = np.argsort(tab_ids, kind="stable")
    if len(tab_ids):
        pos = srt[np.searchsorted(tab_ids, vocab_ids, sorter=srt).clip(0, len(srt) - 1)]
        found = tab_ids[pos] == vocab_ids
    else:
        pos = np.zeros(n_items, dtype=np.int64)
        found = np.zeros(n_items, dtype=bool)
    cat_raw = inter.item_cate[pos[found]] if len(tab_ids) else inter.item_cate[:0]
    cate_vocab = np.unique(cat_raw)
    item2cate = np.zeros(n_items + 1, dtype=np.int64)
    item2cate[1:][found] = np.searchsorted(cate_vocab, cat_raw) + 1
    report.repair(
        "item_without_metadata",
        int((~found).sum()),
        "items occurring in the interactions with no category in the item table: category 0 'unknown'",
    )
    unused = len(tab_ids) - int(np.isin(tab_ids, vocab_ids).sum())
    report.skip(
        "items_without_interactions", unused, "item-table rows whose item never occurs in the interactions"
    )

    order = np.lexsort((inter.timestamp, uinv))  # stable: ties keep file order
    return IndexedInteractions(
        uid=(uinv[order] + 1).astype(np.int64),
        item=(iinv[order] + 1).astype(np.int64),
        item2cate=item2cate,
        vocabs={"uid": user_vocab, "item": item_vocab, "cate": cate_vocab},
        report=report,
    )


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Interleave ``a[0], b[0], a[1], b[1], ...`` (positive before negative)."""
    out = np.empty(2 * len(a), dtype=a.dtype)
    out[0::2], out[1::2] = a, b
    return out


def jagged_index(start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets ``[N + 1]`` and flat source indices ``[sum(length)]`` of the ranges
    ``[start[s], start[s] + length[s])`` laid end to end (repeat/arange trick, no loop)."""
    offsets = np.zeros(len(length) + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
    idx = np.repeat(start - offsets[:-1], length) + np.arange(offsets[-1], dtype=np.int64)
    return offsets, idx


def _other_items(rng: np.random.Generator, real: np.ndarray, n_items: int) -> np.ndarray:
    """Uniform over ``1..n_items`` without ``real``; over all of ``1..n_items`` where ``real == 0``
    (an unknown item, ``dien-files`` only: the din/dien protocols' draws, all with a real item, are
    the scalar-bound ones, byte for byte)."""
    unknown = real == 0
    high = n_items + unknown if unknown.any() else n_items
    r = rng.integers(1, high, size=len(real))
    return r + ((r >= real) & ~unknown)


def _check_items(n_items: int) -> None:
    if n_items < 2:
        raise DataError(f"only {n_items} distinct item(s): at least 2 are needed to draw negatives")


def _split_from_pairs(
    uid: np.ndarray,
    pos_item: np.ndarray,
    neg_item: np.ndarray,
    hist_start: np.ndarray,
    hist_len: np.ndarray,
    item_of_event: np.ndarray,
    neg_of_event: np.ndarray,
    item2cate: np.ndarray,
) -> SplitArrays:
    """Rows ``pos_0, neg_0, pos_1, ...``; histories gathered from the event arrays."""
    offsets, ev = jagged_index(np.repeat(hist_start, 2), np.repeat(hist_len, 2))
    item = _pair(pos_item, neg_item)
    hist_item = item_of_event[ev]
    neg_hist_item = neg_of_event[ev]
    label = np.zeros(len(item), dtype=np.int8)
    label[0::2] = 1
    return SplitArrays(
        uid=np.repeat(uid, 2),
        item=item,
        cate=item2cate[item],
        label=label,
        hist_offsets=offsets,
        hist_item=hist_item,
        hist_cate=item2cate[hist_item],
        neg_hist_item=neg_hist_item,
        neg_hist_cate=item2cate[neg_hist_item],
    )


def _user_runs(ix: IndexedInteractions, min_len: int):
    _, start, count = np.unique(ix.uid, return_index=True, return_counts=True)
    keep = count >= min_len
    ix.report.skip(
        "users_below_min_len",
        int((~keep).sum()),
        f"users with fewer than {min_len} interactions: no sample built (their vocabulary id is kept)",
    )
    ix.report.skip(
        "interactions_of_skipped_users",
        int(count[~keep].sum()),
        f"interactions of users with fewer than {min_len} interactions",
    )
    return start, count, keep


def _check_splits(protocol: str, splits: dict[str, SplitArrays], users: int, min_len: int) -> None:
    """A dataset with an empty split trains or evaluates on nothing: refuse to write it."""
    empty = [name for name, s in splits.items() if len(s) == 0]
    if empty:
        raise DataError(
            f"protocol {protocol!r} built no {' and no '.join(empty)} samples: {users} user(s) have "
            f"at least {min_len} interactions (after the reader's filters); more are needed"
        )


def _counts(ix: IndexedInteractions, splits: dict[str, SplitArrays]) -> dict[str, int]:
    c = {
        "users": len(ix.vocabs["uid"]),
        "items": len(ix.vocabs["item"]),
        "categories": len(ix.vocabs["cate"]),
        "interactions": len(ix.uid),
    }
    for name, s in splits.items():
        c[f"{name}_samples"] = len(s)
        c[f"{name}_positives"] = int(s.label.sum(dtype=np.int64))
    return c


def build_din(
    ix: IndexedInteractions, max_len: int = 20, seed: int = 0, min_len: int = MIN_LEN
) -> BuiltDataset:
    """The ``din`` protocol (see the module docstring); element-wise equal to make_samples.py."""
    n_items = ix.num_items
    _check_items(n_items)
    start, count, keep = _user_runs(ix, min_len)
    m_all = len(ix.uid)
    start_of = np.repeat(start, count)
    count_of = np.repeat(count, count)
    keep_of = np.repeat(keep, count)
    k = np.arange(m_all, dtype=np.int64) - start_of
    j = np.nonzero(keep_of & (k >= 1))[0]
    kj = k[j]
    is_test = kj == count_of[j] - 1
    hist_len = np.minimum(kj, max_len)
    pos_item = ix.item[j]
    r = np.random.default_rng(seed).integers(1, n_items, size=len(j))
    neg_item = r + (r >= pos_item)
    neg_of_event = _other_items(np.random.default_rng([seed, 1]), ix.item, n_items)

    splits = {}
    for name, mask in (("train", ~is_test), ("test", is_test)):
        sel = j[mask]
        splits[name] = _split_from_pairs(
            ix.uid[sel],
            pos_item[mask],
            neg_item[mask],
            sel - hist_len[mask],
            hist_len[mask],
            ix.item,
            neg_of_event,
            ix.item2cate,
        )
    _check_splits("din", splits, int(keep.sum()), min_len)
    train_events = keep_of & (k < count_of - 1)  # everything but each user's held-out last interaction
    item_count = np.bincount(ix.item[train_events], minlength=n_items + 1).astype(np.int64)
    return BuiltDataset("din", splits, ix.item2cate, item_count, ix.vocabs, _counts(ix, splits), ix.report)


def build_dien(
    ix: IndexedInteractions, max_len: int = 20, seed: int = 0, min_len: int = MIN_LEN
) -> BuiltDataset:
    """DIEN's original recipe (see the module docstring)."""
    n_items = ix.num_items
    _check_items(n_items)
    start, count, keep = _user_runs(ix, min_len)
    start, count = start[keep], count[keep]
    last = start + count - 1
    hist_len = np.minimum(count - 1, max_len)
    pos_item = ix.item[last]

    # popularity-proportional negatives, redrawn while equal to the positive
    popularity = np.bincount(ix.item, minlength=n_items + 1)[1:]
    cdf = np.cumsum(popularity)
    rng = np.random.default_rng(seed)
    neg_item = np.searchsorted(cdf, rng.integers(0, cdf[-1], size=len(last)), side="right") + 1
    bad = np.nonzero(neg_item == pos_item)[0]
    while len(bad):
        neg_item[bad] = np.searchsorted(cdf, rng.integers(0, cdf[-1], size=len(bad)), side="right") + 1
        bad = bad[neg_item[bad] == pos_item[bad]]
    neg_of_event = _other_items(np.random.default_rng([seed, 1]), ix.item, n_items)

    n_users = len(last)
    is_test = np.zeros(n_users, dtype=bool)
    is_test[np.random.default_rng([seed, 2]).permutation(n_users)[: -(-n_users // 10)]] = True
    splits = {}
    for name, mask in (("train", ~is_test), ("test", is_test)):
        splits[name] = _split_from_pairs(
            ix.uid[last[mask]],
            pos_item[mask],
            neg_item[mask],
            last[mask] - hist_len[mask],
            hist_len[mask],
            ix.item,
            neg_of_event,
            ix.item2cate,
        )
    _check_splits("dien", splits, n_users, min_len)
    _, ev = jagged_index(start, count)  # the events of kept users, user by user
    train_ev = ev[np.repeat(~is_test, count)]  # all events of train users
    item_count = np.bincount(ix.item[train_ev], minlength=n_items + 1).astype(np.int64)
    return BuiltDataset("dien", splits, ix.item2cate, item_count, ix.vocabs, _counts(ix, splits), ix.report)


# --------------------------------------------------------------------------------------------
# DIEN's own files


def _vocab(kind: str, tokens: np.ndarray, pkl: dict[str, int] | None):
    """(sorted raw tokens, their new ids) and the vocabulary in id order. The DIEN placeholder
    (``default_mid``/``default_cat``/``default_uid``) and, with a pkl, ids it lacks map to 0."""
    default = DIEN_DEFAULTS[kind]
    if pkl is not None:
        ordered = np.array(
            [t for t, _ in sorted(pkl.items(), key=lambda kv: kv[1]) if t != default], dtype=str
        )
    else:
        ordered = np.unique(tokens[tokens != default]) if len(tokens) else np.array([], dtype=str)
    srt = np.argsort(ordered, kind="stable")
    keys = ordered[srt]
    ids = (srt + 1).astype(np.int64)
    return keys, ids, ordered


def _lookup(tokens: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(keys) == 0:
        return np.zeros(len(tokens), dtype=np.int64)
    p = np.searchsorted(keys, tokens).clip(0, len(keys) - 1)
    return np.where(keys[p] == tokens, ids[p], 0)


def build_prebuilt(pre: PrebuiltSamples, seed: int = 0) -> BuiltDataset:
    """Re-index DIEN's samples (their split, order and negatives kept); draw the negative
    behaviours for DIEN's auxiliary loss (``default_rng([seed, 1])``), which these files lack."""
    report = pre.report
    tr, te = pre.splits["train"], pre.splits["test"]
    for name, raw in (("train", tr), ("test", te)):
        if len(raw["label"]) == 0:  # every row had an empty history (the reader counted them)
            raise DataError(f"{pre.files.get(name, name)}: no {name} sample has a behaviour history; "
                            f"a dataset with an empty {name} split would train or evaluate on nothing")
    info_items, info_cates = (
        pre.item_info if pre.item_info is not None else (np.array([], str), np.array([], str))
    )
    info_items, info_cates = info_items.astype(str), info_cates.astype(str)
    token_sets = {
        "uid": [tr["uid"], te["uid"]],
        "item": [tr["item"], te["item"], tr["hist_item"], te["hist_item"], info_items],
        "cate": [tr["cate"], te["cate"], tr["hist_cate"], te["hist_cate"], info_cates],
    }
    maps, vocabs = {}, {}
    for kind, parts in token_sets.items():
        allt = np.concatenate(parts)
        fname = {"uid": "uid_voc.pkl", "item": "mid_voc.pkl", "cate": "cat_voc.pkl"}[kind]
        keys, ids, ordered = _vocab(kind, allt, pre.vocabs.get(kind))
        maps[kind], vocabs[kind] = (keys, ids), ordered
        sample_tokens = np.concatenate(parts[:4] if kind != "uid" else parts)
        n_default = int((sample_tokens == DIEN_DEFAULTS[kind]).sum())
        report.repair(
            f"dien_{DIEN_DEFAULTS[kind]}",
            n_default,
            f"DIEN placeholder '{DIEN_DEFAULTS[kind]}' (no such {kind} in DIEN's metadata): id 0 'unknown'",
        )
        if kind in pre.vocabs:
            n_unknown = int((_lookup(sample_tokens, keys, ids) == 0).sum()) - n_default
            report.repair(f"unknown_{kind}_ids", n_unknown, f"{kind} ids absent from {fname}: id 0 'unknown'")

    def m(kind: str, a: np.ndarray) -> np.ndarray:
        return _lookup(a, *maps[kind])

    n_items = len(vocabs["item"])
    _check_items(n_items)
    # item -> category: item-info first, then targets, then histories; first known category wins
    pairs_i = np.concatenate(
        [
            m("item", info_items),
            m("item", tr["item"]),
            m("item", te["item"]),
            m("item", tr["hist_item"]),
            m("item", te["hist_item"]),
        ]
    )
    pairs_c = np.concatenate(
        [
            m("cate", info_cates),
            m("cate", tr["cate"]),
            m("cate", te["cate"]),
            m("cate", tr["hist_cate"]),
            m("cate", te["hist_cate"]),
        ]
    )
    ok = (pairs_i > 0) & (pairs_c > 0)
    pi, pc = pairs_i[ok], pairs_c[ok]
    item2cate = np.zeros(n_items + 1, dtype=np.int64)
    first_items, first = np.unique(pi, return_index=True)
    item2cate[first_items] = pc[first]
    distinct = np.unique(pi * (len(vocabs["cate"]) + 1) + pc)
    conflicts = int((np.bincount(distinct // (len(vocabs["cate"]) + 1)) > 1).sum())
    report.repair(
        "item_category_conflicts",
        conflicts,
        "items seen with more than one category: item2cate keeps the first (item-info, then targets)",
    )

    rng = np.random.default_rng([seed, 1])
    splits = {}
    for name, raw in (("train", tr), ("test", te)):
        offsets = np.zeros(len(raw["hist_len"]) + 1, dtype=np.int64)
        np.cumsum(raw["hist_len"], out=offsets[1:])
        hist_item = m("item", raw["hist_item"])
        neg_hist_item = _other_items(rng, hist_item, n_items)
        item = m("item", raw["item"])
        splits[name] = SplitArrays(
            uid=m("uid", raw["uid"]),
            item=item,
            cate=m("cate", raw["cate"]),
            label=raw["label"].astype(np.int8),
            hist_offsets=offsets,
            hist_item=hist_item,
            hist_cate=m("cate", raw["hist_cate"]),
            neg_hist_item=neg_hist_item,
            neg_hist_cate=item2cate[neg_hist_item],
        )
    s = splits["train"]
    pos_rows = np.nonzero(s.label == 1)[0]
    _, ev = jagged_index(s.hist_offsets[pos_rows], np.diff(s.hist_offsets)[pos_rows])
    item_count = np.bincount(np.concatenate([s.item[pos_rows], s.hist_item[ev]]), minlength=n_items + 1)
    counts = {"users": len(vocabs["uid"]), "items": n_items, "categories": len(vocabs["cate"])}
    for name, sp in splits.items():
        counts[f"{name}_samples"] = len(sp)
        counts[f"{name}_positives"] = int(sp.label.sum(dtype=np.int64))
    return BuiltDataset("dien-files", splits, item2cate, item_count.astype(np.int64), vocabs, counts, report)
