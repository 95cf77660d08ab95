"""Plan embedding sharding with and without IaCN's aux tables (TorchRec planner, simulated topology).

``iacn plan --spec SCENARIO.yaml`` or ``iacn plan --meta DATASET_DIR [--orig-dim ...]`` plans the
model's tables on each ``--world-size`` and writes ``plan.json`` and ``plan.md`` (sharding type and
kernel per table, per-rank HBM/DDR, the planner's perf estimates and the aux tables' deltas) to
``--out`` (exit status 1 when a plan does not fit); ``--plot`` adds ``plan_memory.png`` and
``plan_step.png`` (per-rank memory and estimated
step time vs world size).

Scenario file (YAML or JSON)::

    name: amazon-electronics
    model: {num_users: 192403, num_items: 63001, num_cates: 801, orig_dim: 18, user_dim: 18,
            hist_len: 7.8}
    aux_dims: [18, 9]              # IaCN variants (default: [model.aux_dim])
    world_sizes: [8, 64, 256, 1024]
    topology: {local_world_size: 8, compute_device: cuda, hbm_gib: 80, ddr_gib: 128}
    plan: {batch_size: 128, optimizer: rowwise_adagrad, offload: auto}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from iacn_torchrec import versions
from iacn_torchrec.distributed.plan_specs import (
    GIB,
    OPTIMIZERS,
    ST_ABBR,
    ModelSpec,
    PlanOptions,
    SpecError,
    TopologySpec,
    check_sharding_types,
    fmt_bytes,
    is_int,
)
from iacn_torchrec.fileio import check_output_path, save_figure, write_atomic

SCENARIO_KEYS = {"name", "description", "model", "aux_dims", "world_sizes", "topology", "plan"}


@dataclasses.dataclass
class Scenario:
    name: str
    model: ModelSpec
    aux_dims: list[int]
    world_sizes: list[int]
    topology: dict[str, Any]
    options: PlanOptions
    description: str = ""


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario file (YAML or JSON); errors name the file and the field."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such scenario file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # a binary file, or another encoding
        raise SpecError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    try:
        if p.suffix == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except Exception as e:  # yaml.YAMLError carries the line in its message, over several lines
        flat = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise SpecError(f"{p}: not valid YAML: {flat}") from None
    return scenario_from_dict(d, str(p))


def scenario_from_dict(d: Any, where: str = "<scenario>") -> Scenario:
    if not isinstance(d, dict):
        raise SpecError(f"{where}: a scenario must be a mapping")
    unknown = sorted(set(d) - SCENARIO_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown scenario field(s) {unknown}; known: {sorted(SCENARIO_KEYS)}")
    for key in ("name", "model", "world_sizes"):
        if key not in d:
            raise SpecError(f"{where}: missing required field {key!r}")
    model_d = dict(d["model"]) if isinstance(d["model"], dict) else d["model"]
    if isinstance(model_d, dict):
        model_d.setdefault("name", str(d["name"]))
    model = ModelSpec.from_dict(model_d, f"{where}: model")
    ws = d["world_sizes"]
    if not isinstance(ws, list) or not ws or not all(is_int(w) and w >= 1 for w in ws):
        raise SpecError(f"{where}: 'world_sizes' must be a non-empty list of positive integers, got {ws!r}")
    aux = d.get("aux_dims", [model.aux_dim])
    if not isinstance(aux, list) or not aux or not all(is_int(a) and a > 0 for a in aux):  # []: no IaCN row
        raise SpecError(f"{where}: 'aux_dims' must be a non-empty list of positive integers, got {aux!r}")
    topo = d.get("topology", {}) or {}
    if not isinstance(topo, dict) or "world_size" in topo:
        raise SpecError(f"{where}: 'topology' must be a mapping without 'world_size' (the scenario's "
                        f"'world_sizes' list gives it), got {topo!r}")
    _check_topologies(topo, ws, f"{where}: topology")
    plan = d.get("plan", {}) or {}
    if not isinstance(plan, dict):
        raise SpecError(f"{where}: 'plan' must be a mapping of plan options, got {plan!r}")
    known = {f.name for f in dataclasses.fields(PlanOptions)}
    bad = sorted(set(plan) - known)
    if bad:
        raise SpecError(f"{where}: unknown plan field(s) {bad}; known: {sorted(known)}")
    if isinstance(plan.get("sharding_types"), list):
        plan = {**plan, "sharding_types": tuple(plan["sharding_types"])}
    try:
        options = PlanOptions(**plan)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    _check_sharding_types(model, topo, options, where)
    return Scenario(str(d["name"]), model, aux, ws, topo, options, str(d.get("description", "")))


def _check_topologies(topo: dict[str, Any], world_sizes: list[int], where: str) -> None:
    """Build the topology of every world size now, so that a bad one fails before any planning."""
    for w in world_sizes:
        try:
            TopologySpec.from_dict({**topo, "world_size": w}, where)
        except TypeError as e:
            raise SpecError(f"{where}: {e}") from None


def _check_sharding_types(model: ModelSpec, topo: dict[str, Any], options: PlanOptions, where: str) -> None:
    try:
        check_sharding_types(options.sharding_types, model.pooled, topo.get("compute_device", "cuda"))
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None


def quiet_torchrec() -> None:
    """Silence TorchRec's planner warnings (direct Topology construction, dry-run notes)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("torchrec", "torchrec.distributed.planner"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # TorchRec logs "Sharding spec not found" for data-parallel tables on the root logger
    logging.getLogger().setLevel(logging.ERROR)


