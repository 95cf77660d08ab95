"""Sharding plans with and without IaCN's aux tables, from TorchRec's ``EmbeddingShardingPlanner``.

The planner runs on simulated topologies (no hardware needed): the tables are built on the meta
device in two ``EmbeddingCollection`` modules, ``orig`` (``uid``, ``item_orig``, ``cate_orig``)
and ``aux`` (``item_aux``, ``cate_aux``) as in ``InterestAwareEmbeddings``, with the chosen
optimizer applied in backward so that the planner counts its state. :func:`compare_iacn` plans the
model twice and reports what the aux tables add: per-rank HBM/DDR, the planner's perf estimates
(fwd/bwd compute and comms, in ms) and the critical-path step estimate (max over ranks of the
summed shard perfs, TorchRec's ``NoopPerfModel`` rating). :func:`measure_sharded_embeddings` checks
the estimates against real CPU ranks (gloo, DMP, fused optimizer).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Storage
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iacn_torchrec.distributed.plan_specs import (
    GIB,
    OPTIMIZERS,
    ST_ABBR,
    ModelSpec,
    PlanOptions,
    SpecError,
    TableSpec,
    TopologySpec,
    check_sharding_types,
    fmt_bytes,
)
from iacn_torchrec.errors import UserError

__all__ = [
    "ModelSpec",
    "PlanOptions",
    "TopologySpec",
    "SpecError",
    "PlannedEmbeddings",
    "PlanDoesNotFitError",
    "PlanResult",
    "plan_tables",
    "plan_with_fallback",
    "compare_iacn",
    "measure_sharded_embeddings",
]

PERF_FIELDS = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "prefetch_compute")
HBM_KERNELS = ["fused"]
OFFLOAD_KERNELS = ["fused", "fused_uvm_caching"]


class PlanDoesNotFitError(UserError, ValueError):
    """No sharding plan fits the topology; ``shortfall`` maps table (or "total") to missing bytes."""

    def __init__(self, message: str, shortfall: dict[str, int], tier: str) -> None:
        super().__init__(message)
        self.shortfall = shortfall
        self.tier = tier


#: the embedding collections of a planned model, as in InterestAwareEmbeddings
MODULES = ("orig", "aux", "user")


class PlannedEmbeddings(nn.Module):
    """The embedding tables of ``InterestAwareEmbeddings`` (same module and table names), nothing else.

    ``orig``/``aux`` (and ``user`` when the user dim differs from orig's) are
    ``EmbeddingCollection``s (sequence lookups), or ``EmbeddingBagCollection``s (sum-pooled,
    DLRM-style) when ``pooled``. ``forward(orig_kjt, aux_kjt, user_kjt)`` returns the lookups of
    each, ``{table_module: {feature: JaggedTensor [B·n_f, D]}}`` (pooled: ``KeyedTensor [B, ΣD]``).
    """

    def __init__(self, tables: list[TableSpec], pooled: bool = False, device: torch.device | None = None):
        super().__init__()
        device = device or torch.device("meta")
        self.pooled = pooled
        for mod in MODULES:
            ts = [t for t in tables if t.module == mod]
            if not ts:
                continue
            config_cls = EmbeddingBagConfig if pooled else EmbeddingConfig
            collection_cls = EmbeddingBagCollection if pooled else EmbeddingCollection
            cfgs = [
                config_cls(
                    name=t.name,
                    num_embeddings=t.num_embeddings,
                    embedding_dim=t.embedding_dim,
                    feature_names=list(t.feature_names),
                )
                for t in ts
            ]
            setattr(self, mod, collection_cls(tables=cfgs, device=device))

    def forward(
        self, orig_kjt: KeyedJaggedTensor, aux_kjt: KeyedJaggedTensor | None = None,
        user_kjt: KeyedJaggedTensor | None = None,
    ) -> dict[str, Any]:
        out = {"orig": self.orig(orig_kjt)}
        for mod, kjt in (("aux", aux_kjt), ("user", user_kjt)):
            if kjt is not None and hasattr(self, mod):
                out[mod] = getattr(self, mod)(kjt)
        return out


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    path = OPTIMIZERS[name][0]
    mod, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(mod), cls)


def build_module(
    spec: ModelSpec, with_iacn: bool, optimizer: str, device: torch.device | None = None
) -> nn.Module:
    """The meta-device tables with ``optimizer`` applied in backward (so the planner counts its state)."""
    from torch.distributed.optim import _apply_optimizer_in_backward

    module = PlannedEmbeddings(spec.tables(with_iacn), pooled=spec.pooled, device=device)
    kwargs: dict[str, Any] = {"lr": 0.01}
    _apply_optimizer_in_backward(_optimizer_class(optimizer), module.parameters(), kwargs)
    return module


def sharders_for(spec: ModelSpec) -> list:
    return [EmbeddingBagCollectionSharder()] if spec.pooled else [EmbeddingCollectionSharder()]


def sharding_types_for(t: TableSpec, topo: TopologySpec, options: PlanOptions, pooled: bool) -> list[str]:
    """Sharding types the planner may use for table ``t`` (see :class:`PlanOptions`)."""
    if options.sharding_types is not None:
        return list(options.sharding_types)
    small = t.param_bytes < options.small_table_bytes
    # Past a few hundred ranks one table-wise rank would receive every rank's lookups (for sequence
    # features B·W·L rows of output): never competitive, and dropping it keeps planning in seconds.
    types = ["table_wise", "row_wise"] if topo.world_size <= options.table_wise_max_world else ["row_wise"]
    if small and topo.compute_device == "cuda":
        # data-parallel: cheap for tiny tables with huge fan-out; EC data-parallel fails in fbgemm on CPU
        types.insert(0, "data_parallel")
    if not small and topo.world_size <= options.column_wise_max_world:
        types.append("column_wise")
    if pooled and topo.world_size > topo.local_world_size:
        types.append("table_row_wise")
    return types


def build_constraints(
    spec: ModelSpec, with_iacn: bool, topo: TopologySpec, options: PlanOptions, offload: bool
) -> dict[str, ParameterConstraints]:
    check_sharding_types(options.sharding_types, spec.pooled, topo.compute_device)
    cons: dict[str, ParameterConstraints] = {}
    for t in spec.tables(with_iacn):
        types = sharding_types_for(t, topo, options, spec.pooled)
        kernels = (
            list(OFFLOAD_KERNELS if offload else HBM_KERNELS) if topo.compute_device == "cuda" else ["fused"]
        )
        if "data_parallel" in types:
            kernels.append("dense")
        cons[t.name] = ParameterConstraints(
            sharding_types=types,
            compute_kernels=kernels,
            # ids per sample either way: TorchRec sizes the id all-to-all and the lookups from it (a
            # pooled bag's output size comes from num_poolings)
            pooling_factors=list(t.pooling_factors),
            num_poolings=[1.0] * len(t.feature_names),
            cache_params=_cache_params(options.cache_load_factor) if offload else None,
        )
    return cons


@dataclass
class TablePlan:
    """Where one table went and what it costs (bytes summed over its shards; perf in ms)."""

    name: str
    module: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    num_shards: int
    ranks: list[int]
    param_bytes: int  # weights held, rows × cols × 4 over the shards
    optimizer_bytes: int  # optimizer state held
    hbm_bytes: int  # planner's storage estimate (state + I/O buffers on cuda)
    ddr_bytes: int
    perf: dict[str, float]


@dataclass
class PlanResult:
    """One planner run. ``fits=False`` carries ``error`` (the does-not-fit message) and ``shortfall``."""

    model: str
    with_iacn: bool
    aux_dim: int
    topology: dict[str, Any]
    batch_size: int
    optimizer: str
    mode: str  # "hbm" (fused kernels), "uvm_caching" (fused_uvm_caching allowed), "cpu"
    fits: bool
    planner_seconds: float
    num_proposals: int = 0
    num_plans: int = 0
    tables: list[TablePlan] = field(default_factory=list)
    rank_hbm: list[int] = field(default_factory=list)  # sharded tables only
    rank_ddr: list[int] = field(default_factory=list)
    rank_perf: list[dict[str, float]] = field(default_factory=list)
    reserved_hbm_per_rank: int = 0
    critical_path_ms: dict[str, float] = field(default_factory=dict)  # TorchRec's sync-point model
    error: str | None = None
    shortfall: dict[str, int] = field(default_factory=dict)

    # -- summaries -------------------------------------------------------------------------------
    @property
    def rank_total(self) -> list[float]:
        return [sum(p[f] for f in PERF_FIELDS) for p in self.rank_perf]

    @property
    def step_estimate_ms(self) -> float:
        """Max over ranks of the summed perf (fwd/bwd compute + comms + prefetch) of its shards."""
        return max(self.rank_total) if self.rank_perf else math.nan

    @property
    def critical_rank(self) -> int:
        tot = self.rank_total
        return max(range(len(tot)), key=tot.__getitem__) if tot else -1

    @property
    def max_rank_hbm(self) -> int:
        return max(self.rank_hbm) if self.rank_hbm else 0

    @property
    def max_rank_ddr(self) -> int:
        return max(self.rank_ddr) if self.rank_ddr else 0

    def table(self, name: str) -> TablePlan | None:
        return next((t for t in self.tables if t.name == name), None)

    def state_bytes(self, names: list[str] | None = None) -> int:
        """Weights + optimizer state of the named tables (all when None)."""
        return sum(t.param_bytes + t.optimizer_bytes for t in self.tables if names is None or t.name in names)

    def storage_bytes(self, names: list[str] | None = None) -> int:
        """The planner's HBM + DDR estimate of the named tables (all when None)."""
        return sum(t.hbm_bytes + t.ddr_bytes for t in self.tables if names is None or t.name in names)

    def summary(self) -> dict[str, Any]:
        if not self.fits:
            return {"fits": False}
        crit = self.critical_rank
        return {
            "fits": True,
            "max_rank_hbm": self.max_rank_hbm,
            "max_rank_ddr": self.max_rank_ddr,
            "total_hbm": sum(self.rank_hbm),
            "total_ddr": sum(self.rank_ddr),
            "state_bytes": self.state_bytes(),
            "step_estimate_ms": self.step_estimate_ms,
            "critical_rank": crit,
            "critical_rank_perf": self.rank_perf[crit],
            "critical_path_ms": self.critical_path_ms,
        }

    def to_dict(self, per_rank: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["summary"] = self.summary()
        if not per_rank and self.rank_perf:
            tot = self.rank_total
            d["rank_stats"] = {
                k: {"min": min(v), "mean": sum(v) / len(v), "max": max(v)}
                for k, v in (("hbm", self.rank_hbm), ("ddr", self.rank_ddr), ("perf_total_ms", tot))
            }
            for k in ("rank_hbm", "rank_ddr", "rank_perf"):
                d.pop(k)
            for t in d["tables"]:
                t["ranks"] = _ranges(t["ranks"])
        return d


def _ranges(ranks: list[int]) -> str:
    """[0,1,2,5] -> "0-2,5" (compact rank lists in the JSON)."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ",".join(out)


def _critical_path(best_plan: list[ShardingOption]) -> dict[str, float]:
    """TorchRec's sync-point critical path (stats._calculate_critical_path): comms + compute, ms."""
    from torchrec.distributed.planner.stats import _calculate_critical_path

    cp = _calculate_critical_path(best_plan)
    return {"comms": cp.comms_estimate, "compute": cp.comp_estimate, "total": cp.total()}


def _shard_state_bytes(options: PlanOptions, size: list[int]) -> tuple[int, int]:
    rows, cols = int(size[0]), int(size[1])
    return rows * cols * 4, options.optimizer_state_bytes(rows, cols)


def _result_from_plan(
    best: list[ShardingOption],
    spec: ModelSpec,
    with_iacn: bool,
    topo: TopologySpec,
    options: PlanOptions,
    mode: str,
    seconds: float,
    planner: EmbeddingShardingPlanner,
    reserved: int,
) -> PlanResult:
    W = topo.world_size
    rank_hbm, rank_ddr = [0] * W, [0] * W
    rank_perf = [dict.fromkeys(PERF_FIELDS, 0.0) for _ in range(W)]
    modules = {t.name: t.module for t in spec.tables(with_iacn)}
    tables: list[TablePlan] = []
    for so in best:
        params = opt = hbm = ddr = 0
        perf = dict.fromkeys(PERF_FIELDS, 0.0)
        ranks = set()
        for sh in so.shards:
            r = int(sh.rank)
            ranks.add(r)
            p, o = _shard_state_bytes(options, sh.size)
            params, opt = params + p, opt + o
            hbm, ddr = hbm + sh.storage.hbm, ddr + sh.storage.ddr
            rank_hbm[r] += sh.storage.hbm
            rank_ddr[r] += sh.storage.ddr
            for f in PERF_FIELDS:
                v = float(getattr(sh.perf, f))
                perf[f] += v
                rank_perf[r][f] += v
        tables.append(
            TablePlan(
                name=so.name,
                module=modules.get(so.name, "?"),
                rows=int(so.tensor.shape[0]),
                dim=int(so.tensor.shape[1]),
                sharding_type=so.sharding_type,
                compute_kernel=so.compute_kernel,
                num_shards=len(so.shards),
                ranks=sorted(ranks),
                param_bytes=params,
                optimizer_bytes=opt,
                hbm_bytes=hbm,
                ddr_bytes=ddr,
                perf=perf,
            )
        )
    order = {t.name: i for i, t in enumerate(spec.tables(with_iacn))}
    tables.sort(key=lambda t: order.get(t.name, 99))
    return PlanResult(
        model=spec.name,
        with_iacn=with_iacn,
        aux_dim=spec.aux_dim if with_iacn else 0,
        topology=dataclasses.asdict(topo),
        batch_size=options.batch_size,
        optimizer=options.optimizer,
        mode=mode,
        fits=True,
        planner_seconds=seconds,
        num_proposals=planner._num_proposals,
        num_plans=planner._num_plans,
        tables=tables,
        rank_hbm=rank_hbm,
        rank_ddr=rank_ddr,
        rank_perf=rank_perf,
        reserved_hbm_per_rank=reserved,
        critical_path_ms=_critical_path(best),
    )


def _diagnose(
    planner: EmbeddingShardingPlanner,
    module: nn.Module,
    sharders: list,
    topo: TopologySpec,
    options: PlanOptions,
    constraints: dict[str, ParameterConstraints],
    mode: str,
    err: PlannerError,
) -> PlanDoesNotFitError:
    """Turn TorchRec's PlannerError into a message naming the tables that do not fit and by how much."""
    topology = topo.build()
    avail = FixedPercentageStorageReservation(options.reserve_fraction).reserve(
        topology, options.batch_size, module, sharders, constraints
    )
    cap: Storage = avail.devices[0].storage
    W = topo.world_size
    tiers = ["hbm"] if topo.compute_device == "cuda" else ["ddr"]
    if topo.compute_device == "cuda" and mode != "hbm":
        tiers = ["hbm", "ddr"]  # UVM caching: a cache in HBM, the full table in DDR
    caps = {t: getattr(cap, t) for t in tiers}
    search = planner._enumerator.enumerate(module=module, sharders=sharders)
    by_table: dict[str, list[ShardingOption]] = {}
    for so in search:
        by_table.setdefault(so.name, []).append(so)

    def total(so: ShardingOption) -> Storage:
        return sum((sh.storage for sh in so.shards), Storage(0, 0, 0))

    def load(s: Storage, n_ranks: int) -> float:
        # fraction of the tightest tier this storage takes out of n_ranks ranks
        return max(getattr(s, t) / max(1, caps[t] * n_ranks) for t in tiers)

    lines, shortfall = [], {}
    # per table and kernel the option with the smallest footprint; then the kernel mix across tables
    # that loads the tightest tier least (a lower bound on what any placement needs)
    per_kernel: dict[str, list[ShardingOption]] = {}
    for name, sos in by_table.items():
        best: dict[str, ShardingOption] = {}
        for so in sos:
            k = so.compute_kernel
            if k not in best or load(total(so), W) < load(total(best[k]), W):
                best[k] = so
        per_kernel[name] = list(best.values())
    names = list(per_kernel)
    combo = min(
        itertools.product(*(per_kernel[n] for n in names)),
        key=lambda c: load(sum((total(so) for so in c), Storage(0, 0, 0)), W),
    )
    cheapest: dict[str, ShardingOption] = dict(zip(names, combo))
    for name, sos in by_table.items():
        if not any(all(sh.storage.fits_in(cap) for sh in so.shards) for so in sos):
            smallest = min(sos, key=lambda so: max(load(sh.storage, 1) for sh in so.shards))
            big = max(smallest.shards, key=lambda sh: load(sh.storage, 1)).storage
            # every tier of the cap, not only the planned ones (a shard may overflow DDR in HBM mode)
            over = {t: getattr(big, t) - getattr(cap, t) for t in ("hbm", "ddr", "ssd")
                    if getattr(big, t) > getattr(cap, t)}
            shortfall[name] = max(over.values(), default=0)
            lines.append(
                f"table {name!r} ({smallest.tensor.shape[0]:,} x {smallest.tensor.shape[1]}): even its "
                f"smallest shard ({smallest.sharding_type}/{smallest.compute_kernel}) needs "
                + ", ".join(f"{fmt_bytes(getattr(big, t))} {t.upper()}" for t in tiers)
                + " on one rank; per rank available "
                + ", ".join(f"{fmt_bytes(caps[t])} {t.upper()}" for t in tiers)
                + " (short by "
                + ", ".join(f"{fmt_bytes(v)} {t.upper()}" for t, v in over.items())
                + ")"
            )
    need = {t: sum(getattr(total(so), t) for so in cheapest.values()) for t in tiers}
    over_total = {t: need[t] - caps[t] * W for t in tiers if need[t] > caps[t] * W}
    for t, v in over_total.items():
        shortfall[f"total_{t}"] = v
    order = sorted(cheapest, key=lambda n: -load(total(cheapest[n]), W))
    parts = ", ".join(
        f"{n} "
        + "+".join(f"{fmt_bytes(getattr(total(cheapest[n]), t))} {t.upper()}" for t in tiers)
        + f" ({ST_ABBR.get(cheapest[n].sharding_type, '?')}/{cheapest[n].compute_kernel})"
        for n in order
    )
    avail_s = " + ".join(f"{fmt_bytes(caps[t] * W)} {t.upper()}" for t in tiers)
    need_s = " + ".join(f"{fmt_bytes(need[t])} {t.upper()}" for t in tiers)
    # TorchRec's FixedPercentageStorageReservation shrinks HBM only: a CPU topology keeps all its DDR
    if topo.compute_device == "cpu":
        reserved = "nothing reserved: the reservation applies to HBM only"
    elif options.reserve_fraction > 0:
        reserved = f"after reserving {options.reserve_fraction:.0%} of HBM"
        reserved += ", none of DDR" if "ddr" in tiers else ""
    else:
        reserved = "nothing reserved"
    head = (
        f"sharding plan does not fit on {W} ranks: available {avail_s} "
        f"(per rank {', '.join(f'{fmt_bytes(caps[t])} {t.upper()}' for t in tiers)}, {reserved}); "
        f"the tables need at least {need_s} [{parts}]"
    )
    if over_total:
        head += ": short by " + ", ".join(f"{fmt_bytes(v)} {t.upper()}" for t, v in over_total.items())
    elif not lines:
        head += "; the totals fit but TorchRec's greedy partitioner found no placement"
        shortfall["partition"] = 0
    msg = head + ("\n  " + "\n  ".join(lines) if lines else "")
    msg += f"\n  (TorchRec: {str(err).splitlines()[0].strip()})"
    tier = "+".join(tiers)
    return PlanDoesNotFitError(msg, shortfall, tier)


def plan_tables(
    spec: ModelSpec,
    topo: TopologySpec,
    options: PlanOptions,
    with_iacn: bool,
    offload: bool = False,
) -> tuple[PlanResult, ShardingPlan]:
    """Plan the tables once; raise :class:`PlanDoesNotFitError` (naming table + shortfall) if none fits."""
    module = build_module(spec, with_iacn, options.optimizer)
    sharders = sharders_for(spec)
    cons = build_constraints(spec, with_iacn, topo, options, offload)
    mode = "cpu" if topo.compute_device == "cpu" else ("uvm_caching" if offload else "hbm")
    topology = topo.build()
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=options.batch_size,
        constraints=cons,
        storage_reservation=FixedPercentageStorageReservation(options.reserve_fraction),
        stats=[NoopEmbeddingStats()],
        debug=False,
    )
    t0 = time.perf_counter()
    try:
        plan = planner.plan(module, sharders)
    except PlannerError as e:
        raise _diagnose(planner, module, sharders, topo, options, cons, mode, e) from e
    seconds = time.perf_counter() - t0
    reserved = int(topology.devices[0].storage.hbm * options.reserve_fraction)
    best = planner._best_plan or []
    res = _result_from_plan(best, spec, with_iacn, topo, options, mode, seconds, planner, reserved)
    return res, plan


def _cache_params(load_factor: float):
    from torchrec.distributed.types import CacheParams

    return CacheParams(load_factor=load_factor)


def plan_with_fallback(
    spec: ModelSpec, topo: TopologySpec, options: PlanOptions, with_iacn: bool
) -> PlanResult:
    """Plan with HBM kernels; per ``options.offload`` retry with fused_uvm_caching; else a not-fit result."""
    if topo.compute_device == "cpu":
        tries = [False]
    else:
        tries = {"never": [False], "auto": [False, True], "always": [True]}[options.offload]
    err: PlanDoesNotFitError | None = None
    t0 = time.perf_counter()
    for offload in tries:
        try:
            res, _ = plan_tables(spec, topo, options, with_iacn, offload=offload)
            res.planner_seconds = time.perf_counter() - t0  # includes failed HBM-only attempts
            if err is not None:
                res.error = f"HBM-only: {err}"
                res.shortfall = err.shortfall
            return res
        except PlanDoesNotFitError as e:
            err = e
    assert err is not None
    return PlanResult(
        model=spec.name,
        with_iacn=with_iacn,
        aux_dim=spec.aux_dim if with_iacn else 0,
        topology=dataclasses.asdict(topo),
        batch_size=options.batch_size,
        optimizer=options.optimizer,
        mode="cpu" if topo.compute_device == "cpu" else ("uvm_caching" if tries[-1] else "hbm"),
        fits=False,
        planner_seconds=time.perf_counter() - t0,
        error=str(err),
        shortfall=err.shortfall,
    )


AUX_TABLES = ["item_aux", "cate_aux"]


def compare_iacn(
    spec: ModelSpec, topo: TopologySpec, options: PlanOptions, baseline: PlanResult | None = None
) -> dict[str, Any]:
    """Plan without and with the aux tables; return both results and the deltas the aux tables cause.

    ``baseline`` (a plan of the same spec without IaCN on the same topology) is reused if given.
    """
    base = baseline or plan_with_fallback(spec, topo, options, with_iacn=False)
    iacn = plan_with_fallback(spec, topo, options, with_iacn=True)
    delta: dict[str, Any] = {}
    if base.fits and iacn.fits:
        delta = {
            "max_rank_hbm": iacn.max_rank_hbm - base.max_rank_hbm,
            "max_rank_ddr": iacn.max_rank_ddr - base.max_rank_ddr,
            "total_hbm": sum(iacn.rank_hbm) - sum(base.rank_hbm),
            "total_ddr": sum(iacn.rank_ddr) - sum(base.rank_ddr),
            "state_bytes": iacn.state_bytes() - base.state_bytes(),
            "aux_state_bytes": iacn.state_bytes(AUX_TABLES),
            "aux_storage_bytes": iacn.storage_bytes(AUX_TABLES),
            "step_estimate_ms": iacn.step_estimate_ms - base.step_estimate_ms,
            "step_ratio": iacn.step_estimate_ms / base.step_estimate_ms
            if base.step_estimate_ms
            else math.nan,
        }
    return {"baseline": base, "iacn": iacn, "delta": delta}


# ------------------------------------------------------------------------------------------------
# Measured check on CPU ranks
# ------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the local data in a (nested) state: ShardedTensor local shards, DTensor, Tensor."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
    if hasattr(obj, "to_local") and callable(obj.to_local):
        t = obj.to_local()
        return t.numel() * t.element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def random_kjt(tables: list[TableSpec], batch_size: int, gen: torch.Generator) -> KeyedJaggedTensor:
    """A random KJT for ``tables``: each feature has round(pooling factor) ids per sample, ids uniform."""
    keys, lengths, values = [], [], []
    for t in tables:
        for f, pf in zip(t.feature_names, t.pooling_factors):
            n = max(1, round(pf))
            keys.append(f)
            lengths.append(torch.full((batch_size,), n, dtype=torch.int64))
            values.append(torch.randint(1, t.num_embeddings, (batch_size * n,), generator=gen))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )


