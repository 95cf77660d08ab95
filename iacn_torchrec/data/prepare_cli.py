"""Build a prepared dataset (columnar arrays, vocabularies, meta.json) from raw interaction files.

Examples::

    iacn prepare --source tsv --interactions data/amazon-beauty/interactions.tsv.gz \\
        --items data/amazon-beauty/items.tsv.gz --protocol din --max-len 20 --seed 0 --out prepared/beauty
    iacn prepare --source amazon-json --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz --out DIR
    iacn prepare --source dien --path DIEN_DATA_DIR --out DIR
    iacn prepare --source movielens --path ml-100k/ --protocol dien --out DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iacn_torchrec.data.prepare import PROTOCOLS, SOURCES, prepare_dataset
from iacn_torchrec.data.sources import DataError
from iacn_torchrec.data.store import read_meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n", 2)[2]
    parser.add_argument("--source", choices=SOURCES, default="tsv", help="raw format (default: tsv)")
    parser.add_argument(
        "--interactions", type=Path, help="tsv: interactions.tsv[.gz] (user_id, item_id, timestamp)"
    )
    parser.add_argument("--items", type=Path, help="tsv: items.tsv[.gz] (item_id, category column)")
    parser.add_argument("--reviews", type=Path, help="amazon-json: reviews_<Cat>_5.json[.gz]")
    parser.add_argument("--meta", type=Path, help="amazon-json: meta_<Cat>.json[.gz]")
    parser.add_argument("--path", type=Path, help="dien / movielens: directory holding the files")
    parser.add_argument(
        "--category-column",
        default=None,
        help="tsv: category column of items.tsv "
        "(default: cate_leaf); movielens: genre column of the .item file (default: class)",
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="din", help="sample protocol (default: din)")
    parser.add_argument("--max-len", type=int, default=20, help="history length kept (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace an existing prepared directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def summary(out: Path, seconds: float) -> str:
    """The one-screen summary of a prepared directory."""
    m = read_meta(out)
    c = m["counts"]
    lines = [
        f"prepared {out}  ({m['source']['type']} -> protocol {m['protocol']}, max_len {m['max_len']}, "
        f"seed {m['seed']}) in {seconds:.2f} s",
        f"  users {c['users']:,}  items {c['items']:,}  categories {c['categories']:,}"
        + (f"  interactions {c['interactions']:,}" if "interactions" in c else ""),
    ]
    for s in ("train", "test"):
        if f"{s}_samples" in c:
            lines.append(f"  {s:5s} {c[f'{s}_samples']:>12,} samples  {c[f'{s}_positives']:>12,} positive")
    for kind in ("skipped", "repaired"):
        entries = m.get(kind) or {}
        lines.append(f"  {kind}: " + ("none" if not entries else ""))
        for key, e in entries.items():
            lines.append(f"    {e['count']:>10,}  {key}: {e['reason']}")
    lines.append(f"  content {m['content_hash']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        out = prepare_dataset(
            args.source,
            interactions=args.interactions,
            items=args.items,
            reviews=args.reviews,
            meta=args.meta,
            path=args.path,
            category_column=args.category_column,
            protocol=args.protocol,
            max_len=args.max_len,
            seed=args.seed,
            out=args.out,
            overwrite=args.force,
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"iacn prepare: error: {e}", file=sys.stderr)
        return 2
    print(summary(out, time.perf_counter() - t0))
    return 0