def run_scenario(scn: Scenario, log: Any = None) -> list[dict[str, Any]]:
    """Plan every (world size, aux dim) of ``scn``; one row per (world size, variant).

    Each row: ``world_size``, ``variant`` ("baseline" or "iacn"), ``aux_dim``, ``result``
    (a :class:`PlanResult`) and, for IaCN rows, ``delta`` vs the baseline of the same world size.
    """
    from iacn_torchrec.distributed.planning import compare_iacn, plan_with_fallback

    rows: list[dict[str, Any]] = []
    for w in scn.world_sizes:
        topo = TopologySpec.from_dict({**scn.topology, "world_size": w})
        base = plan_with_fallback(scn.model, topo, scn.options, with_iacn=False)
        rows.append(
            {"scenario": scn.name, "world_size": w, "variant": "baseline", "aux_dim": 0, "result": base}
        )
        if log:
            log(f"  {scn.name} W={w} baseline: {_status(base)}")
        for a in scn.aux_dims:
            c = compare_iacn(scn.model.with_aux_dim(a), topo, scn.options, baseline=base)
            rows.append(
                {
                    "scenario": scn.name,
                    "world_size": w,
                    "variant": "iacn",
                    "aux_dim": a,
                    "result": c["iacn"],
                    "delta": c["delta"],
                }
            )
            if log:
                log(f"  {scn.name} W={w} iacn aux={a}: {_status(c['iacn'])}")
    return rows


def _status(r: Any) -> str:
    if not r.fits:
        return f"does not fit ({r.planner_seconds:.1f}s)"
    return (
        f"{r.mode}, max rank HBM {fmt_bytes(r.max_rank_hbm)}, step est {r.step_estimate_ms:.3f} ms "
        f"({r.planner_seconds:.1f}s, {r.num_proposals} proposals)"
    )


_CK = {"fused": "fused", "dense": "dense", "fused_uvm_caching": "uvm-cache", "fused_uvm": "uvm"}


def plan_cell(r: Any) -> str:
    """``item_orig RW/fused`` per table, compact."""
    return "; ".join(
        f"{t.name} {ST_ABBR.get(t.sharding_type, t.sharding_type)}/"
        f"{_CK.get(t.compute_kernel, t.compute_kernel)}"
        for t in r.tables
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.3g}" if n else "0"


def _signed_gib(n: float) -> str:
    return f"{n / GIB:+.3g}" if n else "0"


