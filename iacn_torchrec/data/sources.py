"""Readers of raw interaction data: ``tsv``, ``amazon-json``, ``dien`` and ``movielens``.

Every reader returns either

* :class:`Interactions`: one row per (user, item, timestamp) event with raw ids, plus an item
  table (raw item id -> raw category); :mod:`iacn_torchrec.data.protocols` turns it into
  time-ordered per-user sequences and CTR samples (``din`` or ``dien`` protocol); or
* :class:`PrebuiltSamples`: samples already built by someone else (DIEN's ``local_train`` /
  ``local_test`` files hold their own split and negatives), only to be re-indexed.

Bad input raises :class:`DataError` naming the file, the line and the field; tolerated oddities
(blank lines, items without a category, ...) are counted in a :class:`Report` that ends up in
``meta.json``. Nothing is dropped silently.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import pickle
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iacn_torchrec.errors import UserError

__all__ = [
    "DataError",
    "Report",
    "Interactions",
    "PrebuiltSamples",
    "read_table",
    "read_tsv",
    "read_amazon_json",
    "read_dien",
    "read_movielens",
]


class DataError(UserError, ValueError):
    """Bad or unreadable input data. The message names the file, the line and the field."""


@dataclass
class Report:
    """Skipped and repaired inputs, by key: ``{key: {"count": n, "reason": text}}``."""

    skipped: dict[str, dict] = field(default_factory=dict)
    repaired: dict[str, dict] = field(default_factory=dict)

    @staticmethod
    def _add(table: dict[str, dict], key: str, count: int, reason: str) -> None:
        if count <= 0:
            return
        entry = table.setdefault(key, {"count": 0, "reason": reason})
        entry["count"] += int(count)

    def skip(self, key: str, count: int, reason: str) -> None:
        self._add(self.skipped, key, count, reason)

    def repair(self, key: str, count: int, reason: str) -> None:
        self._add(self.repaired, key, count, reason)

    def as_dict(self) -> dict:
        return {"skipped": self.skipped, "repaired": self.repaired}


@dataclass
class Interactions:
    """Raw events and item metadata as read from the files (no sorting, no remapping yet).

    ``user``, ``item``: raw ids ``[M]`` (int64 when every id is an integer, else str);
    ``timestamp``: int64 ``[M]``; ``item_ids`` / ``item_cate``: the item table (raw item id and
    its raw category, items without a category left out: they get category 0 later).
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    item_ids: np.ndarray
    item_cate: np.ndarray
    files: dict[str, str]
    report: Report


