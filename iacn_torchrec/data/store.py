"""The prepared dataset directory: atomic writing, validation and the content hash.

Layout (docs/architecture.md, "Prepared dataset directory")::

    DIR/
      meta.json            written last; its presence marks a complete directory
      vocab/uid.tsv        raw id <TAB> index (index 0 = padding/unknown is not listed)
      vocab/item.tsv, vocab/cate.tsv
      item2cate.npy        int64 [num_items + 1]; item2cate[0] = 0
      item_count.npy       int64 [num_items + 1]; train-split occurrences
      train/ test/         uid item cate label hist_offsets hist_item hist_cate neg_hist_item neg_hist_cate

Writing goes to a hidden temporary sibling (``.DIR.tmp-<pid>-<rand>``) renamed onto ``DIR`` at
the end, ``meta.json`` being the last file written, so an interrupted run never leaves anything
at ``DIR`` that passes :func:`read_meta`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from iacn_torchrec.data.protocols import SPLIT_ARRAYS, BuiltDataset
from iacn_torchrec.data.sources import DataError
from iacn_torchrec.fileio import replace_dir, temp_sibling

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META",
    "write_dataset",
    "check_target",
    "read_meta",
    "is_prepared",
    "content_hash",
    "MAX_LEN_LIMIT",
    "check_vocab_bytes",
    "check_vocab_lines",
]

FORMAT = "iacn-prepared-dataset"
FORMAT_VERSION = 1
META = "meta.json"
VOCABS = ("uid", "item", "cate")
# meta.json's counts that size each vocabulary (vocab/<kind>.tsv holds one line per index 1..n)
VOCAB_COUNTS = {"uid": "users", "item": "items", "cate": "categories"}
# The longest history a dataset may keep. Training sizes fixed buffers by it (IaCN's routing keeps
# ceil(log2 L) x L logits: 0.5 MB at 10,000, 14.8 TB at 1e11) and pads every batch's histories to it
# ([B, L, D]: 1.5 GB per tensor at B = 1024, L = 10,000, D = 36); the usual L is 20 to 100.
MAX_LEN_LIMIT = 10_000
_AGAIN = "the dataset is damaged: prepare it again with --force"


def content_hash(arrays: dict[str, np.ndarray], vocab_bytes: dict[str, bytes]) -> str:
    """``sha256`` over (relative path, dtype, shape, raw bytes) of every array, in sorted path
    order, then over every vocabulary file: equal hashes <=> equal content."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(memoryview(a).cast("B"))
    for name in sorted(vocab_bytes):
        h.update(f"vocab/{name}.tsv\0".encode())
        h.update(vocab_bytes[name])
    return "sha256:" + h.hexdigest()


