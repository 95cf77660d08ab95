"""Score raw samples with an exported model.

``iacn score --model MODEL_DIR --input FILE [--out SCORES.tsv] [--format auto|tsv|dien]``

Input formats (plain or ``.gz``, UTF-8, CRLF accepted; a lone CR is a control character, not a line
end; a control character in a field that is read is an error, as in ``iacn prepare``):

* ``tsv``: a header line naming at least ``user_id``, ``item_id``, ``history`` (the user's earlier
  item ids, oldest first, separated by ``|``, ``,``, spaces or DIEN's ``\\x02``; may be empty), and
  optionally ``label`` (0/1: the AUC is then reported); a column read named twice, or a data
  line equal to the header (concatenated files), is an error. Categories come from the artefact's
  item → category table.
* ``dien``: DIEN's ``local_train`` / ``local_test`` rows ``label, uid, mid, cat, hist_mids,
  hist_cats`` (no header, histories ``\\x02``-joined); categories are the file's; empty ids or
  history entries are errors, as in ``iacn prepare``.

Every row is scored (an empty history is allowed; a file without rows is an error); ids the
vocabularies do not know map to the unknown row 0 and are counted per field (an unknown history
id keeps its place and its length count: the model reads row 0 there, trained only where the
training data had unknown ids); histories longer than L keep their last L items (counted; the ids cut
off are not scored, nor counted as unknown). Output: TSV
``user_id, item_id, score[, label]`` in input order, written whole (never over the input file).

This module imports torch, numpy and :mod:`iacn_torchrec.serving.artifact` only (plus the
torch-free file reader of :mod:`iacn_torchrec.data.sources`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iacn_torchrec.data.sources import (
    DataError,
    blank_line,
    check_unique_columns,
    dien_row,
    no_control_character,
    read_text,
)
from iacn_torchrec.fileio import check_output_path, open_atomic
from iacn_torchrec.runtime import set_threads, show_progress
from iacn_torchrec.serving.artifact import EncodedSamples, ServingArtifact, auc

__all__ = ["RawSamples", "read_samples", "score_file", "add_arguments", "run"]

_SPLIT = re.compile(r"[|,\s\x02]+")
FORMATS = ("auto", "tsv", "dien")


@dataclass
class RawSamples:
    """Raw-id samples: ``user``/``item`` ``[N]``, ``hist_item`` concatenated with ``hist_len [N]``,
    optional ``cate``/``hist_cate`` (DIEN files) and ``label`` ``[N]``."""

    user: list[str]
    item: list[str]
    hist_item: list[str]
    hist_len: np.ndarray
    label: np.ndarray | None = None
    cate: list[str] | None = None
    hist_cate: list[str] | None = None
    format: str = "tsv"

    def encode(self, art: ServingArtifact) -> EncodedSamples:
        return art.encode(self.user, self.item, self.hist_item, self.hist_len, self.cate, self.hist_cate)


def _looks_dien(first: str) -> bool:
    f = first.split("\t")
    return len(f) == 6 and f[0] in ("0", "1")


def read_samples(path: str | Path, fmt: str = "auto") -> RawSamples:
    """Parse ``path`` (see the module docstring); bad lines raise :class:`DataError` with file/line/field."""
    if fmt not in FORMATS:
        raise DataError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    lines = read_text(path).split("\n")
    first = next((ln for ln in lines if not blank_line(ln)), "")
    if not first:
        raise DataError(f"{path}: empty input")
    if fmt == "auto":
        fmt = "dien" if _looks_dien(first) else "tsv"
    user: list[str] = []
    item: list[str] = []
    hist: list[str] = []
    hlen: list[int] = []
    label: list[int] = []
    if fmt == "dien":
        cate: list[str] = []
        hcate: list[str] = []
        for n, line in enumerate(lines, start=1):
            if blank_line(line):  # a row of empty fields or a lone control character is refused there
                continue
            lab, u, i, c, hm, hc = dien_row(line, path, n)  # checked as prepare's DIEN reader does
            label.append(lab)
            user.append(u)
            item.append(i)
            cate.append(c)
            hist.extend(hm)
            hcate.extend(hc)
            hlen.append(len(hm))
        return RawSamples(
            user,
            item,
            hist,
            np.array(hlen, dtype=np.int64),
            np.array(label, dtype=np.int8),
            cate,
            hcate,
            format="dien",
        )

    header = first.split("\t")
    need = ("user_id", "item_id", "history")
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(
            f"{path}: line 1: missing column(s) {missing} (header {header}); expected a TSV "
            "header with user_id, item_id, history[, label] (or DIEN local_test rows)"
        )
    check_unique_columns(path, header, (*need, "label"))
    cu, ci, ch = (header.index(c) for c in need)
    cl = header.index("label") if "label" in header else None
    width = len(header)
    stripped_header = [h.strip() for h in header]
    seen_header = False
    for n, line in enumerate(lines, start=1):
        # a blank line; a row of empty fields is an error, and so is a lone control character
        if blank_line(line):
            continue
        if not seen_header:
            seen_header = True
            continue
        raw = line.split("\t")
        # before stripping (str.strip drops "\r", "\x1c" ...), as prepare checks the fields it reads;
        # a control character in a column that is not read is ignored, as there
        for c, name in ((cu, "user_id"), (ci, "item_id"), (cl, "label")):
            if c is not None and c < len(raw):
                no_control_character(raw[c], path, n, name)
        if ch < len(raw):  # DIEN's separator is allowed; "2\r3" would otherwise split into two ids
            no_control_character(raw[ch], path, n, "history", separator="\x02")
        f = [x.strip() for x in raw]  # ids as the training readers read them
        if f == stripped_header:  # prepare refuses such a line too (its timestamp is not a number)
            raise DataError(f"{path}: line {n}: the header line again (concatenated files?); a data line "
                            "equal to the header is not scored: remove it")
        if len(f) == width - 1 and ch == width - 1:
            f.append("")  # the history is the last column: an empty one may lose its tab (editors)
        if len(f) != width:
            raise DataError(f"{path}: line {n}: malformed line: {len(f)} tab-separated fields, the header "
                            f"has {width} {header}")
        for c, name in ((cu, "user_id"), (ci, "item_id")):
            if not f[c]:
                raise DataError(f"{path}: line {n}: field {name!r} is empty")
        h = [t for t in _SPLIT.split(f[ch].strip()) if t]
        user.append(f[cu])
        item.append(f[ci])
        hist.extend(h)
        hlen.append(len(h))
        if cl is not None:
            if f[cl] not in ("0", "1"):
                raise DataError(f"{path}: line {n}: field 'label': {f[cl]!r} is not 0 or 1")
            label.append(int(f[cl]))
    if not user:  # a header alone: nothing to score is an error, not an empty result
        raise DataError(f"{path}: no data lines")
    return RawSamples(
        user,
        item,
        hist,
        np.array(hlen, dtype=np.int64),
        np.array(label, dtype=np.int8) if cl is not None else None,
        format="tsv",
    )


def unknown_fields(enc: EncodedSamples) -> list[str]:
    """Per row, the inputs mapped to the unknown row 0: ``"user"``, ``"item"``, ``"history:K"``, and
    for inputs that carry their categories (DIEN files) ``"cate"``, ``"hist_cate:K"``; comma-joined
    (``""`` when every id was known). History positions past the row's length are padding, not
    unknown; so are ids cut by the truncation to the last L (they are not scored)."""
    real = np.arange(enc.hist_item.shape[1])[None, :] < enc.hist_lengths[:, None]
    hist_unknown = ((enc.hist_item == 0) & real).sum(1).tolist()
    n = len(enc)
    # categories are inputs only when the file gave them; from item2cate an unknown item's 0 is
    # already told by "item" / "history:K"
    own_cates = "cate" in enc.unknown
    cate_unknown = (enc.cate == 0).tolist() if own_cates else [False] * n
    hcate_unknown = ((enc.hist_cate == 0) & real).sum(1).tolist() if own_cates else [0] * n
    out = []
    for u, i, h, c, hc in zip(
        enc.uid.tolist(), enc.item.tolist(), hist_unknown, cate_unknown, hcate_unknown, strict=True
    ):
        parts = (["user"] if u == 0 else []) + (["item"] if i == 0 else []) + ([f"history:{h}"] if h else [])
        parts += (["cate"] if c else []) + ([f"hist_cate:{hc}"] if hc else [])
        out.append(",".join(parts))
    return out


def score_file(
    model_dir: str | Path,
    input_path: str | Path,
    out: str | Path,
    fmt: str = "auto",
    batch_size: int = 1024,
    int8: bool = False,
    progress: bool = True,
    mark_unknown: bool = False,
) -> dict:
    """Score ``input_path`` with the artefact in ``model_dir``; write ``out``; return a summary dict
    (rows, unknown counts, truncated histories, samples/s, AUC when labels are given).

    ``mark_unknown``: add a last column ``unknown`` naming, per row, what the vocabularies did not
    know (``user``, ``item``, ``history:K`` for K unknown history ids; DIEN files also ``cate``,
    ``hist_cate:K``; empty when all were known),
    so rows scored with the untrained unknown row can be told apart."""
    art = ServingArtifact.load(model_dir, int8=int8)
    t0 = time.perf_counter()
    raw = read_samples(input_path, fmt)
    enc = raw.encode(art)
    t1 = time.perf_counter()
    probs = art.score(enc, batch_size=batch_size, progress=show_progress(progress))
    t2 = time.perf_counter()
    out = Path(out)
    cols = [raw.user, raw.item, [f"{p:.6f}" for p in probs]]
    names = ["user_id", "item_id", "score"]
    if raw.label is not None:
        cols.append(raw.label.tolist())
        names.append("label")
    if mark_unknown:
        cols.append(unknown_fields(enc))
        names.append("unknown")
    with open_atomic(out) as f:  # written whole, then renamed: never half a file
        f.write("\t".join(names) + "\n")
        f.writelines("\t".join(map(str, row)) + "\n" for row in zip(*cols, strict=True))
    summary = {
        "rows": len(enc),
        "format": raw.format,
        "unknown_ids": enc.unknown,
        "history_ids": int(enc.hist_lengths.sum()),  # those scored: after the cut to the last L
        "histories_truncated": enc.truncated,
        "read_encode_s": t1 - t0,
        "score_s": t2 - t1,
        "samples_per_s": len(enc) / max(t2 - t1, 1e-9),
        "out": str(out),
    }
    if raw.label is not None:
        summary["auc"] = auc(raw.label, probs)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model directory (iacn export --out)")
    parser.add_argument(
        "--input",
        required=True,
        help="samples: TSV (user_id, item_id, history[, label]) or DIEN local_test rows; .gz accepted",
    )
    parser.add_argument("--out", help="scores TSV (default: INPUT.scores.tsv)")
    parser.add_argument("--format", choices=FORMATS, default="auto")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--int8", action="store_true", help="use the int8-table model (export --int8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    parser.add_argument("--mark-unknown", action="store_true",
                        help="add a column 'unknown' naming each row's ids the vocabularies did not know")


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same resolved path (through symlinks, whether
    or not it exists), or, both existing, the same file (hard links too)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    out = args.out or f"{args.input}.scores.tsv"
    if args.batch_size < 1:
        print(f"iacn score: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    # before reading anything: scores written over their own input would lose it
    if _same_file(out, args.input):
        print(f"iacn score: --out {out} is the --input file; choose another path", file=sys.stderr)
        return 2
    if args.out or Path(args.input).exists():  # a missing input is reported as such, not its default --out
        check_output_path(out, "--out")
    try:
        s = score_file(
            args.model,
            args.input,
            out,
            fmt=args.format,
            batch_size=args.batch_size,
            mark_unknown=args.mark_unknown,
            int8=args.int8,
            progress=args.progress,
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"iacn score: {e}", file=sys.stderr)
        return 2
    unk = ", ".join(f"{k} {v}" for k, v in s["unknown_ids"].items())
    print(
        f"scored {s['rows']:,} {s['format']} rows -> {s['out']} "
        f"({s['samples_per_s']:,.0f} samples/s; read+encode {s['read_encode_s']:.2f}s)"
    )
    print(
        f"  unknown ids mapped to the unknown row 0: {unk} (of {s['rows']:,} rows and "
        f"{s['history_ids']:,} history ids kept); histories cut to the last L: {s['histories_truncated']}"
    )
    if "auc" in s:
        auc_text = f"{s['auc']:.4f}" if s["auc"] == s["auc"] else "n/a (the labels are all one class)"
        print(f"  AUC {auc_text}")
    rows = max(s["rows"], 1)
    worst = max(s["unknown_ids"].get(k, 0) for k in ("uid", "item"))
    if worst > rows / 2:
        print(f"warning: {worst:,} of {s['rows']:,} rows have user or item ids this model has never seen: "
              "is the input from the dataset the model was trained on?", file=sys.stderr)
    return 0
