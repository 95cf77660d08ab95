"""The floor under what IaCN's width costs a main-model step (docs/results/performance.md, "A floor
under the width's cost").

IaCN gives the main model ``E_orig ⊕ E_aux``: every item-side feature is read ``emb_dim + aux_dim``
wide instead of ``emb_dim``. Whatever the implementation, a training step then has to do the wider
layers' extra matrix products and update the aux tables. This script times exactly that work alone,
with nothing else in the process: each layer's forward, input gradient and weight gradient
(ATen/MKL, one thread) at the plain and at the paper width, and ``torch.optim.Adam(fused=True)``
over the aux tables. It is a lower bound, because inside a step the same work also pays for Python,
lookups and cold caches.

Shapes come from the library's defaults (``ModelConfig``, ``DINConfig``, ``DIENConfig``,
``IaCNConfig``) and from the prepared dataset: ``N = batch × the train split's mean history length``
behaviours, ``2·(N - batch)`` rows for DIEN's auxiliary loss (a positive and a negative per
transition). Prints a table; ``--json`` adds one JSON line, ``--out`` writes that JSON to a file.
Timings are best of ``--repeats`` blocks of ``--calls`` calls.

    python apps/width_floor.py --data prepared/amazon-beauty-din-L20-s0 [--batch-size 128] [--json]
        [--out docs/results/width-floor.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from iacn_torchrec import versions
from iacn_torchrec.data.loader import PreparedDataset
from iacn_torchrec.errors import UserError
from iacn_torchrec.fileio import check_output_path, write_atomic
from iacn_torchrec.models.dien import DIENConfig
from iacn_torchrec.models.din import DINConfig
from iacn_torchrec.modules.iacn import IaCNConfig
from iacn_torchrec.train.config import ModelConfig


def best_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """The fastest of ``repeats`` blocks of ``calls`` calls, in µs per call (after a warm-up)."""
    for _ in range(max(1, calls // 10)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def linear_us(rows: int, fan_in: int, fan_out: int, calls: int, repeats: int, seed: int) -> float:
    """One linear layer's training work, ``[rows, fan_in] × [fan_in, fan_out]``: the forward
    (``addmm``), the input gradient and the weight gradient, µs."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g)
    b, dy = torch.randn(fan_out, generator=g), torch.randn(rows, fan_out, generator=g)
    return (best_us(lambda: torch.addmm(b, x, w.t()), calls, repeats)
            + best_us(lambda: torch.mm(dy, w), calls, repeats)
            + best_us(lambda: torch.mm(dy.t(), x), calls, repeats))


