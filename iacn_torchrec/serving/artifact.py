"""An exported model directory: loading it and building its inputs from raw ids.

Imports torch and numpy only — no torchrec, no fbgemm, no training code — so a serving process
needs nothing of the training stack (``tests/test_serving.py`` checks ``sys.modules``).

Layout (written by :mod:`iacn_torchrec.serving.export`)::

    MODEL_DIR/
      manifest.json        format, model, dims, data protocol, versions, checks, file hashes
      model.pt             TorchScript: forward(uid [B], item [B], cate [B], hist_item [B, L],
                           hist_cate [B, L], hist_lengths [B]) -> click probability [B]
      model_int8.pt        (optional) the same graph with int8 row-wise quantised tables
      item2cate.npy        int64 [num_items + 1]
      vocab/uid.tsv vocab/item.tsv vocab/cate.tsv     raw id <TAB> index (0 = padding/unknown)

All ids are the prepared dataset's indices; an id the vocabulary does not know maps to 0, the
padding/unknown row (counted by :meth:`ServingArtifact.encode`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INPUT_NAMES",
    "ServingArtifact",
    "EncodedSamples",
    "pad_last",
    "read_vocab",
    "file_sha256",
    "auc",
]

FORMAT = "iacn-serving"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INPUT_NAMES = ("uid", "item", "cate", "hist_item", "hist_cate", "hist_lengths")
# read by every load besides the model itself: each must be listed in the manifest with its sha256
# (a file the manifest does not list could be swapped unnoticed)
DATA_FILES = ("item2cate.npy", "vocab/uid.tsv", "vocab/item.tsv", "vocab/cate.tsv")
# vocabulary -> the model's table its indices address
VOCAB_TABLES = {"uid": "user", "item": "item", "cate": "cate"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_vocab(path: str | Path) -> dict[str, int]:
    """``raw id <TAB> index`` lines → ``{raw id: index}``; a bad line or a raw id listed twice (the
    dict would keep one of them silently) raises naming file and line."""
    out: dict[str, int] = {}
    first: dict[str, int] = {}
    p = Path(path)
    # bytes split on "\n" only, as the writer: splitlines would also split on "\r", "\x1c", "\u2028" ...
    for n, line in enumerate(p.read_bytes().decode("utf-8").split("\n"), start=1):
        if not line:
            continue
        raw, sep, idx = line.rpartition("\t")
        if not sep or not idx.isdigit():
            raise ValueError(f"{p}: line {n}: expected 'raw id<TAB>index', got {line[:80]!r}")
        if raw in out:
            raise ValueError(f"{p}: line {n}: raw id {raw[:80]!r} is listed again (first on line "
                             f"{first[raw]})")
        out[raw] = int(idx)
        first[raw] = n
    return out


def pad_last(values: np.ndarray, lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Jagged rows → ``[B, max_len]`` left-aligned, zero-padded, keeping each row's *last* max_len
    values (the loader's truncation: the most recent behaviours).

    Args:
        values: ``[sum(lengths)]`` concatenated rows (oldest first).
        lengths: ``[B]`` row lengths.
    Returns:
        (padded ``[B, max_len]`` int64, kept lengths ``[B]`` int64 = ``min(lengths, max_len)``).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    ends = np.cumsum(lengths)
    kept = np.minimum(lengths, max_len)
    pos = np.arange(max_len, dtype=np.int64)
    mask = pos[None, :] < kept[:, None]
    if values.size == 0:
        return np.zeros((len(lengths), max_len), dtype=np.int64), kept
    idx = np.minimum((ends - kept)[:, None] + pos[None, :], values.size - 1)
    return np.where(mask, values[idx], 0), kept


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (ties get their mean rank); NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # mean rank within runs of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], s.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_rank, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _model_shapes(model: torch.jit.ScriptModule) -> tuple[dict[str, int], int]:
    """The exported model's own shapes: rows of its ``user``/``item``/``cate`` tables (float or int8)
    and its L (the ``positions`` buffer)."""
    sd = model.state_dict()
    rows = {}
    for t in ("user", "item", "cate"):
        # float, 8-bit packed, or the int8 buffer of artefacts exported before session 20
        names = [f"{t}_table.{k}" for k in ("weight", "weight_packed", "weight_q")]
        w = next((sd[n] for n in names if n in sd), None)
        if w is None or "positions" not in sd:
            raise ValueError(f"not an exported model: no {t}_table / positions in its state dict")
        rows[t] = int(w.shape[0])
    return rows, int(sd["positions"].numel())


@dataclass
class EncodedSamples:
    """Samples as the artefact's inputs (numpy int64): ``uid/item/cate [N]``, ``hist_item/hist_cate
    [N, L]``, ``hist_lengths [N]``; ``unknown``: counts of raw ids mapped to 0 by kind;
    ``truncated``: rows whose history was cut to the last L items."""

    uid: np.ndarray
    item: np.ndarray
    cate: np.ndarray
    hist_item: np.ndarray
    hist_cate: np.ndarray
    hist_lengths: np.ndarray
    unknown: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    def __len__(self) -> int:
        return int(self.uid.shape[0])

    def tensors(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, ...]:
        """The model inputs of rows ``[start, stop)`` in :data:`INPUT_NAMES` order (zero-copy)."""
        sl = slice(start, stop)
        return tuple(torch.from_numpy(np.ascontiguousarray(getattr(self, k)[sl])) for k in INPUT_NAMES)


class ServingArtifact:
    """A loaded model directory.

    Attributes:
        manifest: the parsed ``manifest.json``. model: the TorchScript module (eval mode).
        max_len: L. item2cate: ``[num_items + 1]`` int64.

    Example::

        art = ServingArtifact.load("models/din")
        enc = art.encode(user_ids, item_ids, histories)          # raw ids
        probs = art.score(enc, batch_size=1024)                  # numpy float32 [N]
    """

    def __init__(
        self, path: Path, manifest: dict, model: torch.jit.ScriptModule, item2cate: np.ndarray
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.model = model
        self.item2cate = item2cate
        self.max_len = int(manifest["dims"]["max_len"])
        self.table_rows, self.model_max_len = _model_shapes(model)
        self._vocab: dict[str, dict[str, int]] = {}

    @classmethod
    def load(cls, path: str | Path, int8: bool = False, verify: bool = True) -> ServingArtifact:
        """Load ``path`` (``int8``: the quantised-table model); ``verify`` checks the files' sha256.

        Every file read (the model, ``item2cate.npy``, the vocabularies) must be listed in the
        manifest; the manifest's ``dims.max_len`` and ``item2cate`` must fit the model's own shapes.
        Each vocabulary must fill its table: one entry per row but the padding/unknown row 0, indices
        ``1..rows - 1`` each once (a truncated one would map most ids to unknown).
        A bad artefact raises ``ValueError`` / ``FileNotFoundError`` naming the file."""
        d = Path(path)
        mpath = d / MANIFEST
        if not mpath.is_file():
            # replace_dir renames an existing model aside before it moves the new one in
            aside = sorted(d.parent.glob(f".{d.name}.old-*")) if not d.exists() else []
            if aside:
                raise FileNotFoundError(f"{d}: missing; an interrupted `iacn export --force` left the model "
                                        f"it was replacing in {aside[-1]}: rename that back, or export again")
            raise FileNotFoundError(f"{d}: no {MANIFEST}: not an exported model (run `iacn export`)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{mpath}: expected a JSON object, got a {type(manifest).__name__}")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{mpath}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
                f"this code reads {FORMAT!r} v{FORMAT_VERSION}"
            )
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise ValueError(f"{mpath}: field 'files' is missing or not an object of path: sha256")
        dims = manifest.get("dims")
        max_len = dims.get("max_len") if isinstance(dims, dict) else None
        if type(max_len) is not int or max_len < 1:  # type(): a JSON true is no length
            raise ValueError(
                f"{mpath}: field 'dims.max_len' is missing or not a positive integer ({max_len!r})"
            )
        name = "model_int8.pt" if int8 else "model.pt"
        if int8 and name not in files:
            raise FileNotFoundError(f"{d}: no {name} (export with --int8 for quantised tables)")
        for rel in (name, *DATA_FILES):
            if rel not in files:
                raise ValueError(f"{d / rel}: not listed in {MANIFEST}'s files, so it cannot be verified")
        if verify:
            for rel, digest in files.items():
                if not (d / rel).is_file():
                    raise FileNotFoundError(f"{d / rel}: missing (listed in {MANIFEST})")
                if file_sha256(d / rel) != digest:
                    raise ValueError(f"{d / rel}: corrupted (sha256 differs from {MANIFEST})")
        try:
            model = torch.jit.load(str(d / name), map_location="cpu").eval()
        except RuntimeError as e:  # TorchScript's messages span many lines: keep the first
            first = next(iter(str(e).strip().splitlines()), type(e).__name__)
            raise ValueError(f"{d / name}: not a TorchScript model ({first})") from None
        ipath = d / "item2cate.npy"
        try:
            item2cate = np.load(ipath, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{ipath}: not a .npy array ({e})") from None
        try:
            art = cls(d, manifest, model, item2cate)
        except ValueError as e:  # a TorchScript model, but not one `iacn export` wrote
            raise ValueError(f"{d / name}: {e}") from None
        if art.max_len != art.model_max_len:  # the inputs are padded to max_len: the model's L must match
            raise ValueError(
                f"{mpath}: dims.max_len is {art.max_len} but {name} was traced for L = {art.model_max_len}"
            )
        rows = art.table_rows
        if item2cate.ndim != 1 or item2cate.dtype != np.int64 or item2cate.size != rows["item"]:
            raise ValueError(
                f"{ipath}: {item2cate.dtype} {list(item2cate.shape)}, but {name}'s item table has "
                f"{rows['item']} rows: expected int64 [{rows['item']}] (num_items + 1)"
            )
        if item2cate.size and not (0 <= item2cate.min() and item2cate.max() < rows["cate"]):
            raise ValueError(
                f"{ipath}: categories {int(item2cate.min())}..{int(item2cate.max())} outside {name}'s "
                f"category table (rows 0..{rows['cate'] - 1})"
            )
        for kind in VOCAB_TABLES:  # read now, checked against the tables: a damaged one fails here
            art.vocab(kind)
        return art

    def vocab(self, kind: str) -> dict[str, int]:
        """``{raw id: index}`` of ``uid`` / ``item`` / ``cate`` (read once, by :meth:`load`; an index past
        the model's table, or a vocabulary not filling it, raises naming the file)."""
        if kind not in self._vocab:
            vpath = self.path / "vocab" / f"{kind}.tsv"
            voc = read_vocab(vpath)
            rows = self.table_rows[VOCAB_TABLES[kind]]
            top = max(voc.values(), default=0)
            if top >= rows:
                raise ValueError(f"{vpath}: index {top} past the model's {kind} table ({rows} rows)")
            # the export copies the prepared vocabulary: ids 1..n for table rows 1..n, row 0 unknown
            if len(voc) != rows - 1:
                raise ValueError(f"{vpath}: {len(voc)} entries, but the model's {kind} table has {rows} rows "
                                 f"(expected {rows - 1} entries: one per row but the padding/unknown row 0); "
                                 "the vocabulary is damaged or belongs to another model")
            if min(voc.values(), default=1) < 1 or len(set(voc.values())) != len(voc):
                raise ValueError(f"{vpath}: the indices are not 1..{rows - 1} each once (one is 0 or "
                                 "repeated); the vocabulary is damaged")
            self._vocab[kind] = voc
        return self._vocab[kind]

    def lookup(self, kind: str, raw: list[str] | np.ndarray) -> tuple[np.ndarray, int]:
        """Raw ids → indices (unknown → 0); returns (ids int64, number of unknown ids)."""
        voc = self.vocab(kind)
        ids = np.fromiter((voc.get(r, 0) for r in raw), dtype=np.int64, count=len(raw))
        return ids, int((ids == 0).sum())

    def encode(
        self,
        user: list[str],
        item: list[str],
        hist_item: list[str],
        hist_len: np.ndarray,
        cate: list[str] | None = None,
        hist_cate: list[str] | None = None,
    ) -> EncodedSamples:
        """Raw samples → :class:`EncodedSamples`.

        Args:
            user, item: raw ids ``[N]``. hist_item: raw history ids, concatenated ``[sum(hist_len)]``
                (oldest first); hist_len: ``[N]``.
            cate, hist_cate: raw categories (DIEN files carry them); None ⇒ from the artefact's
                ``item2cate`` (an unknown item gets category 0).
        """
        hist_len = np.asarray(hist_len, dtype=np.int64)
        if len(user) != len(item) or len(user) != hist_len.size or int(hist_len.sum()) != len(hist_item):
            raise ValueError(
                f"encode: {len(user)} users, {len(item)} items, {hist_len.size} history lengths "
                f"summing to {int(hist_len.sum())} but {len(hist_item)} history ids"
            )
        unknown: dict[str, int] = {}
        uid, unknown["uid"] = self.lookup("uid", user)
        item_ids, unknown["item"] = self.lookup("item", item)
        hist_ids, unknown["hist_item"] = self.lookup("item", hist_item)
        if cate is None:
            cate_ids = self.item2cate[item_ids]
        else:
            cate_ids, unknown["cate"] = self.lookup("cate", cate)
        if hist_cate is None:
            hist_cate_ids = self.item2cate[hist_ids]
        else:
            hist_cate_ids, unknown["hist_cate"] = self.lookup("cate", hist_cate)
        hi, kept = pad_last(hist_ids, hist_len, self.max_len)
        hc, _ = pad_last(hist_cate_ids, hist_len, self.max_len)
        # history ids cut by the last-L truncation are not scored: count only the kept ones
        real = np.arange(self.max_len)[None, :] < kept[:, None]
        unknown["hist_item"] = int(((hi == 0) & real).sum())
        if hist_cate is not None:
            unknown["hist_cate"] = int(((hc == 0) & real).sum())
        return EncodedSamples(
            uid, item_ids, cate_ids, hi, hc, kept, unknown, truncated=int((hist_len > self.max_len).sum())
        )

    @torch.inference_mode()
    def score(self, samples: EncodedSamples, batch_size: int = 1024, progress: bool = False) -> np.ndarray:
        """Click probabilities ``[N]`` float32, in batches of ``batch_size`` (tqdm bar if ``progress``)."""
        n = len(samples)
        out = np.empty(n, dtype=np.float32)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="sample", desc="score", dynamic_ncols=True)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            out[start:stop] = self.model(*samples.tensors(start, stop)).numpy()
            if bar is not None:
                bar.update(stop - start)
        if bar is not None:
            bar.close()
        return out