def _measure_worker(rank: int, world_size: int, port: int, job: dict[str, Any], out_dir: str) -> None:
    import logging

    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    logging.getLogger("torchrec").setLevel(logging.ERROR)  # this worker process only
    torch.set_num_threads(int(job.get("threads", 1)))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        spec = ModelSpec(**job["spec"])
        options = PlanOptions(**job["options"])
        topo = TopologySpec(**job["topology"])
        with_iacn = bool(job["with_iacn"])
        res, plan = plan_tables(spec, topo, options, with_iacn)  # deterministic: same plan on every rank
        tables = spec.tables(with_iacn)
        module = build_module(spec, with_iacn, options.optimizer)
        sharders = sharders_for(spec)
        gen = torch.Generator().manual_seed(int(job["seed"]) * 1000 + rank)
        n_steps, warmup, B = int(job["steps"]), int(job["warmup"]), options.batch_size
        by_module = [[t for t in tables if t.module == m] for m in MODULES]
        batches = [tuple(random_kjt(ts, B, gen) if ts else None for ts in by_module)
                   for _ in range(n_steps + warmup)]
        rss0 = _rss_bytes()
        dmp = DistributedModelParallel(
            module,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=torch.device("cpu"),
            plan=plan,
            sharders=sharders,
        )
        rss1 = _rss_bytes()
        weights = sum(_tensor_bytes(v) for k, v in dmp.state_dict().items() if k.endswith("weight"))
        opt_state = _tensor_bytes(dmp.fused_optimizer.state_dict().get("state", {}))

        def step(orig_kjt: KeyedJaggedTensor, aux_kjt: KeyedJaggedTensor | None,
                 user_kjt: KeyedJaggedTensor | None) -> None:
            out = dmp(orig_kjt, aux_kjt, user_kjt)
            loss = torch.zeros(())
            for part in out.values():
                vals = part.values()  # KeyedTensor -> Tensor [B, ΣD]; dict -> JaggedTensors
                if isinstance(vals, torch.Tensor):
                    loss = loss + vals.sum()
                else:
                    loss = loss + sum(jt.values().sum() for jt in vals)
            loss.backward()  # the fused optimizer updates the tables inside backward

        for b in batches[:warmup]:
            step(*b)
        dist.barrier()
        times = []
        for b in batches[warmup:]:
            t0 = time.perf_counter()
            step(*b)
            times.append((time.perf_counter() - t0) * 1000)
        rss2 = _rss_bytes()
        times.sort()
        out = {
            "rank": rank,
            "planned_state_bytes": sum(
                sum(_shard_state_bytes(options, size)) for size in _rank_shards(plan, rank)
            ),
            "planned_ddr_bytes": res.rank_ddr[rank],
            "planned_perf_ms": res.rank_total[rank],
            "measured_weight_bytes": weights,
            "measured_optimizer_bytes": opt_state,
            "rss_delta_shard_bytes": rss1 - rss0,
            "rss_delta_total_bytes": rss2 - rss0,
            "step_ms_median": statistics.median(times),
            "step_ms_min": times[0],
        }
        if rank == 0:
            out["plan"] = res.to_dict(per_rank=True)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rank_shards(plan: ShardingPlan, rank: int) -> list[list[int]]:
    """Sizes [rows, cols] of the shards ``plan`` places on ``rank`` (model-parallel tables only)."""
    return [
        list(sh.shard_sizes)
        for mod_plan in plan.plan.values()
        for ps in mod_plan.values()
        if ps.sharding_spec is not None
        for sh in ps.sharding_spec.shards
        if sh.placement.rank() == rank
    ]