def is_prepared(path: str | Path) -> bool:
    try:
        read_meta(path)
    except DataError:
        return False
    return True


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of a complete prepared directory, or a :class:`DataError` saying what is wrong."""
    d = Path(path)
    if not d.is_dir():
        raise DataError(f"{d}: no such prepared dataset directory (run `iacn prepare ... --out {d}`)")
    mp = d / META
    if not mp.is_file():
        raise DataError(
            f"{d}: no {META}: not a prepared dataset (an interrupted `iacn prepare` leaves none here: it "
            "writes into a hidden sibling); prepare one with `iacn prepare ... --out DIR`"
        )
    try:
        meta = json.loads(mp.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{mp}: unreadable or truncated ({e}); not a prepared dataset this code can replace: "
                        "remove the folder or prepare into another --out") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{mp}: not an iacn prepared-dataset meta.json (field 'format' is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{mp}: field 'format_version' is {meta.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; prepare the dataset again"
        )
    for key in ("content_hash", "arrays", "counts", "protocol", "max_len"):
        if key not in meta:
            raise DataError(f"{mp}: missing field '{key}'; {_AGAIN}")
    _check_fields(mp, meta)
    return meta


def _count(v: object) -> bool:
    return type(v) is int and v >= 0  # type(): a JSON true is no count


def _check_fields(mp: Path, meta: dict) -> None:
    """The fields the code reads, checked here so that an edited meta.json is one line naming the
    field, not a KeyError / TypeError / AttributeError deep in training: ``counts`` (every entry a
    non-negative integer, ``users``/``items``/``categories`` required), ``max_len`` (an integer in
    ``[1, MAX_LEN_LIMIT]``), ``protocol`` and ``content_hash`` (strings), ``arrays`` (``{path:
    {"dtype": str, "shape": [int, ...]}}`` listing ``item2cate.npy``, ``item_count.npy`` and every
    array of the ``train`` and ``test`` splits)."""
    for key in ("protocol", "content_hash"):
        if not isinstance(meta[key], str):
            raise DataError(f"{mp}: field '{key}': {meta[key]!r} is not a string; {_AGAIN}")
    counts = meta["counts"]
    if not isinstance(counts, dict):
        raise DataError(f"{mp}: field 'counts': expected an object, got {type(counts).__name__}; {_AGAIN}")
    for key in VOCAB_COUNTS.values():
        if key not in counts:
            raise DataError(f"{mp}: missing field 'counts.{key}'; {_AGAIN}")
    for key, v in counts.items():
        if not _count(v):
            raise DataError(f"{mp}: field 'counts.{key}': {v!r} is not a non-negative integer; {_AGAIN}")
    max_len = meta["max_len"]
    if type(max_len) is not int or max_len < 1:
        raise DataError(f"{mp}: field 'max_len': {max_len!r} is not a positive integer; {_AGAIN}")
    if max_len > MAX_LEN_LIMIT:  # prepared before the limit: intact, but too long to train on
        raise DataError(f"{mp}: max_len {max_len:,} is above the supported {MAX_LEN_LIMIT:,} (training pads "
                        "every batch's histories to it): prepare it again with a smaller --max-len")
    arrays = meta["arrays"]
    if not isinstance(arrays, dict):
        raise DataError(f"{mp}: field 'arrays': expected an object {{path: {{dtype, shape}}}}, got "
                        f"{type(arrays).__name__}; {_AGAIN}")
    for rel, spec in arrays.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str)
                and isinstance(spec.get("shape"), list) and all(_count(n) for n in spec["shape"])):
            raise DataError(f"{mp}: field 'arrays.{rel}': expected {{\"dtype\": str, \"shape\": "
                            f"[int, ...]}}, got {spec!r}; {_AGAIN}")
    sizes = meta.get("vocab_bytes", {})
    if not (isinstance(sizes, dict) and set(sizes) <= set(VOCABS) and all(_count(v) for v in sizes.values())):
        raise DataError(f"{mp}: field 'vocab_bytes': expected {{\"uid\"|\"item\"|\"cate\": bytes}}, got "
                        f"{sizes!r}; {_AGAIN}")
    need = ["item2cate.npy", "item_count.npy"]
    need += [f"{split}/{a}.npy" for split in ("train", "test") for a in SPLIT_ARRAYS]
    absent = next((rel for rel in need if rel not in arrays), None)
    if absent is not None:
        raise DataError(f"{mp}: field 'arrays': {absent!r} is not listed; {_AGAIN}")


def check_vocab_lines(path: str | Path, meta: dict) -> None:
    """Each present ``vocab/<kind>.tsv`` holds exactly ``counts.<kind>`` lines (``meta``: a
    :func:`read_meta` result), else a :class:`DataError` naming the file and both numbers: a
    truncated vocabulary would otherwise be exported and map most ids to unknown. Where ``meta``
    records the file's size (``vocab_bytes``, written by :func:`write_dataset`), a file of that size
    is not read: an open costs a ``stat``, not a read of a 10M-line vocabulary, and the lines are
    counted where the vocabulary is read (:func:`check_vocab_bytes`). Otherwise (a dataset prepared
    before the field existed, or a size that differs) a newline count over the bytes. An absent file
    is left to whoever reads it (training does not)."""
    sizes = meta.get("vocab_bytes", {})
    for kind in VOCAB_COUNTS:
        p = Path(path) / "vocab" / f"{kind}.tsv"
        if not p.is_file() or (kind in sizes and p.stat().st_size == sizes[kind]):
            continue
        try:
            data = p.read_bytes()
        except OSError as e:
            raise DataError(f"{p}: cannot read the vocabulary ({e}); prepare it again with --force") from e
        check_vocab_bytes(p, data, kind, meta)
        if kind in sizes:  # the lines add up, the size does not: edited in place
            raise DataError(f"{p}: {len(data):,} bytes, but {META}'s vocab_bytes.{kind} is {sizes[kind]:,}; "
                            f"{_AGAIN}")


def check_vocab_bytes(p: Path, data: bytes, kind: str, meta: dict) -> None:
    """``data``, the content of vocabulary file ``p`` of ``kind``, ends with a newline and holds
    ``counts.<kind>`` lines, else a :class:`DataError` naming ``p`` and both numbers."""
    if data and not data.endswith(b"\n"):  # every line the writer writes ends with one
        raise DataError(f"{p}: the last line is cut short (no final newline); {_AGAIN}")
    key = VOCAB_COUNTS[kind]
    lines, want = data.count(b"\n"), meta["counts"][key]
    if lines != want:
        raise DataError(f"{p}: {lines} lines, but {META}'s counts.{key} is {want}; {_AGAIN}")


def _ours(d: Path) -> bool:
    """A prepared dataset of this project, valid or not (stale format, damaged arrays): its
    meta.json names our format. Only such a directory may be replaced."""
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_target(out: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing prepared dataset (even a stale or damaged one) unless
    ``overwrite``; an empty directory is fine; any other existing path (a file, a folder of
    something else, a folder without a meta.json of ours) is never replaced."""
    d = Path(out)
    if not d.exists():
        return
    if not d.is_dir():
        raise DataError(f"{d}: exists and is not a directory")
    if _ours(d):
        if not overwrite:
            raise DataError(
                f"{d}: a prepared dataset already exists; pass --force (overwrite=True) to replace it"
            )
    elif any(d.iterdir()):
        raise DataError(
            f"{d}: exists, is not empty and is not a prepared dataset (no valid {META}): not replaced, "
            "even with --force; choose another --out or empty it yourself"
        )


