"""``prepare_dataset``: raw files -> a prepared dataset directory (library entry of ``iacn prepare``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from iacn_torchrec.data import protocols, sources, store
from iacn_torchrec.data.sources import DataError
from iacn_torchrec.runtime import show_progress

__all__ = ["prepare_dataset", "SOURCES", "PROTOCOLS", "DataError"]

SOURCES = ("tsv", "amazon-json", "dien", "movielens")
#: the inputs each source reads (prepare_dataset's arguments, ``iacn prepare``'s flags)
_SOURCE_INPUTS = {"tsv": ("interactions", "items", "category_column"), "amazon-json": ("reviews", "meta"),
                  "dien": ("path",), "movielens": ("path", "category_column")}
PROTOCOLS = ("din", "dien")


def _need(source: str, **given) -> None:
    missing = [k for k, v in given.items() if v is None]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise DataError(f"source {source!r} needs {flags} ({', '.join(missing)}=...)")


def prepare_dataset(
    source: str,
    *,
    interactions: str | Path | None = None,
    items: str | Path | None = None,
    reviews: str | Path | None = None,
    meta: str | Path | None = None,
    path: str | Path | None = None,
    category_column: str | None = None,
    protocol: str = "din",
    max_len: int = 20,
    seed: int = 0,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Read ``source``, build samples under ``protocol`` and write them to ``out`` atomically.

    Args:
        source: ``tsv`` (``interactions`` + ``items``), ``amazon-json`` (``reviews`` + ``meta``),
            ``dien`` (``path``: DIEN's files; with ``local_*`` files the split and negatives are
            theirs and ``protocol`` is recorded as ``dien-files``) or ``movielens`` (``path``:
            RecBole ``.inter``/``.item``).
        category_column: the item-table column used as category: ``tsv`` (default ``cate_leaf``)
            and ``movielens`` (default ``class``); the column used is recorded in ``meta.json``.
        protocol: ``din`` or ``dien`` (see :mod:`iacn_torchrec.data.protocols`).
        max_len: histories keep the last ``max_len`` items (1 to ``store.MAX_LEN_LIMIT`` = 10,000).
        seed: seeds every random draw (target negatives, DIEN negative behaviours, dien split).
        out: the dataset directory; an existing prepared one is replaced only with ``overwrite``.
        progress: show a tqdm bar over the stages (on a terminal only).

    Returns:
        ``out`` as an absolute path. Raises :class:`DataError` on bad input.
    """
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; expected one of {SOURCES}")
    given = dict(interactions=interactions, items=items, reviews=reviews, meta=meta, path=path,
                 category_column=category_column)
    unused = [k for k, v in given.items() if v is not None and k not in _SOURCE_INPUTS[source]]
    if unused:  # silently ignored, a mistyped source would prepare other files than the user meant
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise DataError(f"source {source!r} does not read {flags}: it reads "
                        f"{', '.join('--' + k.replace('_', '-') for k in _SOURCE_INPUTS[source])}")
    for name, v in (("max_len", max_len), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise DataError(f"{name} must be an integer, got {v!r}")
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if int(max_len) < 1:
        raise DataError(f"max_len must be >= 1, got {max_len}")
    if int(max_len) > store.MAX_LEN_LIMIT:  # training would size buffers and every batch by it
        raise DataError(f"max_len must be <= {store.MAX_LEN_LIMIT:,} (training pads every batch's histories "
                        f"to it and sizes buffers by it), got {max_len}")
    if int(seed) < 0:
        raise DataError(f"seed must be >= 0 (numpy's generators refuse negative seeds), got {seed}")
    store.check_target(out, overwrite)  # fail before doing any work
    stages = ["read", "build", "write"]
    bar = None
    if show_progress(progress):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(stages), desc=f"prepare {source}", unit="stage", leave=False)
        bar.set_postfix_str("read")

    def step(done: str, upcoming: str = "") -> None:
        if bar is not None:
            bar.set_postfix_str(upcoming or "done")
            bar.update(1)

    try:
        if source == "tsv":
            _need(source, interactions=interactions, items=items)
            category_column = category_column or "cate_leaf"
            raw = sources.read_tsv(interactions, items, category_column)
        elif source == "amazon-json":
            _need(source, reviews=reviews, meta=meta)
            raw = sources.read_amazon_json(reviews, meta)
        elif source == "dien":
            _need(source, path=path)
            raw = sources.read_dien(path, max_len)
        else:
            _need(source, path=path)
            category_column = category_column or "class"
            raw = sources.read_movielens(path, category_column)
        step("read", "build")
        if isinstance(raw, sources.PrebuiltSamples):
            # DIEN's local_* files are samples already: their split and negatives are kept
            from tqdm import tqdm as _tqdm  # its write keeps a live bar intact

            _tqdm.write(f"note: {path} holds DIEN's prebuilt samples (local_* files): they are used as they "
                       f"are (protocol dien-files; --protocol does not apply), --max-len only truncates "
                       "their histories", file=sys.stderr)
            built = protocols.build_prebuilt(raw, seed)
        else:
            ix = protocols.index_interactions(raw)
            build = protocols.build_din if protocol == "din" else protocols.build_dien
            built = build(ix, max_len=int(max_len), seed=int(seed))
        step("build", "write")
        src = {"type": source, "files": raw.files}
        if source in ("tsv", "movielens"):
            src["category_column"] = category_column
        meta_out = {
            "source": src,
            "protocol_requested": protocol,
            "max_len": int(max_len),
            "seed": int(seed),
            "min_len": protocols.MIN_LEN,
            "random_streams": {
                "target_negatives": "default_rng(seed)",
                "neg_hist": "default_rng([seed, 1])",
                "dien_user_split": "default_rng([seed, 2])",
            },
        }
        result = store.write_dataset(built, out, meta_out, overwrite=overwrite)
        step("write")
    finally:
        if bar is not None:
            bar.close()
    return result