def measure_sharded_embeddings(
    spec: ModelSpec,
    with_iacn: bool,
    world_size: int,
    options: PlanOptions,
    steps: int = 10,
    warmup: int = 3,
    seed: int = 0,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Shard the tables on ``world_size`` CPU ranks (gloo, spawned) with the planner's CPU-topology plan.

    Each rank reports the plan's state bytes and perf estimate for itself next to what it measured:
    the sharded weights + fused optimizer state (from DMP's state dicts), the process RSS growth
    while sharding (and after the steps), and the forward+backward time of the sharded collections
    on random KJTs (median of ``steps`` after ``warmup``). Returns one dict per rank.
    """
    import torch.multiprocessing as mp

    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    topo = TopologySpec(
        world_size=world_size,
        local_world_size=world_size,
        compute_device="cpu",
        ddr_gib=mem_total / world_size / GIB,
    )
    job = {
        "spec": dataclasses.asdict(spec),
        "options": {**dataclasses.asdict(options), "sharding_types": options.sharding_types},
        "topology": dataclasses.asdict(topo),
        "with_iacn": with_iacn,
        "steps": steps,
        "warmup": warmup,
        "seed": seed,
        "threads": threads,
    }
    with tempfile.TemporaryDirectory() as d:
        from iacn_torchrec.distributed.testing import free_port

        mp.spawn(_measure_worker, args=(world_size, free_port(), job, d), nprocs=world_size, join=True)
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world_size)]