def _vocab_file(tokens: np.ndarray, kind: str) -> bytes:
    toks = tokens.astype(str).tolist()
    bad = next((t for t in toks if "\t" in t or "\n" in t), None)
    if bad is not None:
        raise DataError(
            f"{kind} id {bad!r} contains a tab or newline: it cannot be written to vocab/{kind}.tsv"
        )
    return "".join(f"{t}\t{i}\n" for i, t in enumerate(toks, start=1)).encode()


def _versions() -> dict[str, str]:
    from iacn_torchrec import versions  # noqa: PLC0415 (tiny, avoids a cycle at import)

    return {**versions(), "format_version": str(FORMAT_VERSION)}


def write_dataset(built: BuiltDataset, out: str | Path, meta: dict, *, overwrite: bool = False) -> Path:
    """Write ``built`` to ``out`` atomically; ``meta`` gets counts, report, arrays, hash, versions."""
    out = Path(out).absolute()
    check_target(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create its parent folder ({e})") from e
    arrays: dict[str, np.ndarray] = {"item2cate.npy": built.item2cate, "item_count.npy": built.item_count}
    for split, sa in built.splits.items():
        for name, a in sa.arrays().items():
            arrays[f"{split}/{name}.npy"] = a
    vocab = {k: _vocab_file(built.vocabs[k], k) for k in VOCABS}

    tmp = temp_sibling(out)
    try:
        (tmp / "vocab").mkdir(parents=True)
        for split in built.splits:
            (tmp / split).mkdir()
        for name, a in arrays.items():
            np.save(tmp / name, np.ascontiguousarray(a), allow_pickle=False)
        for k, b in vocab.items():
            (tmp / "vocab" / f"{k}.tsv").write_bytes(b)
        full = dict(meta)
        full.update(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "protocol": built.protocol,
                "counts": built.counts,
                **built.report.as_dict(),
                "arrays": {n: {"dtype": str(a.dtype), "shape": list(a.shape)} for n, a in arrays.items()},
                "vocab_bytes": {k: len(b) for k, b in vocab.items()},
                "content_hash": content_hash(arrays, vocab),
                "versions": _versions(),
            }
        )
        (tmp / META).write_text(
            json.dumps(full, indent=2, sort_keys=False) + "\n"
        )  # last: marks completeness
        if out.exists():
            check_target(out, overwrite)  # re-check: someone may have written there meanwhile
        replace_dir(tmp, out)  # a failed overwrite puts the previous dataset back: nothing is lost
    except OSError as e:  # no permission, a full disk: nothing was replaced
        raise DataError(f"{out}: cannot write the dataset ({e})") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