def _ms(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "—"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One markdown table: per (world size, variant) the plan, memory, perf and the IaCN deltas."""
    head = (
        "| ranks | variant | kernels | sharding (table type/kernel) | max rank HBM GiB | max rank DDR GiB "
        "| step est. ms (fwd comp / fwd comms / bwd comp / bwd comms on the critical rank) "
        "| Δ HBM / DDR per rank GiB | Δ step ms (×) | planner s |\n"
        "|---:|---|---|---|---:|---:|---|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        r = row["result"]
        var = "baseline" if row["variant"] == "baseline" else f"IaCN aux={row['aux_dim']}"
        if not r.fits:
            first = (r.error or "").splitlines()
            reason = first[0] if first else "does not fit"
            extra = "; ".join(x.strip() for x in first[1:] if x.strip().startswith("table"))
            lines.append(
                f"| {row['world_size']} | {var} | {r.mode} | **does not fit**: {reason}"
                f"{(' — ' + extra) if extra else ''} | — | — | — | — | — | {r.planner_seconds:.1f} |"
            )
            continue
        p = r.rank_perf[r.critical_rank]
        perf = (
            f"**{_ms(r.step_estimate_ms)}** ({_ms(p['fwd_compute'])} / {_ms(p['fwd_comms'])} / "
            f"{_ms(p['bwd_compute'])} / {_ms(p['bwd_comms'])}"
            + (f" + prefetch {_ms(p['prefetch_compute'])}" if p["prefetch_compute"] else "")
            + ")"
        )
        d = row.get("delta") or {}
        dh = f"{_signed_gib(d['max_rank_hbm'])} / {_signed_gib(d['max_rank_ddr'])}" if d else ""
        ds = f"{d['step_estimate_ms']:+.3g} (×{d['step_ratio']:.2f})" if d else ""
        mode = r.mode + (" (HBM-only did not fit)" if r.error else "")
        lines.append(
            f"| {row['world_size']} | {var} | {mode} | {plan_cell(r)} | {_gib(r.max_rank_hbm)} | "
            f"{_gib(r.max_rank_ddr)} | {perf} | {dh} | {ds} | {r.planner_seconds:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def rows_to_json(rows: list[dict[str, Any]], per_rank: bool = False) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        d = {k: v for k, v in row.items() if k != "result"}
        d["result"] = row["result"].to_dict(per_rank=per_rank)
        out.append(d)
    return out


def plot_rows(rows: list[dict[str, Any]], out_prefix: str | Path) -> list[Path]:
    """``<prefix>_memory.png`` (max per-rank HBM, and DDR when used) and ``<prefix>_step.png`` vs ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    paths = []
    for metric, ylabel, fname in (
        ("mem", "max per-rank memory, GiB (HBM solid, DDR dashed)", "memory"),
        ("step", "estimated step time, ms (max over ranks)", "step"),
    ):
        n = len(scenarios)
        cols = min(3, n)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
        for i, scn in enumerate(scenarios):
            ax = axes[i // cols][i % cols]
            srows = [r for r in rows if r["scenario"] == scn]
            variants = list(dict.fromkeys((r["variant"], r["aux_dim"]) for r in srows))
            for v, a in variants:
                vr = sorted(
                    (r for r in srows if (r["variant"], r["aux_dim"]) == (v, a)),
                    key=lambda r: r["world_size"],
                )
                xs = [r["world_size"] for r in vr]
                label = "baseline" if v == "baseline" else f"IaCN aux={a}"
                if metric == "mem":
                    hb = [r["result"].max_rank_hbm / GIB if r["result"].fits else math.nan for r in vr]
                    (line,) = ax.plot(xs, hb, marker="o", label=label)
                    dd = [r["result"].max_rank_ddr / GIB if r["result"].fits else math.nan for r in vr]
                    dd = [x if x > 0 else math.nan for x in dd]  # log axis: no DDR used -> no point
                    if any(x > 0 for x in dd if math.isfinite(x)):
                        ax.plot(xs, dd, marker="s", ls="--", color=line.get_color())
                else:
                    ys = [r["result"].step_estimate_ms if r["result"].fits else math.nan for r in vr]
                    (line,) = ax.plot(xs, ys, marker="o", label=label)
                nf = [r["world_size"] for r in vr if not r["result"].fits]
                if nf:
                    ax.scatter(
                        nf,
                        [0.02] * len(nf),
                        marker="x",
                        color=line.get_color(),
                        s=60,
                        zorder=3,
                        transform=ax.get_xaxis_transform(),
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sorted({r["world_size"] for r in srows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_title(scn, fontsize=10)
            ax.set_xlabel("ranks (GPUs)")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for j in range(n, nrows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.suptitle("log scales; x at the bottom: does not fit", fontsize=8, y=0.995)
        fig.tight_layout()
        path = Path(f"{out_prefix}_{fname}.png")
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="scenario file (YAML/JSON): model, aux_dims, world_sizes, topology, plan")
    src.add_argument("--meta", help="prepared dataset directory (or its meta.json): table sizes from counts")
    m = parser.add_argument_group("model (with --meta; override a --spec's model)")
    m.add_argument("--orig-dim", type=int)
    m.add_argument("--aux-dim", type=int, nargs="+", help="IaCN aux dim(s) to compare (default: orig dim)")
    m.add_argument("--hist-len", type=float, help="mean history length (default with --meta: max_len)")
    m.add_argument("--neg-hist", action="store_true", help="DIEN negative behaviours (features neg_hist_*)")
    m.add_argument("--iacn-negatives", type=float, help="IaCN sampled-softmax negatives per sample, on "
                   "average, e.g. 2.5 (S_neg x the positive share: the loader samples them for label-1 "
                   "samples only)")
    t = parser.add_argument_group("topology")
    t.add_argument("--world-size", type=int, nargs="+", help="simulated ranks (default: 8, or the spec's)")
    t.add_argument("--local-world-size", type=int)
    t.add_argument("--compute-device", choices=["cuda", "cpu"])
    t.add_argument("--hbm-gib", type=float, help="HBM per rank (default 80)")
    t.add_argument("--ddr-gib", type=float, help="DDR per rank (default 256)")
    t.add_argument("--intra-host-bw-gbps", type=float)
    t.add_argument("--inter-host-bw-gbps", type=float)
    p = parser.add_argument_group("plan")
    p.add_argument("--batch-size", type=int, help="batch size per rank (default 512)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS))
    p.add_argument("--offload", choices=["never", "auto", "always"], help="fused_uvm_caching (default auto)")
    p.add_argument("--out", default="plan_out",
                   help="output directory (plan.json, plan.md; default: ./plan_out)")
    p.add_argument("--plot", action="store_true", help="also draw plan_memory.png and plan_step.png")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    if args.spec:
        scn = load_scenario(args.spec)
    else:
        model = ModelSpec.from_meta(args.meta)
        scn = Scenario(model.name, model, [model.aux_dim], [8], {}, PlanOptions())
    for flag, v, lo in (("--orig-dim", args.orig_dim, 1), ("--hist-len", args.hist_len, 0),
                        ("--iacn-negatives", args.iacn_negatives, 0)):
        if v is not None and not (math.isfinite(v) and v >= lo):
            raise SpecError(f"{flag}: must be a number >= {lo}, got {v}")
    over: dict[str, Any] = {}
    if args.orig_dim is not None:
        over.update(orig_dim=args.orig_dim, user_dim=args.orig_dim)
    if args.hist_len is not None:
        over["hist_len"] = args.hist_len
    if args.neg_hist:
        over["neg_hist"] = True
    if args.iacn_negatives is not None:
        over["iacn_negatives"] = args.iacn_negatives
    model = dataclasses.replace(scn.model, **over) if over else scn.model
    aux = args.aux_dim or ([model.orig_dim] if (args.meta and not args.spec) else scn.aux_dims)
    topo = dict(scn.topology)
    for k in (
        "local_world_size",
        "compute_device",
        "hbm_gib",
        "ddr_gib",
        "intra_host_bw_gbps",
        "inter_host_bw_gbps",
    ):
        if getattr(args, k) is not None:
            topo[k] = getattr(args, k)
    opt = {}
    for k in ("batch_size", "optimizer", "offload"):
        if getattr(args, k) is not None:
            opt[k] = getattr(args, k)
    options = dataclasses.replace(scn.options, **opt) if opt else scn.options
    world_sizes = list(args.world_size or scn.world_sizes)
    # check everything before the first plan (a bad value must not surface after minutes of planning)
    if args.aux_dim is not None and not all(a >= 1 for a in args.aux_dim):
        raise SpecError(f"--aux-dim: IaCN aux dims must be >= 1, got {args.aux_dim}")
    if args.world_size is not None and not all(w >= 1 for w in args.world_size):
        raise SpecError(f"--world-size: must be >= 1, got {args.world_size}")
    if topo.get("compute_device", "cuda") == "cpu":  # no HBM to size or to offload from on a CPU
        unused = [f for f, given in (("--hbm-gib", args.hbm_gib), ("--offload", args.offload))
                  if given is not None]
        if unused:
            raise SpecError(f"{', '.join(unused)}: no effect with compute_device cpu (tables live in DDR, "
                            "nothing is offloaded); leave them out or plan for cuda")
    where = args.spec or args.meta
    _check_topologies(topo, world_sizes, f"{where}: topology")
    _check_sharding_types(model, topo, options, where)
    return Scenario(scn.name, model, list(aux), world_sizes, topo, options)


def run(args: argparse.Namespace) -> int:
    quiet_torchrec()
    try:
        scn = scenario_from_args(args)
    except SpecError as e:
        print(f"iacn plan: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    check_output_path(out, "--out", directory=True, parents=True)  # before planning (UserError: one line)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_scenario(scn, log=print)
    payload = {
        "scenario": scn.name,
        "model": dataclasses.asdict(scn.model),
        "topology": scn.topology,
        "options": dataclasses.asdict(scn.options),
        "rows": rows_to_json(rows, per_rank=True),
        "versions": versions(),  # the planner's estimates depend on TorchRec's
    }
    write_atomic(out / "plan.json", json.dumps(payload, indent=1, default=str))
    md = f"# Sharding plan: {scn.name}\n\nModel: `{scn.model}`\n\n" + markdown_table(rows)
    if args.plot:
        for p in plot_rows(rows, out / "plan"):
            md += f"\n![{p.stem}]({p.name})\n"
    write_atomic(out / "plan.md", md)
    print(f"wrote {out / 'plan.json'} and {out / 'plan.md'}")
    return 0 if all(r["result"].fits for r in rows) else 1