def adam_us(shapes: list[tuple[int, int]], calls: int, repeats: int, seed: int) -> float:
    """One fused dense Adam step over tables of ``shapes`` with dense gradients, µs."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    return best_us(opt.step, calls, repeats)


def width_work(num_items: int, num_cates: int, batch: int, behaviours: int) -> dict:
    """What the paper width adds to a step, as shapes (the library's defaults): ``layers``, a list of
    ``(name, models, rows, fan_in plain, fan_in wide, fan_out)`` (one linear layer's training work
    each), and ``aux_tables``, the aux tables' ``(rows, dim)`` that dense Adam updates every step."""
    model, din, dien, iacn = ModelConfig(), DINConfig(), DIENConfig(), IaCNConfig()
    # item-side width: item ⊕ category, each emb_dim wide (plain) or emb_dim + aux_dim (IaCN)
    plain, wide = 2 * model.emb_dim, 2 * (model.emb_dim + iacn.aux_dim)
    H = model.dien_hidden or plain  # DIEN's hidden size stays the plain item width
    B, N, u = batch, behaviours, model.user_dim
    layers = [
        ("DIN tower, first layer", ("din",), B, u + 4 * plain, u + 4 * wide, din.tower_hidden[0]),
        # the attention's first layer on [q, k, q-k, q·k], its behaviour part at the least: one
        # [N, D] × [D, H1] product per pass, as with a per-row matrix M_b = (W_k - W_d)ᵀ + diag(q_b) W_pᵀ
        # (the evaluation path's form; the training kernel does two, for k and for q·k)
        ("DIN attention, first layer (behaviour part)", ("din",), N, plain, wide, din.att_hidden[0]),
        ("DIEN tower, first layer", ("dien",), B, u + 3 * plain + H, u + 3 * wide + H, dien.tower_hidden[0]),
        ("DIEN GRU input projection", ("dien",), N, plain, wide, 3 * H),
        # a positive and a negative next item per transition: 2·(N - B) rows
        ("DIEN auxiliary loss, first layer", ("dien",), 2 * (N - B), H + plain, H + wide, dien.aux_hidden[0]),
    ]
    return {"layers": layers, "aux_tables": [(num_items + 1, iacn.aux_dim), (num_cates + 1, iacn.aux_dim)]}


def measure(args: argparse.Namespace) -> dict:
    ds = PreparedDataset.open(args.data)
    offsets = ds.split("train").hist_offsets
    mean_len = float(offsets[-1] - offsets[0]) / (len(offsets) - 1)
    B = args.batch_size
    N = max(B, round(B * mean_len))
    work = width_work(ds.num_items, ds.num_cates, B, N)
    rows = []
    for i, (name, models, r, f0, f1, out) in enumerate(work["layers"]):
        a = linear_us(r, f0, out, args.calls, args.repeats, args.seed + i)
        b = linear_us(r, f1, out, args.calls, args.repeats, args.seed + i)
        rows.append({"work": name, "models": list(models), "shape": f"[{r}, {f0} -> {f1}] x {out}",
                     "plain_us": a, "wide_us": b, "extra_us": b - a})
    adam = adam_us(work["aux_tables"], max(1, args.calls // 3), args.repeats, args.seed)
    rows.append({"work": "dense Adam over the aux tables", "models": ["din", "dien"],
                 "shape": " + ".join(f"[{n}, {d}]" for n, d in work["aux_tables"]), "plain_us": 0.0,
                 "wide_us": adam, "extra_us": adam})
    floor = {m: sum(r["extra_us"] for r in rows if m in r["models"]) / 1e3 for m in ("din", "dien")}
    return {"data": args.data, "batch_size": B, "behaviours": N, "mean_history_length": mean_len,
            "threads": torch.get_num_threads(), "rows": rows, "floor_ms": floor,
            "calls": args.calls, "repeats": args.repeats, "seed": args.seed, "versions": versions()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory (`iacn prepare --out`)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as `iacn bench train`)")
    p.add_argument("--calls", type=int, default=300, help="calls per timed block")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks; the fastest counts")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", action="store_true", help="print one JSON line after the table")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.calls <= 0 or args.repeats <= 0 or args.threads <= 0:
        p.error("--batch-size, --calls, --repeats and --threads must be positive")
    if args.out:
        try:  # before the measuring, which a bad path would otherwise waste
            check_output_path(args.out, "--out")
        except UserError as e:
            p.error(str(e))
    torch.set_num_threads(args.threads)
    try:
        res = measure(args)
    except UserError as e:  # a missing or malformed dataset: one line, as the `iacn` CLI reports it
        p.error(str(e))
    print(f"{res['behaviours']} behaviours at batch {res['batch_size']} "
          f"(mean history {res['mean_history_length']:.2f}), {res['threads']} thread(s), best of "
          f"{args.repeats} × {args.calls} calls")
    print("| extra work | shape | plain µs | paper width µs | extra µs |\n|---|---|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['work']} | {r['shape']} | {r['plain_us']:.0f} | {r['wide_us']:.0f} "
              f"| {r['extra_us']:+.0f} |")
    print(f"floor: DIN ≥ {res['floor_ms']['din']:.2f} ms, DIEN ≥ {res['floor_ms']['dien']:.2f} ms a step "
          "(divide by a plain step for the least width overhead)")
    if args.json:
        print(json.dumps(res))
    if args.out:
        write_atomic(args.out, json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
