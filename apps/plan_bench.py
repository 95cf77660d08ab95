"""Sharding-planner benchmark: what IaCN's aux tables cost at scale (``make plan-bench``).

Plans every scenario in ``apps/scenarios/`` with and without the aux tables on simulated GPU
clusters (TorchRec's ``EmbeddingShardingPlanner``), times the planner (with a full-search
reference at 1024 ranks for the restricted sharding types), checks the estimates against real CPU
ranks (gloo, 1 and 2 ranks), and writes ``docs/results/planner.json``, ``planner_memory.png``,
``planner_step.png`` and the generated part of ``docs/results/planner.md`` (between the GENERATED
markers; the hand-written reading around them is kept).

    python apps/plan_bench.py [--scenarios apps/scenarios/*.yaml] [--out docs/results] [--no-measure]

A partial run (``--scenarios``, ``--no-measure`` or ``--no-reference``) needs an explicit ``--out``:
it would otherwise replace the repository's generated section with a subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from iacn_torchrec import versions
from iacn_torchrec.distributed.plan_cli import (
    load_scenario,
    markdown_table,
    plan_cell,
    plot_rows,
    quiet_torchrec,
    rows_to_json,
    run_scenario,
)
from iacn_torchrec.distributed.plan_specs import ModelSpec, PlanOptions, TopologySpec, fmt_bytes
from iacn_torchrec.distributed.planning import measure_sharded_embeddings, plan_with_fallback
from iacn_torchrec.errors import UserError
from iacn_torchrec.fileio import check_output_path, write_atomic

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- BEGIN GENERATED (apps/plan_bench.py) -->", "<!-- END GENERATED -->"
ORDER = ["amazon_electronics", "amazon_books", "industrial_10m", "industrial_100m", "industrial_1b"]

# The measured check: tables big enough that their bytes dominate RSS noise, small enough for 2 ranks here.
MEASURE_SPEC = ModelSpec(
    "cpu-check",
    num_users=200_000,
    num_items=1_000_000,
    num_cates=1000,
    orig_dim=32,
    aux_dim=32,
    user_dim=32,
    hist_len=20,
)
MEASURE_OPTIONS = PlanOptions(batch_size=256, optimizer="rowwise_adagrad")


def log(msg: str) -> None:
    print(msg, flush=True)


def planner_time_reference(scn, world: int = 1024) -> dict:
    """The IaCN plan at ``world`` ranks with the default (restricted) vs all sharding types."""
    topo = TopologySpec.from_dict({**scn.topology, "world_size": world})
    spec = scn.model.with_aux_dim(scn.aux_dims[0])
    out = {"scenario": scn.name, "world_size": world, "aux_dim": spec.aux_dim}
    for name, opts in (
        ("restricted", scn.options),
        (
            "all types",
            dataclasses.replace(
                scn.options, sharding_types=("data_parallel", "table_wise", "row_wise", "column_wise")
            ),
        ),
    ):
        r = plan_with_fallback(spec, topo, opts, with_iacn=True)
        out[name] = {
            "seconds": r.planner_seconds,
            "proposals": r.num_proposals,
            "plan": plan_cell(r),
            "step_estimate_ms": r.step_estimate_ms,
            "max_rank_hbm": r.max_rank_hbm,
        }
        log(f"  reference {name}: {r.planner_seconds:.1f}s, {r.num_proposals} proposals, {plan_cell(r)}")
    return out


#: untimed steps before the measured check's timed ones
MEASURE_WARMUP = 3


def measured_check(steps: int, seed: int) -> list[dict]:
    rows = []
    for world in (1, 2):
        for with_iacn in (False, True):
            t0 = time.perf_counter()
            ranks = measure_sharded_embeddings(
                MEASURE_SPEC, with_iacn, world, MEASURE_OPTIONS, steps=steps, warmup=MEASURE_WARMUP, seed=seed
            )
            plan = ranks[0].pop("plan")
            rows.append(
                {
                    "world_size": world,
                    "with_iacn": with_iacn,
                    "plan": {
                        t["name"]: f"{t['sharding_type']}/{t['compute_kernel']}" for t in plan["tables"]
                    },
                    "ranks": ranks,
                }
            )
            log(f"  measured W={world} iacn={with_iacn}: {time.perf_counter() - t0:.1f}s")
    return rows


def measured_markdown(rows: list[dict]) -> str:
    s = (
        "| ranks | variant | plan | rank | planned state (weights+opt) | measured weights + opt state "
        "| planned DDR (state + I/O) | RSS growth: sharding / after steps | planner step est. ms "
        "| measured fwd+bwd ms (median) |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    for row in rows:
        plan = ", ".join(f"{k} {v}" for k, v in row["plan"].items())
        for r in row["ranks"]:
            meas = r["measured_weight_bytes"] + r["measured_optimizer_bytes"]
            ok = "=" if meas == r["planned_state_bytes"] else "≠"
            s += (
                f"| {row['world_size']} | {'IaCN' if row['with_iacn'] else 'baseline'} | {plan} "
                f"| {r['rank']} "
                f"| {fmt_bytes(r['planned_state_bytes'])} | {fmt_bytes(meas)} ({ok}) "
                f"| {fmt_bytes(r['planned_ddr_bytes'])} "
                f"| {fmt_bytes(r['rss_delta_shard_bytes'])} / {fmt_bytes(r['rss_delta_total_bytes'])} "
                f"| {r['planned_perf_ms']:.3f} | {r['step_ms_median']:.1f} |\n"
            )
    return s


def headline(all_rows: list[dict]) -> str:
    """Per scenario, world size and aux dim: what the aux tables add per rank, to the job and to the step."""
    s = (
        "| scenario | ranks | aux dim | Δ max-rank HBM | Δ aux state (whole job) "
        "| step est. baseline → IaCN ms |\n"
        "|---|---:|---:|---:|---:|---|\n"
    )
    for row in all_rows:
        if row["variant"] != "iacn" or not row.get("delta"):
            continue
        base = next(
            r
            for r in all_rows
            if r["scenario"] == row["scenario"]
            and r["world_size"] == row["world_size"]
            and r["variant"] == "baseline"
        )
        d = row["delta"]
        s += (
            f"| {row['scenario']} | {row['world_size']} | {row['aux_dim']} | {fmt_bytes(d['max_rank_hbm'])} "
            f"| {fmt_bytes(d['aux_state_bytes'])} | {base['result'].step_estimate_ms:.3g} → "
            f"{row['result'].step_estimate_ms:.3g} (×{d['step_ratio']:.2f}) |\n"
        )
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--scenarios", nargs="*", help="scenario files (default: apps/scenarios/*.yaml)")
    ap.add_argument("--out", default=None, help="output folder (default: docs/results; a partial run "
                    "(--scenarios, --no-measure, --no-reference) must name it)")
    ap.add_argument("--no-measure", action="store_true", help="skip the CPU-rank measured check")
    ap.add_argument("--no-reference", action="store_true", help="skip the full-search planner-time reference")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measured run (>= 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        msg = " ".join(line.strip() for line in msg.splitlines() if line.strip())  # one line (YAML's are not)
        print(f"{ap.prog}: error: {msg}", file=sys.stderr)
        return 2

    if args.steps < 1:
        return fail(f"--steps must be >= 1, got {args.steps}")
    partial = [o for o, on in (("--scenarios", args.scenarios), ("--no-measure", args.no_measure),
                               ("--no-reference", args.no_reference)) if on]
    args.partial = partial
    if args.out is None:
        if partial:
            return fail(f"{', '.join(partial)} would replace the generated part of docs/results/planner.md "
                        "with a partial run: pass --out DIR to write it elsewhere")
        args.out = str(REPO / "docs" / "results")
    try:
        check_output_path(args.out, "--out", directory=True, parents=True)
        files = (
            [Path(p) for p in args.scenarios]
            if args.scenarios
            else sorted(
                (REPO / "apps" / "scenarios").glob("*.yaml"),
                key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem),
            )
        )
        scenarios = [load_scenario(f) for f in files]
        if not scenarios:
            return fail("no scenario files (apps/scenarios/*.yaml is empty)")
        return run(args, files, scenarios)
    except UserError as e:  # a bad scenario file, a plan that cannot fit: one line, no traceback
        return fail(str(e))


def run(args: argparse.Namespace, files: list[Path], scenarios: list) -> int:
    quiet_torchrec()
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict] = []
    sections = []
    for scn, f in zip(scenarios, files):
        log(f"scenario {scn.name} ({f.name})")
        t0 = time.perf_counter()
        rows = run_scenario(scn, log=log)
        all_rows += rows
        topo = scn.topology
        sections.append(
            f"### {scn.name}\n\n{scn.description.strip()}\n\n"
            f"Tables: {scn.model.num_users:,} users, {scn.model.num_items:,} items, {scn.model.num_cates:,} "
            f"categories (+1 padding row each); orig dim {scn.model.orig_dim}, aux dims {scn.aux_dims}; "
            f"mean history {scn.model.hist_len:g}; batch {scn.options.batch_size}/rank; optimizer "
            f"{scn.options.optimizer}; {topo.get('hbm_gib', 80):g} GiB HBM + "
            f"{topo.get('ddr_gib', 256):g} GiB DDR "
            f"per GPU, {topo.get('local_world_size', 8)} GPUs/host. Planner time for the scenario: "
            f"{time.perf_counter() - t0:.1f} s.\n\n" + markdown_table(rows)
        )
    ref = None
    if not args.no_reference:
        log("planner-time reference (full search at 1024 ranks)")
        ref = planner_time_reference(scenarios[0])
    measured = None
    if not args.no_measure:
        log("measured check on CPU ranks")
        measured = measured_check(args.steps, args.seed)
    pngs = plot_rows(all_rows, out / "planner")
    total = time.perf_counter() - t_start

    payload = {
        "versions": versions(),
        "scenarios": [
            dataclasses.asdict(s.model)
            | {
                "aux_dims": s.aux_dims,
                "world_sizes": s.world_sizes,
                "topology": s.topology,
                "options": dataclasses.asdict(s.options),
            }
            for s in scenarios
        ],
        "rows": rows_to_json(all_rows, per_rank=False),
        "planner_time_reference": ref,
        "measured": measured,
        "measure_spec": dataclasses.asdict(MEASURE_SPEC),
        "measure_settings": None if args.no_measure else {"steps": args.steps, "warmup": MEASURE_WARMUP,
                                                            "seed": args.seed},
        "command": " ".join(sys.argv),
        "bench_seconds": total,
    }
    write_atomic(out / "planner.json", json.dumps(payload, indent=1, default=str))

    times = {}
    for r in all_rows:
        times.setdefault(r["world_size"], []).append(r["result"].planner_seconds)
    gen = [
        BEGIN,
        (
            f"Generated by a partial run of `python apps/plan_bench.py` ({', '.join(args.partial)}) "
            if args.partial
            else "Generated by `make plan-bench` (`python apps/plan_bench.py`) "
        )
        + f"in {total:.0f} s on this machine "
        f"({os.cpu_count()} CPU cores); raw numbers in `planner.json`.\n",
        "## Headline: what the aux tables add\n",
        headline(all_rows),
        "\n## Planner run time\n",
        "| ranks | planner runs | mean s | max s |\n|---:|---:|---:|---:|\n"
        + "".join(
            f"| {w} | {len(v)} | {sum(v) / len(v):.1f} | {max(v):.1f} |\n" for w, v in sorted(times.items())
        ),
    ]
    if ref:
        a, b = ref["all types"], ref["restricted"]
        gen.append(
            f"\nFull search vs the restricted sharding types at {ref['world_size']} ranks "
            f"({ref['scenario']}, IaCN aux={ref['aux_dim']}): all types {a['seconds']:.1f} s "
            f"({a['proposals']} proposals) → restricted {b['seconds']:.1f} s ({b['proposals']} proposals); "
            f"same plan: {'yes' if a['plan'] == b['plan'] else 'no'} (all types: {a['plan']}; restricted: "
            f"{b['plan']}), step estimate {a['step_estimate_ms']:.3g} vs {b['step_estimate_ms']:.3g} ms.\n"
        )
    gen.append("\n## Plots\n")
    gen += [f"![{p.stem}]({p.name})\n" for p in pngs]
    gen.append("\n## Plans per scenario\n")
    gen.append(
        "Memory columns are the sharded tables only (weights + optimizer state + the planner's I/O buffers), "
        "per rank, max over ranks; the 15% HBM reserve for the dense part is not in them. Step estimates "
        "are TorchRec's perf model (ms): max over ranks of fwd/bwd compute + comms (+ UVM prefetch).\n"
    )
    gen += [s + "\n" for s in sections]
    if measured:
        gen.append("## Measured check on CPU ranks (gloo)\n")
        gen.append(
            f"`{MEASURE_SPEC}`, batch {MEASURE_OPTIONS.batch_size}/rank, {MEASURE_OPTIONS.optimizer} (fused, "
            f"in backward), CPU topology with DDR cap = machine memory / ranks, 1 thread per rank, "
            f"{args.steps} timed steps after 3 warm-up.\n\n" + measured_markdown(measured)
        )
    gen.append(END)
    generated = "\n".join(gen)

    doc = out / "planner.md"
    if doc.exists() and BEGIN in doc.read_text() and END in doc.read_text():
        text = doc.read_text()
        text = text[: text.index(BEGIN)] + generated + text[text.index(END) + len(END) :]
    else:
        text = "# Sharding planner: what IaCN's aux tables cost at scale\n\n" + generated + "\n"
    write_atomic(doc, text)
    log(f"wrote {doc}, {out / 'planner.json'}, {', '.join(str(p) for p in pngs)} in {total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