@dataclass
class PrebuiltSamples:
    """Samples built upstream (DIEN files): per split a dict of raw columns.

    ``label`` int8 ``[N]``; ``uid``/``item``/``cate`` str ``[N]``; ``hist_len`` int64 ``[N]``;
    ``hist_item``/``hist_cate`` str ``[sum(hist_len)]`` (oldest first). ``item_info``: optional
    raw item -> category table; ``vocabs``: optional DIEN vocabularies (``uid``/``item``/``cate``
    -> {raw: DIEN index}).
    """

    splits: dict[str, dict[str, np.ndarray]]
    files: dict[str, str]
    report: Report
    item_info: tuple[np.ndarray, np.ndarray] | None = None
    vocabs: dict[str, dict[str, int]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# low-level file access


def read_text(path: str | Path) -> str:
    """The whole file as text (``.gz`` decompressed, CRLF turned into LF, a leading UTF-8 byte-order
    mark dropped). A lone CR stays: it is
    a control character like any other (refused in a field that is read, see :func:`_check_lines`),
    not a line end, so it can neither split a row in two nor shift the line numbers of errors."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file")
    try:
        if p.name.endswith(".gz"):
            with gzip.open(p, "rb") as f:
                data = f.read()
        else:
            data = p.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{p}: cannot read ({e})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{p}: line {line}: not valid UTF-8 ({e.reason})") from e
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark (Windows exports): not part of the first id
        text = text[1:]
    if "\r" in text:  # DIEN's files (and Windows exports) end lines with CRLF
        text = text.replace("\r\n", "\n")
        if "\n" not in text.rstrip("\r"):  # every line ends with a lone CR (classic Mac exports)
            raise DataError(f"{p}: lines end with a lone CR (carriage return, the old Mac format), not "
                            "LF or CRLF: convert the file (e.g. `tr '\\r' '\\n'`) and rerun")
    return text


def _lines(path: str | Path) -> list[str]:
    """The file's lines (a final newline does not make an extra empty line)."""
    text = read_text(path)
    return (text[:-1] if text.endswith("\n") else text).split("\n")


def _to_ids(values: list[str]) -> np.ndarray:
    """Raw id tokens -> int64 when every token is a plain integer (numeric sort order, as the
    reference builder uses), else a str array."""
    arr = np.array(values, dtype=str)
    try:
        out = arr.astype(np.int64)
    except (ValueError, OverflowError):
        return arr
    # "007" and "7" must stay different ids: only convert when the round trip is exact.
    if np.array_equal(out.astype(str), arr):
        return out
    return arr


_INT64 = np.iinfo(np.int64)


# numbers as files write them: ASCII digits only (Python's int() and float() would also take "1_000",
# full-width "２０" or Arabic-Indic "٣٠", silently reordering events)
_ASCII_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_ASCII_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _float_int_field(tok: str, path: Path | str, line: int, name: str) -> int:
    """An integer written as a float (``1.4e9``, ``17.0``)."""
    if not _ASCII_FLOAT.fullmatch(tok.strip()):
        raise DataError(f"{path}: line {line}: field '{name}': {tok!r} is not a number")
    f = float(tok)
    if not np.isfinite(f) or f != int(f):
        raise DataError(f"{path}: line {line}: field '{name}': {tok!r} is not an integer")
    return int(f)


def _int_field(tok: str, path: Path | str, line: int, name: str) -> int:
    """An integer in ASCII digits, or one written as a float (:func:`_float_int_field`)."""
    if _ASCII_INT.fullmatch(tok.strip()):
        v = int(tok)
    else:
        v = _float_int_field(tok, path, line, name)
    if not _INT64.min <= v <= _INT64.max:
        raise DataError(f"{path}: line {line}: field '{name}': {tok!r} is out of the int64 range")
    return v


# ids such as "0042", "+42" or "-0" must keep their spelling (and stay apart from "42" and "0"): a
# leading zero, plus sign or negative zero anywhere, also after spaces (which loadtxt skips and the
# slow path strips), sends a file to read_table's slow path, whose id conversion is exact
_NOT_PLAIN_INT = re.compile(r"(?:^|\t)[^\S\n]*(?:\+|-?0\d|-0)", re.M)


def _check_lines(body: str, names: list[str], idx: list[int], path: str | Path, first_line: int) -> None:
    """Refuse a line with more tab-separated fields than ``names`` (np.loadtxt's ``usecols`` would
    ignore the extra ones) and an ASCII control character other than tab in a field that is read
    (numpy's str arrays drop trailing NULs: ``"5\\x00"`` would silently become item ``5``); one in an
    unused column is harmless. ``idx``: the indices of the columns read; ``first_line``: the line
    number of ``body``'s first line. Vectorised over the UTF-8 bytes (a few ms per 100k lines): only
    the bytes < 32 or 127, which never occur inside a multi-byte character, are looked at one by one.
    """
    b = np.frombuffer(body.encode("utf-8"), np.uint8)
    low = np.flatnonzero((b < 32) | (b == 127))  # byte positions of tabs, newlines, control characters
    v = b[low]
    tab = v == 9
    nl = np.flatnonzero(v == 10)  # indices into ``low`` of the line ends: line k ends at low[nl[k]]
    ctab = np.concatenate(([0], np.cumsum(tab)))  # ctab[j]: tabs among low[:j]
    starts = np.concatenate(([0], nl))  # line k's entries of ``low``: [starts[k], ends[k])
    ends = np.concatenate((nl, [len(low)]))
    tabs = ctab[ends] - ctab[starts]
    bad: list[tuple[int, str]] = []  # (line index, message): the first bad line is reported
    over = np.flatnonzero(tabs >= len(names))
    if over.size:
        k = int(over[0])
        bad.append((k, f"malformed line: {tabs[k] + 1} tab-separated field(s), expected {len(names)}"))
    ctrl = np.flatnonzero(~tab & (v != 10))  # indices into ``low``
    if ctrl.size:
        line = np.searchsorted(nl, ctrl)
        field = ctab[ctrl] - ctab[starts[line]]  # tabs before it on its line
        read = np.flatnonzero(np.isin(field, idx))
        if read.size:
            j, k, f = int(ctrl[read[0]]), int(line[read[0]]), int(field[read[0]])
            lo = int(low[nl[k - 1]]) + 1 if k else 0
            hi = int(low[nl[k]]) if k < len(nl) else len(b)
            tok = b[lo:hi].tobytes().decode("utf-8").split("\t")[f]
            bad.append((k, f"field '{names[f]}': {tok!r} contains the control character {chr(b[low[j]])!r}"))
    if bad:
        k, msg = min(bad)
        raise DataError(f"{path}: line {first_line + k}: {msg}")


def read_table(
    path: str | Path,
    columns: list[str],
    *,
    names: list[str] | None = None,
    int_columns: Iterable[str] = (),
    allow_empty: Iterable[str] = (),
    report: Report | None = None,
) -> dict[str, np.ndarray]:
    """Read ``columns`` of a tab-separated file.

    With ``names=None`` the first line is a header (RecBole ``name:type`` headers are accepted:
    the ``:type`` part is dropped); otherwise the file has no header and ``names`` names its
    fields. ``int_columns`` must hold integers (a float-formatted integer such as ``"5.0"`` is
    accepted); other columns are ids (int64 when all integral, else str). An empty field is an
    error except in ``allow_empty`` columns (an item row without a category); a column that is read
    appearing twice in the header is an error.
    A line with more fields than the header (or ``names``) is an error, and so is an ASCII control
    character other than tab in a column that is read (:func:`_check_lines`, before either path);
    a line lacking only unread trailing columns is accepted.

    Fast path: one ``np.loadtxt`` call in C when every requested column is an integer. Any
    irregularity falls back to a line-by-line reader that raises :class:`DataError` with the
    file, the line and the field of the first bad line.
    """
    text = read_text(path)
    int_columns = set(int_columns)
    if names is None:
        nl = text.find("\n")
        head, body = (text, "") if nl < 0 else (text[:nl], text[nl + 1 :])
        names = [h.split(":")[0].strip() for h in head.split("\t")]
        check_unique_columns(path, names, columns)
        first_line = 2
        what = f"header {names}"
    else:
        body, first_line = text, 1
        what = f"expected fields {names}"
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: line 1: missing column(s) {missing} ({what})")
    idx = [names.index(c) for c in columns]
    stripped = body.rstrip("\n")
    # blank lines at the end (beyond the last line's own newline) are counted like the others
    trailing_blank = max(0, len(body) - len(stripped) - 1)
    body = stripped
    if not body.strip():
        raise DataError(f"{path}: no data lines")
    if report is not None:
        report.skip("blank_lines", trailing_blank, "blank lines in input files")
    _check_lines(body, names, idx, path, first_line)

    if "\n\n" not in body and not body.startswith("\n") and not _NOT_PLAIN_INT.search(body):
        try:
            arr = np.loadtxt(
                io.StringIO(body),
                dtype=np.int64,
                delimiter="\t",
                usecols=idx,
                ndmin=2,
                comments=None,
                quotechar=None,
            )
        except ValueError:
            pass  # not all-integer or malformed: the slow path says which line and field
        else:
            if arr.shape[0] == body.count("\n") + 1:
                return {c: np.ascontiguousarray(arr[:, k]) for k, c in enumerate(columns)}

    need = max(idx) + 1
    cols: list[list[str]] = [[] for _ in columns]
    line_no: list[int] = []
    blank = 0
    short: DataError | None = None  # the first line lacking a column that is read
    for n, line in enumerate(body.split("\n"), start=first_line):
        if not line.strip():
            blank += 1
            continue
        f = line.split("\t")
        if len(f) < need:
            absent = [c for c, i in zip(columns, idx) if i >= len(f)]
            short = DataError(
                f"{path}: line {n}: malformed line: {len(f)} tab-separated field(s), expected {len(names)}; "
                f"missing field(s) {absent}"
            )
            short.line = n
            break
        for k, i in enumerate(idx):
            cols[k].append(f[i].strip())
        line_no.append(n)
    # each column's check over the lines before the first short one: the error of the first bad line
    errors = [] if short is None else [short]
    out: dict[str, np.ndarray] = {}
    for k, c in enumerate(columns):
        try:
            out[c] = _column(cols[k], c, c in int_columns, c not in allow_empty, path, line_no)
        except DataError as e:
            errors.append(e)
    if errors:
        raise min(errors, key=lambda e: e.line)
    if report is not None:
        report.skip("blank_lines", blank, "blank lines in input files")
    return out


def _column(vals: list[str], c: str, integer: bool, required: bool, path: str | Path,
            line_no: list[int]) -> np.ndarray:
    """One column of :func:`read_table`'s slow path: int64 (``integer``), else ids (:func:`_to_ids`);
    an empty value of a ``required`` column is an error. An error carries its line as ``.line``."""
    if integer:
        try:
            if all(map(_ASCII_INT.fullmatch, vals)):  # numpy's int() would also take "1_000", "٣٠"
                return np.array(vals, dtype=np.int64)
        except OverflowError:
            pass
        out = np.empty(len(vals), np.int64)
        for r, v in enumerate(vals):
            try:
                out[r] = _int_field(v, path, line_no[r], c)
            except DataError as e:
                e.line = line_no[r]
                raise
        return out
    if required and not all(vals):
        r = next(r for r, v in enumerate(vals) if not v)
        e = DataError(f"{path}: line {line_no[r]}: field '{c}' is empty")
        e.line = line_no[r]
        raise e
    return _to_ids(vals)


# --------------------------------------------------------------------------------------------
# readers


def _item_table(
    ids: np.ndarray, cates: np.ndarray, path: str | Path, report: Report
) -> tuple[np.ndarray, np.ndarray]:
    """Drop rows without a category (counted) and duplicate item rows (first wins, counted)."""
    if cates.dtype.kind == "U":
        has = cates != ""
        report.repair(
            "meta_rows_without_category",
            int((~has).sum()),
            f"{path}: item rows without a category (the item gets category 0 'unknown')",
        )
        ids, cates = ids[has], _to_ids(list(cates[has]))
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
        first.sort()
        report.repair(
            "duplicate_item_rows",
            len(ids) - len(first),
            f"{path}: repeated item rows (the first row's category is kept)",
        )
        ids, cates = ids[first], cates[first]
    return ids, cates


def read_tsv(interactions: str | Path, items: str | Path, category_column: str = "cate_leaf") -> Interactions:
    """``interactions.tsv`` (``user_id, item_id, timestamp``) + ``items.tsv`` (``item_id`` and
    ``category_column``), each with a header line, plain or ``.gz``."""
    report = Report()
    inter = read_table(
        interactions, ["user_id", "item_id", "timestamp"], int_columns={"timestamp"}, report=report
    )
    tab = read_table(items, ["item_id", category_column], allow_empty={category_column}, report=report)
    ids, cates = _item_table(tab["item_id"], tab[category_column], items, report)
    return Interactions(
        user=inter["user_id"],
        item=inter["item_id"],
        timestamp=inter["timestamp"],
        item_ids=ids,
        item_cate=cates,
        files={"interactions": str(interactions), "items": str(items)},
        report=report,
    )


def _records(path: str | Path, report: Report):
    """(line number, dict) per non-blank line: strict JSON, else a Python literal (the 2014 Amazon
    metadata is written with Python's repr). ``ast.literal_eval`` only, never ``eval``."""
    blank = 0
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # nested too deep: malformed, as literal_eval says
            try:
                rec = ast.literal_eval(line)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
                raise DataError(
                    f"{path}: line {n}: malformed line: neither JSON nor a Python literal ({e})"
                ) from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {n}: malformed line: expected an object, got {type(rec).__name__}")
        yield n, rec
    report.skip("blank_lines", blank, "blank lines in input files")


def _json_id(v: Any, path: str | Path, n: int, field: str) -> str:
    """An id field of a JSON record: a non-empty string or an integer (not null, bool, float...)."""
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise DataError(f"{path}: line {n}: field '{field}': {v!r} is not an id (a string or an integer)")
    s = str(v).strip()
    if not s:
        raise DataError(f"{path}: line {n}: field '{field}' is empty")
    return no_control_character(s, path, n, field)


# ASCII control characters: a tab or newline cannot be stored one id per line in ``vocab/*.tsv``, and
# numpy's str arrays drop trailing NULs ("5\x00" would silently become id "5"); DIEN's history
# separator \x02 is allowed where _read_dien_samples has split on it already
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
# half of a UTF-16 pair alone: JSON's "\ud800" escape decodes to one, which no UTF-8 file can store
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def no_control_character(s: str, path: str | Path, n: int, field: str, separator: str = "") -> str:
    """Refuse an id holding an ASCII control character or a lone surrogate, here where the file and
    line are known (not when the dataset is written). ``separator``: a control character allowed in
    the field (DIEN's ``\\x02`` between history entries), which is checked whole, in one search."""
    m = CONTROL_CHARACTER.search(s.replace(separator, "") if separator else s)
    if m:
        raise DataError(f"{path}: line {n}: field '{field}': {s!r} contains the control character "
                        f"{m.group()!r}")
    m = _LONE_SURROGATE.search(s)
    if m:
        raise DataError(f"{path}: line {n}: field '{field}': {s!r} contains the lone surrogate {m.group()!r} "
                        "(half of a UTF-16 pair, e.g. a JSON \\u escape): not a character")
    return s


def blank_line(line: str) -> bool:
    """A blank line (skipped, counted); a row of empty fields is not, nor is a lone control character
    (an error where it is read)."""
    return not line.strip() and "\t" not in line and not CONTROL_CHARACTER.search(line)


def check_unique_columns(path: str | Path, header: list[str], columns) -> None:
    """Refuse a header naming a column that is read (``columns``) more than once: which one to read
    would be ambiguous (an unread name may repeat: RecBole's ``name:type`` headers do)."""
    twice = next((c for c in columns if header.count(c) > 1), None)
    if twice is not None:
        raise DataError(f"{path}: line 1: column {twice!r} appears twice in the header {header}: "
                        "which one to read is ambiguous")


def read_amazon_json(reviews: str | Path, meta: str | Path) -> Interactions:
    """Amazon 2014 ``reviews_<Cat>_5.json(.gz)`` (``reviewerID``, ``asin``, ``unixReviewTime``) and
    ``meta_<Cat>.json(.gz)`` (``asin``, ``categories``: list of category paths; the item's
    category is the last element of the first path)."""
    report = Report()
    users: list[str] = []
    items: list[str] = []
    ts: list[int] = []
    for n, rec in _records(reviews, report):
        for f in ("reviewerID", "asin", "unixReviewTime"):
            if f not in rec:
                raise DataError(f"{reviews}: line {n}: missing field '{f}'")
        t = rec["unixReviewTime"]
        if isinstance(t, bool) or not isinstance(t, (int, float, str)):
            raise DataError(f"{reviews}: line {n}: field 'unixReviewTime': {t!r} is not a number")
        users.append(_json_id(rec["reviewerID"], reviews, n, "reviewerID"))
        items.append(_json_id(rec["asin"], reviews, n, "asin"))
        ts.append(_int_field(str(t), reviews, n, "unixReviewTime"))
    if not users:
        raise DataError(f"{reviews}: no data lines")
    m_ids: list[str] = []
    m_cat: list[str] = []
    for n, rec in _records(meta, report):
        if "asin" not in rec:
            raise DataError(f"{meta}: line {n}: missing field 'asin'")
        cats = rec.get("categories")
        cat = ""
        paths = cats if isinstance(cats, (list, tuple)) else None
        if paths is not None and all(isinstance(c, (list, tuple)) for c in paths):
            first = next((c for c in paths if c), None)  # the first non-empty path ([] ones: none)
            if first is not None:
                if not isinstance(first[-1], str):
                    raise DataError(f"{meta}: line {n}: field 'categories': the category {first[-1]!r} is "
                                    "not a string")
                # a blank one is no category: counted with the rows without one (as the TSV reader)
                cat = no_control_character(first[-1].strip(), meta, n, "categories")
        elif cats is not None:  # a string, or a flat list ['Beauty'] (not a list of paths)
            raise DataError(f"{meta}: line {n}: field 'categories': expected a list of category paths "
                            f"([['Beauty', 'Skin Care']]), got {cats!r:.60}")
        m_ids.append(_json_id(rec["asin"], meta, n, "asin"))
        m_cat.append(cat)
    # ids as the TSV reader types them: int64 when every one is a plain integer (numeric order)
    ids, cates = _item_table(_to_ids(m_ids), np.array(m_cat, dtype=str), meta, report)
    return Interactions(
        user=_to_ids(users),
        item=_to_ids(items),
        timestamp=np.array(ts, dtype=np.int64),
        item_ids=ids,
        item_cate=cates,
        files={"reviews": str(reviews), "meta": str(meta)},
        report=report,
    )


def read_movielens(path: str | Path, category_column: str = "class") -> Interactions:
    """RecBole atomic files ``<name>.inter`` (``user_id, item_id, timestamp``) and ``<name>.item``
    (``item_id`` and a genre column, default ``class``; category = its first genre) in ``path``."""
    d = Path(path)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory (expected RecBole <name>.inter and <name>.item)")
    inter_files, item_files = sorted(d.glob("*.inter")), sorted(d.glob("*.item"))
    if len(inter_files) != 1 or len(item_files) != 1:
        raise DataError(
            f"{d}: expected exactly one *.inter and one *.item file, found "
            f"{[p.name for p in inter_files + item_files]}"
        )
    report = Report()
    inter = read_table(
        inter_files[0], ["user_id", "item_id", "timestamp"], int_columns={"timestamp"}, report=report
    )
    head = [h.split(":")[0] for h in read_text(item_files[0]).split("\n", 1)[0].split("\t")]
    if category_column not in head:
        raise DataError(f"{item_files[0]}: no column {category_column!r} for the category; columns: {head}")
    col = category_column
    tab = read_table(item_files[0], ["item_id", col], allow_empty={col}, report=report)
    genres = tab[col].astype(str)
    first = np.array([g.split(" ", 1)[0] for g in genres], dtype=str)  # 1,682 rows: fine in Python
    ids, cates = _item_table(tab["item_id"], first, item_files[0], report)
    return Interactions(
        user=inter["user_id"],
        item=inter["item_id"],
        timestamp=inter["timestamp"],
        item_ids=ids,
        item_cate=cates,
        files={"interactions": str(inter_files[0]), "items": str(item_files[0])},
        report=report,
    )


# ---- DIEN

DIEN_SPLITS = (("local_train_splitByUser", "local_test_splitByUser"), ("local_train", "local_test"))
DIEN_DEFAULTS = {"uid": "default_uid", "item": "default_mid", "cate": "default_cat"}


class _VocabUnpickler(pickle.Unpickler):
    """DIEN's ``*_voc.pkl`` are plain dicts: refuse any class (a pickle can run code)."""

    def find_class(self, module: str, name: str):  # noqa: D401
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a vocabulary holds only str -> int")


def _load_voc(path: Path) -> dict[str, int]:
    """A DIEN vocabulary. DIEN wrote them with Python 2, whose ``str`` keys are bytes: they are
    read as bytes and decoded as UTF-8, like the sample files (latin-1 would turn a non-ASCII id
    into one the samples never contain)."""
    try:
        with open(path, "rb") as f:
            voc = _VocabUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 (a damaged pickle raises almost anything: TypeError, MemoryError...)
        detail = e if isinstance(e, (OSError, pickle.UnpicklingError)) else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: cannot read the vocabulary ({detail})") from e
    if not isinstance(voc, dict):
        raise DataError(f"{path}: expected a dict raw id -> index, got {type(voc).__name__}")
    out = {}
    for k, v in voc.items():
        if isinstance(k, bytes):
            try:
                k = k.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: key {k!r} is not valid UTF-8 ({e.reason})") from e
        else:
            k = str(k)
        m = CONTROL_CHARACTER.search(k) or _LONE_SURROGATE.search(k)
        if m:  # numpy's str arrays drop a trailing NUL: "a\x00" would become a second "a"
            raise DataError(f"{path}: key {k!r} contains the control character {m.group()!r}")
        if isinstance(v, bool) or not isinstance(v, int):
            raise DataError(f"{path}: entry {k!r}: index {v!r} is not an integer")
        out[k] = v
    return out


DIEN_FIELDS = ("label", "uid", "mid", "cat", "hist_mids", "hist_cats")


def dien_row(line: str, path: str | Path, n: int) -> tuple[int, str, str, str, list[str], list[str]]:
    """One DIEN ``local_*`` line (:data:`DIEN_FIELDS`, histories joined by ``\\x02``) checked as
    every reader of them checks it: label 0/1, ids neither empty nor holding a control character,
    the two histories of equal length without empty entries → ``(label, uid, mid, cat, hist_mids,
    hist_cats)`` (the histories ``[]`` when empty). Errors name the file, line and field."""
    f = line.split("\t")
    if len(f) != 6:
        miss = f" missing field(s) {list(DIEN_FIELDS[len(f) :])}" if len(f) < 6 else ""
        raise DataError(
            f"{path}: line {n}: malformed line: {len(f)} tab-separated fields, expected 6 "
            f"{list(DIEN_FIELDS)};{miss}"
        )
    if f[0] not in ("0", "1"):
        raise DataError(f"{path}: line {n}: field 'label': {f[0]!r} is not 0 or 1")
    for k in (1, 2, 3):
        if not f[k]:
            raise DataError(f"{path}: line {n}: field '{DIEN_FIELDS[k]}' is empty")
        no_control_character(f[k], path, n, DIEN_FIELDS[k])
    hm = f[4].split("\x02") if f[4] else []
    hc = f[5].split("\x02") if f[5] else []
    if len(hm) != len(hc):
        raise DataError(
            f"{path}: line {n}: field 'hist_cats' has {len(hc)} entries but 'hist_mids' has {len(hm)}"
        )
    for k, toks in ((4, hm), (5, hc)):
        if "" in toks:
            raise DataError(f"{path}: line {n}: field '{DIEN_FIELDS[k]}': entry {toks.index('') + 1} "
                            "is empty")
        no_control_character(f[k], path, n, DIEN_FIELDS[k], separator="\x02")
    return int(f[0]), f[1], f[2], f[3], hm, hc


def _read_dien_samples(path: Path, max_len: int, report: Report) -> dict[str, np.ndarray]:
    """One DIEN ``local_*`` file: ``label, uid, mid, cat, hist_mids, hist_cats`` per line,
    histories joined by ``\\x02``; histories longer than ``max_len`` keep their last items."""
    label: list[int] = []
    uid: list[str] = []
    item: list[str] = []
    cate: list[str] = []
    hlen: list[int] = []
    hitem: list[str] = []
    hcate: list[str] = []
    empty = blank = truncated = 0
    for n, line in enumerate(_lines(path), start=1):
        if blank_line(line):
            blank += 1
            continue
        lab, u, i, c, hm, hc = dien_row(line, path, n)
        if not hm:
            empty += 1  # a target without any behaviour before it: nothing to learn a sequence from
            continue
        if len(hm) > max_len:
            truncated += 1
            hm, hc = hm[-max_len:], hc[-max_len:]
        label.append(lab)
        uid.append(u)
        item.append(i)
        cate.append(c)
        hlen.append(len(hm))
        hitem.extend(hm)
        hcate.extend(hc)
    if empty == 0 and not label:
        raise DataError(f"{path}: no data lines")
    report.skip("blank_lines", blank, "blank lines in input files")
    report.skip("empty_history", empty, "DIEN rows with an empty history (no behaviour before the target)")
    report.repair(
        "history_truncated", truncated, f"DIEN rows whose history was cut to the last max_len={max_len} items"
    )
    return {
        "label": np.array(label, dtype=np.int8),
        "uid": np.array(uid, dtype=str),
        "item": np.array(item, dtype=str),
        "cate": np.array(cate, dtype=str),
        "hist_len": np.array(hlen, dtype=np.int64),
        "hist_item": np.array(hitem, dtype=str),
        "hist_cate": np.array(hcate, dtype=str),
    }


def read_dien(path: str | Path, max_len: int = 20) -> PrebuiltSamples | Interactions:
    """DIEN's preprocessed files in directory ``path``.

    * ``local_train_splitByUser`` + ``local_test_splitByUser`` (preferred) or ``local_train`` +
      ``local_test``: samples with DIEN's own split and negatives -> :class:`PrebuiltSamples`;
      optional ``uid_voc.pkl``/``mid_voc.pkl``/``cat_voc.pkl`` fix the id order; optional
      ``item-info`` gives item categories.
    * else ``reviews-info`` (user, item, rating, time) + ``item-info`` (item, category), no
      headers -> raw :class:`Interactions` for our own protocols.
    """
    d = Path(path)
    if not d.is_dir():
        raise DataError(
            f"{d}: not a directory (expected DIEN's local_train/local_test or reviews-info/item-info)"
        )
    report = Report()
    item_info = None
    if (d / "item-info").exists():
        tab = read_table(
            d / "item-info", ["item", "cate"], names=["item", "cate"], allow_empty={"cate"}, report=report
        )
        item_info = _item_table(tab["item"], tab["cate"].astype(str), d / "item-info", report)
    for train, test in DIEN_SPLITS:
        if (d / train).exists() or (d / test).exists():
            splits = {
                "train": _read_dien_samples(d / train, max_len, report),
                "test": _read_dien_samples(d / test, max_len, report),
            }
            vocabs = {}
            files = {"train": str(d / train), "test": str(d / test)}
            for key, fname in (("uid", "uid_voc.pkl"), ("item", "mid_voc.pkl"), ("cate", "cat_voc.pkl")):
                if (d / fname).exists():
                    vocabs[key] = _load_voc(d / fname)
                    files[key] = str(d / fname)
            if item_info is not None:
                files["item-info"] = str(d / "item-info")
            return PrebuiltSamples(
                splits=splits, files=files, report=report, item_info=item_info, vocabs=vocabs
            )
    if (d / "reviews-info").exists():
        if item_info is None:
            raise DataError(f"{d / 'item-info'}: file not found (needed with reviews-info)")
        rev = read_table(
            d / "reviews-info",
            ["user", "item", "timestamp"],
            names=["user", "item", "rating", "timestamp"],
            int_columns={"timestamp"},
            report=report,
        )
        return Interactions(
            user=rev["user"],
            item=rev["item"],
            timestamp=rev["timestamp"],
            item_ids=item_info[0],
            item_cate=item_info[1],
            files={"reviews-info": str(d / "reviews-info"), "item-info": str(d / "item-info")},
            report=report,
        )
    raise DataError(
        f"{d}: no DIEN files found (looked for {[a for p in DIEN_SPLITS for a in p]} and reviews-info)"
    )
