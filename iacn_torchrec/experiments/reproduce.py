"""Reproduce the paper's experiments on a prepared dataset: Table 1, Table 2 and the δ sweep.

Examples::

    iacn reproduce                                   # embedded Beauty, 5 seeds, all three parts
    iacn reproduce --seeds 3 --epochs 1 --only table1
    iacn reproduce --only table2 --seeds 2           # DIEN vs DIEN+IaCN at history length 10/20/50
    iacn reproduce --only variants --variant lam0.1:iacn.lam=0.1 --variant aux6:iacn.aux_dim=6
    iacn reproduce --data DIR --max-steps 20 --seeds 2 --out runs/smoke --results /tmp/smoke

Every training run is one directory ``OUT/<model>-L<len>-<arm>-s<seed>/`` whose ``metrics.json`` is
the unit of work: a run whose metrics.json exists with the same configuration and dataset (its
content hash, wherever the dataset now sits) is skipped, so an interrupted reproduction resumes where
it stopped (an unfinished run restarts from its last checkpoint, see ``--checkpoint-every``). A run
that fails (a non-finite loss, say) is named and left out of the tables; the others still train, the
tables are written, the command exits 1, and the next call tries the failed run again. Runs shared by
several tables (DIEN+IaCN at δ = 0.3 and length 20 is in all three) are trained once.

Arms are paired by seed (DESIGN.md, "Measuring"): the same seed gives every arm the same data
order, the same user and E_orig tables (a keep-width arm's E_orig is narrower: there the user table)
and the same initial value of every main-model parameter whose shape does not depend on the aux
width (see ``build_model``): all of them at the plain width; at the paper's width the layers that
read E_orig ⊕ E_aux are wider and drawn apart. IaCN arms and their λ = 0 / δ = 1 controls share
every draw.
Lifts are reported as mean ± SD of per-seed differences (and the unpaired difference of means),
with a two-sided paired t-test at 95 % against the seed noise.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import shutil
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from iacn_torchrec.errors import UserError
from iacn_torchrec.fileio import json_safe, release_lock, save_figure, try_lock, write_atomic
from iacn_torchrec.runtime import command_line

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RAW = REPO / "data" / "amazon-beauty"
DEFAULT_DATA = REPO / "prepared" / "amazon-beauty-din-L20-s0"
PARTS = ("table1", "table2", "delta", "variants")
class ReproduceError(UserError, ValueError):
    """Bad arguments or inputs of ``iacn reproduce`` (one line, exit status 2, through the CLI)."""


#: what the arms set themselves (alone / IaCN / the δ=1, λ=0 control / the δ sweep)
ARM_FIELDS = ("iacn.enabled", "iacn.delta", "iacn.lam")
TABLE1_MODELS = ("din", "wide_deep", "dien")
MODEL_LABELS = {"din": "DIN", "wide_deep": "Wide&Deep", "dien": "DIEN", "dlrm": "DLRM"}
PAPER_DELTA, PAPER_LAM = 0.3, 1.0

# two-sided 95 % critical values of Student's t, by degrees of freedom (no scipy in the stack)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_critical(df: int) -> float:
    """Two-sided 95 % critical t for ``df`` degrees of freedom (the table's value at the largest
    tabulated df ≤ ``df``: conservative between entries, and 2.042 (df 30) beyond the table)."""
    if df < 1:
        return math.inf
    return _T975[max(k for k in _T975 if k <= df)]


# ============================================================================== the experiment plan
@dataclass(frozen=True)
class Arm:
    """One configuration of the IaCN task. ``iacn`` None = the plain main model."""

    key: str  # part of the run id; equal keys mean the same training run
    label: str
    delta: float | None = None
    lam: float | None = None
    sets: tuple[str, ...] = ()  # extra ``section.field=value`` overrides (variants)

    @property
    def enabled(self) -> bool:
        return self.delta is not None


BASE = Arm("base", "alone")
IACN = Arm(f"iacn-d{PAPER_DELTA:g}-l{PAPER_LAM:g}", f"+ IaCN (δ={PAPER_DELTA:g}, λ={PAPER_LAM:g})",
           PAPER_DELTA, PAPER_LAM)
# δ = 1 gives E_aux no IaCN gradient: with λ = 0 IaCN is not even run (identical main model, cheaper)
CONTROL = Arm("iacn-d1-l0", "control (aux table, δ=1, λ=0)", 1.0, 0.0)


def delta_arm(delta: float) -> Arm:
    if delta == 1.0:
        return CONTROL  # the same main model as δ=1, λ=1 (IaCN's gradient into E_aux is 0 either way)
    if delta == PAPER_DELTA:
        return IACN
    return Arm(f"iacn-d{delta:g}-l{PAPER_LAM:g}", f"δ={delta:g}", delta, PAPER_LAM)


def variant_arm(spec: str) -> Arm:
    """``NAME:section.field=value[,section.field=value...]`` → an IaCN arm (δ 0.3, λ 1 + overrides)."""
    name, sep, rest = spec.partition(":")
    sets = tuple(s.strip() for s in rest.split(",") if s.strip())
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or not sets or any("=" not in s for s in sets):
        raise ReproduceError(f"--variant {spec!r}: expected NAME:section.field=value[,...] "
                         "(NAME of letters, digits, . _ + -)")
    other = [s for s in sets if not s.startswith("iacn.")]
    if other:  # the alone arm a variant is paired with has no IaCN, so only IaCN's settings pair cleanly
        raise ReproduceError(f"--variant {spec!r}: {other} is not an IaCN setting (iacn.*); a "
                         "variant is paired against the model alone, which would not get it: use --set for "
                         "settings of every arm")
    return Arm(f"var-{name}", f"IaCN {name} ({', '.join(sets)})", PAPER_DELTA, PAPER_LAM, sets)


@dataclass
class Run:
    run_id: str
    model: str
    max_len: int
    arm: Arm
    seed: int
    data: Path
    parts: set[str] = field(default_factory=set)


def _seeds(n: int) -> list[int]:
    return list(range(n))


def build_plan(args: argparse.Namespace, datasets: dict[int, Path], base_len: int) -> list[Run]:
    """Every run of the selected parts, deduplicated by run id, in a seed-major order (so an
    interrupted reproduction has balanced arms)."""
    runs: dict[str, Run] = {}
    parts = set(args.only or [p for p in PARTS if p != "variants" or args.variant])

    def add(part: str, model: str, L: int, arm: Arm, seed: int) -> None:
        rid = f"{model}-L{L}-{arm.key}-s{seed}"
        if rid not in runs:
            runs[rid] = Run(rid, model, L, arm, seed, datasets[L])
        runs[rid].parts.add(part)

    for seed in range(max(args.seeds, args.table2_seeds or 0, args.delta_seeds or 0)):
        if "table1" in parts and seed < args.seeds:
            for model in args.models:
                for arm in (BASE, IACN, CONTROL):
                    add("table1", model, base_len, arm, seed)
        if "table2" in parts and seed < (args.table2_seeds or args.seeds):
            for L in args.lengths:
                for arm in (BASE, IACN, CONTROL):
                    add("table2", args.sweep_model, L, arm, seed)
        if "delta" in parts and seed < (args.delta_seeds or args.seeds):
            add("delta", args.sweep_model, base_len, BASE, seed)
            for d in args.deltas:
                add("delta", args.sweep_model, base_len, delta_arm(d), seed)
        if "variants" in parts and seed < args.seeds:
            for model in args.variant_models:
                for arm in (BASE, IACN, CONTROL):  # the reference arms (shared with Table 1)
                    add("variants", model, base_len, arm, seed)
                for spec in args.variant:
                    add("variants", model, base_len, variant_arm(spec), seed)
    return list(runs.values())


# ======================================================================================= datasets
def _raw_tsv(raw: Path, stem: str) -> Path:
    for name in (f"{stem}.tsv.gz", f"{stem}.tsv"):
        if (raw / name).exists():
            return raw / name
    raise ReproduceError(f"{raw} has no {stem}.tsv(.gz)")


def ensure_default_data(path: Path, raw: Path = DEFAULT_RAW, progress: bool = False) -> Path:
    """The embedded Beauty data prepared (din protocol, L 20, seed 0) when ``path`` does not hold it.

    A prepared dataset of ours at ``path`` that cannot be opened (older format, damaged arrays) is
    rebuilt; any other non-empty folder there is refused (with the data pipeline's error), never
    replaced."""
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.data.prepare import prepare_dataset

    try:
        PreparedDataset.open(path)
        print(f"using prepared data in {path}", flush=True)
        return path
    except Exception:  # noqa: BLE001 - not there (or a broken dataset of ours): build it
        print(f"preparing the embedded Beauty data into {path}", flush=True)
        return prepare_dataset("tsv", interactions=_raw_tsv(raw, "interactions"),
                               items=_raw_tsv(raw, "items"), protocol="din", max_len=20, seed=0, out=path,
                               overwrite=True, progress=progress)


def dataset_at_length(base: Path, max_len: int) -> Path:
    """``base`` re-prepared from its raw source (recorded in meta.json) with histories of at most
    ``max_len``; kept beside ``base`` (``...-L<max_len>...``) and reused when it exists."""
    from iacn_torchrec.data.prepare import prepare_dataset
    from iacn_torchrec.data.store import read_meta

    meta = read_meta(base)
    if int(meta["max_len"]) == max_len:
        return base

    # what the length cannot change (DIEN's prebuilt files without vocabularies take items and
    # categories from the histories they keep, so those counts may shrink with L)
    samples = ("users", "train_samples", "train_positives", "test_samples", "test_positives")

    def same_data(m: dict[str, Any]) -> bool:
        return all((m.get("counts") or {}).get(k) == (meta.get("counts") or {}).get(k) for k in samples)

    name = re.sub(r"-L\d+", f"-L{max_len}", base.name) if re.search(r"-L\d+", base.name) \
        else f"{base.name}-L{max_len}"
    target = base.parent / name
    if target.exists():
        try:
            m = read_meta(target)
            if (m["source"], m["protocol"], int(m["max_len"]), m["seed"]) == (
                    meta["source"], meta["protocol"], max_len, meta["seed"]) and same_data(m):
                return target
        except Exception:  # noqa: BLE001 - unreadable: rebuild below
            pass
    src = meta["source"]
    files = {k: Path(v) for k, v in (src.get("files") or {}).items()}
    kind = src["type"]
    kwargs: dict[str, Any] = {}
    if kind == "tsv":
        kwargs = {"interactions": files.get("interactions"), "items": files.get("items"),
                  "category_column": src.get("category_column")}
    elif kind == "amazon-json":
        kwargs = {"reviews": files.get("reviews"), "meta": files.get("meta")}
    elif files:
        kwargs = {"path": next(iter(files.values())).parent}
        if kind == "movielens":
            # datasets prepared before the column was checked recorded tsv's default here
            col = src.get("category_column")
            kwargs["category_column"] = None if col == "cate_leaf" else col
    yourself = (f"prepare it yourself into {target} (`iacn prepare` with the same source, --protocol "
                f"{meta.get('protocol_requested', meta['protocol'])}, --seed {meta['seed']} and --max-len "
                f"{max_len}), or run from the directory {base} was prepared in")
    missing = [str(p) for p in kwargs.values() if isinstance(p, Path) and not p.exists()]
    if not kwargs or missing:
        raise ReproduceError(f"cannot re-prepare {base} at max_len {max_len}: its raw source "
                             f"{missing or src} is not available (relative paths are read from the current "
                             f"directory); {yourself}")
    print(f"preparing {target} (max_len {max_len}) from {kind} source", flush=True)
    protocol = meta.get("protocol_requested", meta["protocol"])
    out = prepare_dataset(kind, protocol=protocol, max_len=max_len, seed=int(meta["seed"]), out=target,
                          overwrite=True, progress=False, **kwargs)
    got = read_meta(out)
    if not same_data(got):  # relative paths read from another directory: other raw files
        import shutil

        shutil.rmtree(out)
        raise ReproduceError(
            f"re-preparing {base} at max_len {max_len} from {[str(p) for p in kwargs.values() if p]} gave "
            f"other samples (counts {got.get('counts')} against {meta.get('counts')}): those files are not "
            f"the ones {base} was prepared from; {yourself}")
    return out


# ========================================================================================= running
_RUN_CONTROL = ("out", "progress", "resume", "threads", "log_every", "checkpoint_every", "eval_every")


def comparable(config: dict[str, Any]) -> str:
    """What must match for a finished run to count: the config minus run-control fields.

    The stored config is read through ``TrainConfig.from_dict`` first, so a field added to the
    config since the run was trained counts at its default (the behaviour the run had), except
    ``model.dien_hidden``, compared as the hidden size DIEN actually had, and the fields
    :func:`~iacn_torchrec.train.config.stored_config` reads as the run was trained (``model.main``,
    a changed default such as ``data.dien_negatives``, which counts for DIEN only)."""
    from iacn_torchrec.train.config import DIEN_ONLY, ConfigError, TrainConfig, resolved_main, stored_config

    legacy_dien = "dien_hidden" not in config.get("model", {})
    config = stored_config(config)  # as the run was trained: legacy defaults, its main model
    if isinstance(config.get("model"), dict):  # every field of that main model
        model = config["model"]
        config = {**config, "model": {**model, "main": resolved_main(model.get("name"), model["main"])}}
    try:
        config = TrainConfig.from_dict(json.loads(json.dumps(config, default=str))).to_dict()
    except (ConfigError, TypeError, ValueError):
        pass  # a removed field or a bad value: compared as stored, so it does not match
    d = json.loads(json.dumps(config, default=str))
    model, iacn = d.get("model", {}), d.get("iacn", {})
    if model.get("name") != "dien":
        for name in DIEN_ONLY:  # read by DIEN only
            section, field = name.split(".")
            d.get(section, {}).pop(field, None)
    elif model.get("dien_hidden") is None and isinstance(model.get("emb_dim"), int):
        # None is 2·emb_dim; runs stored before the field existed had the GRU at the item width
        # 2·(emb_dim + aux_dim) (IaCN widened it)
        aux = iacn.get("aux_dim", 0) if legacy_dien and iacn.get("enabled") else 0
        model["dien_hidden"] = 2 * (model["emb_dim"] + aux)
    for k in _RUN_CONTROL:
        d.pop(k, None)
    d.get("data", {}).pop("eval_batch_size", None)
    d.get("data", {}).pop("path", None)  # where the dataset sits: finished() compares its content hash
    return json.dumps(d, sort_keys=True)


def model_sets(sets: list[str], model: str) -> list[str]:
    """The ``--set`` overrides of ``model``'s runs: ``SECTION.FIELD=VALUE`` applies to every run,
    ``MODEL:SECTION.FIELD=VALUE`` to that model's only (``din:model.main.att_activation=sigmoid``)."""
    out = []
    for s in sets:
        key, eq, value = s.partition("=")
        only, colon, field = key.partition(":")
        if not colon:
            out.append(s)
            continue
        if only.strip() not in MODEL_LABELS:
            raise ReproduceError(f"--set {s!r}: {only.strip()!r} is not a model; use "
                                 f"MODEL:SECTION.FIELD=VALUE with MODEL one of {', '.join(MODEL_LABELS)}, "
                                 "or SECTION.FIELD=VALUE for every run")
        if only.strip() == model:
            out.append(field + eq + value)
    return out


def make_config(args: argparse.Namespace, run: Run, out: Path):
    from iacn_torchrec.modules.iacn import IaCNConfig
    from iacn_torchrec.train.config import DataConfig, ModelConfig, TrainConfig

    iacn = IaCNConfig(enabled=run.arm.enabled)
    if run.arm.enabled:
        iacn = IaCNConfig(enabled=True, delta=run.arm.delta, lam=run.arm.lam)
    cfg = TrainConfig(
        data=DataConfig(path=str(run.data), batch_size=args.batch_size),
        model=ModelConfig(name=run.model),
        iacn=iacn,
        out=str(out / run.run_id),
        epochs=args.epochs,
        max_steps=args.max_steps,
        seed=run.seed,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        progress=args.progress,
        resume=True,
    )
    sets = model_sets(args.set, run.model) + list(run.arm.sets)
    cfg = cfg.override(sets) if sets else cfg
    pins = cfg.distributed.sharding_types
    if not cfg.iacn.enabled and any(t.endswith("_aux") for t in pins):
        # a --set pin of an aux table is for the IaCN arms: the model alone has no such table
        kept = {t: st for t, st in pins.items() if not t.endswith("_aux")}
        cfg = replace(cfg, distributed=replace(cfg.distributed, sharding_types=kept))
    return cfg


def finished(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The run's metrics when ``run_dir/metrics.json`` exists with a matching configuration and was
    trained on the dataset now at the config's data path (its content hash: a dataset prepared
    again at the same path is other data)."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(m, dict):
        return None
    if isinstance(m.get("test"), dict):  # metrics.json writes an undefined figure (NaN) as null
        m["test"] = {k: math.nan if v is None else v for k, v in m["test"].items()}
    if comparable(m.get("config", {})) != comparable(config):
        return None
    trained_on, now = (m.get("dataset") or {}).get("content_hash"), _content_hash(config)
    # (a run without a recorded hash, or no dataset at the path now, e.g. --no-train elsewhere:
    # nothing to compare)
    return m if trained_on is None or now is None or trained_on == now else None


def _content_hash(config: dict[str, Any]) -> str | None:
    from iacn_torchrec.data.store import read_meta

    try:
        return read_meta(config.get("data", {}).get("path", "")).get("content_hash")
    except UserError:  # no dataset there
        return None


#: this process's held run locks: lock path → open descriptor (the flock lives as long as it does)
_HELD: dict[Path, int] = {}


def _lock(out: Path, run_id: str) -> bool:
    """Claim ``run_id`` for this process, so several ``iacn reproduce`` processes can share one OUT:
    an exclusive :func:`~iacn_torchrec.fileio.try_lock` on ``OUT/<run_id>.lock``. Returns False
    while another process holds it."""
    path = out / f"{run_id}.lock"
    if path in _HELD:
        return True
    out.mkdir(parents=True, exist_ok=True)
    fd = try_lock(path)
    if fd is None:
        return False
    _HELD[path] = fd
    return True


def _unlock(out: Path, run_id: str) -> None:
    """Release a lock taken by :func:`_lock`."""
    path = out / f"{run_id}.lock"
    fd = _HELD.pop(path, None)
    if fd is not None:
        release_lock(path, fd)


POLL_S = 10.0  # how often a deferred run's lock is looked at again


def _wait(seconds: float) -> None:
    time.sleep(seconds)


def execute(
    args: argparse.Namespace, plan: list[Run], out: Path
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Trains every run of ``plan`` not finished yet; returns (run id → metrics of the finished runs,
    run id → error of the runs that failed here).

    Runs another process is training (live lock) are deferred, then awaited (or trained here if
    that process dies). A configuration error (`UserError`) stops everything: every run would
    repeat it."""
    from iacn_torchrec.train.checkpoint import CheckpointError
    from iacn_torchrec.train.loop import train

    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    todo = []
    for run in plan:
        cfg = make_config(args, run, out)
        m = finished(Path(cfg.out), cfg.to_dict())
        if m is not None:
            results[run.run_id] = m
        else:
            todo.append((run, cfg))
    print(f"reproduce: {len(plan)} runs planned, {len(results)} already finished, {len(todo)} to train "
          f"-> {out}", flush=True)
    walls: list[float] = []
    total, done = len(todo), 0
    while todo:
        deferred = []
        for run, cfg in todo:
            run_dir = Path(cfg.out)
            m = finished(run_dir, cfg.to_dict())  # another process may have finished it meanwhile
            if m is not None:
                results[run.run_id] = m
                done += 1
                continue
            if not _lock(out, run.run_id):
                deferred.append((run, cfg))
                continue
            # Its trainer may have finished and unlocked between the check above and our lock:
            # look again, or its metrics.json would be taken for another configuration's.
            m = finished(run_dir, cfg.to_dict())
            if m is not None:
                _unlock(out, run.run_id)
                results[run.run_id] = m
                done += 1
                continue
            try:
                if (run_dir / "metrics.json").exists():  # kept aside, never deleted
                    stem = out / "_stale" / f"{run.run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
                    stem.parent.mkdir(exist_ok=True)
                    stale, k = stem, 1
                    while stale.exists():
                        stale, k = stem.with_name(f"{stem.name}-{k}"), k + 1
                    print(f"  {run.run_id}: metrics.json has another configuration or dataset; moved "
                          f"to {stale}, retraining", flush=True)
                    run_dir.rename(stale)
                eta = f", eta {statistics.mean(walls) * (total - done) / 60:.0f} min" if walls else ""
                print(f"[{done + 1}/{total}] {run.run_id} "
                      f"({', '.join(sorted(run.parts))}){eta}", flush=True)
                t0 = time.perf_counter()
                try:
                    try:
                        result = train(cfg)
                    except CheckpointError as e:  # another configuration's (or a damaged) checkpoint
                        print(f"  {run.run_id}: {e}; retraining from scratch", flush=True)
                        shutil.rmtree(run_dir)
                        result = train(cfg)
                except UserError:
                    raise
                except Exception as e:  # this run's own failure (a non-finite loss): not the others'
                    failures[run.run_id] = f"{type(e).__name__}: {e}"
                    print(f"  {run.run_id} failed: {failures[run.run_id]}; left out of the tables "
                          "(the next call tries it again)", flush=True)
                    done += 1
                    continue
                wall = time.perf_counter() - t0
                write_atomic(run_dir / "reproduce_run.json", json.dumps({"wall_s": wall}))
                if not args.keep_checkpoints:
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            finally:
                _unlock(out, run.run_id)
            walls.append(wall)
            done += 1
            results[run.run_id] = result
            print(f"    test AUC {result['test']['auc']:.4f}  ({wall:.0f} s, "
                  f"{result['train_samples_per_s']:,.0f} samples/s)", flush=True)
        if deferred:
            print(f"  waiting for {len(deferred)} run(s) another process is training: "
                  f"{', '.join(r.run_id for r, _ in deferred[:4])}{' ...' if len(deferred) > 4 else ''}",
                  flush=True)
            _wait(POLL_S)
        todo = deferred
    return results, failures


# ======================================================================================= statistics
def mean_sd(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


@dataclass
class Paired:
    """Per-seed differences ``a − b`` over the seeds both arms finished."""

    n: int
    mean: float
    sd: float
    unpaired: float  # mean(a) − mean(b) over all finished seeds of each arm
    t: float

    @property
    def significant(self) -> bool:
        # t is ±inf when every seed's difference is the same non-zero value: as consistent as it gets
        return self.n >= 2 and not math.isnan(self.t) and abs(self.t) > t_critical(self.n - 1)

    def verdict(self) -> str:
        if self.n < 2:
            return "n < 2 seeds: no test"
        crit = t_critical(self.n - 1)
        word = ("yes, above" if self.mean > 0 else "yes, below") if self.significant else "no"
        return f"{word} (t = {self.t:+.2f}; 95 % needs ±{crit:.2f})"


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    common = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in common]
    m, sd = mean_sd(diffs)
    unpaired = statistics.fmean(a.values()) - statistics.fmean(b.values()) if a and b else math.nan
    if len(diffs) >= 2:
        t = m / (sd / math.sqrt(len(diffs))) if sd > 0 else (math.copysign(math.inf, m) if m else 0.0)
    else:
        t = math.nan
    return Paired(len(diffs), m, sd, unpaired, t)


def fmt(m: float, sd: float, n: int | None = None) -> str:
    if math.isnan(m):
        return "–"
    s = f"{m:.4f}" + (f" ± {sd:.4f}" if not math.isnan(sd) else "")
    return s + (f" (n={n})" if n is not None else "")


def _cell(aucs_by_seed: dict[int, float]) -> str:
    return fmt(*mean_sd(list(aucs_by_seed.values())), len(aucs_by_seed))


def _sd0(sd: float) -> float:
    return 0.0 if math.isnan(sd) else sd


def fmt_lift(p: Paired) -> str:
    if p.n == 0:
        return "–"
    sd = f" ± {p.sd:.4f}" if not math.isnan(p.sd) else ""
    return f"{p.mean:+.4f}{sd} (unpaired {p.unpaired:+.4f})"


# ========================================================================================== writing
def aucs(
    results: dict[str, dict[str, Any]], runs: Iterable[Run], model: str, L: int, arm: Arm
) -> dict[int, float]:
    return {r.seed: float(results[r.run_id]["test"]["auc"]) for r in runs
            if r.model == model and r.max_len == L and r.arm.key == arm.key and r.run_id in results}


def _sources_note(done: list[dict[str, Any]]) -> str:
    """``"; the runs' library sources: A (60 runs), B (30 runs)"`` when the runs were trained by more
    than one version of the library (``versions.iacn_torchrec_source``), else ``""``."""
    counts = collections.Counter(str((m.get("versions") or {}).get("iacn_torchrec_source")) for m in done)
    if len(counts) < 2:
        return ""
    return "; the runs' library sources: " + ", ".join(f"{s} ({n} runs)" for s, n in counts.most_common())


def _header(title: str, args: argparse.Namespace, part_runs: list[Run], results: dict[str, dict[str, Any]],
            out: Path, notes: list[str]) -> list[str]:
    done = [results[r.run_id] for r in part_runs if r.run_id in results]
    wall = 0.0
    for r in part_runs:
        p = out / r.run_id / "reproduce_run.json"
        if p.exists():
            wall += json.loads(p.read_text())["wall_s"]
    first = done[0] if done else {}
    cfg = dict(first.get("config", {}))
    ds = first.get("dataset", {})
    sps = [m["train_samples_per_s"] for m in done]
    lines = [
        f"# {title}",
        "",
        f"Produced by `{args.command_line}` (run directories under `{_rel(out)}`).",
        "",
        f"- Dataset: `{_rel(Path(cfg.get('data', {}).get('path', '?')))}` — protocol {ds.get('protocol')}, "
        f"max_len {ds.get('max_len')}, counts {json.dumps(ds.get('counts'))}, "
        f"content {ds.get('content_hash')}",
        f"- Runs: {len(done)} of {len(part_runs)} finished; epochs {args.epochs}, "
        f"max_steps {args.max_steps}, batch size {args.batch_size}, threads {args.threads}; "
        f"extra overrides: {list(args.set) or 'none'}",
        f"- Wall time of these runs (training + evaluation, summed): {wall / 60:.1f} min; "
        f"training throughput median {statistics.median(sps) if sps else math.nan:,.0f} samples/s",
        f"- Versions: {json.dumps(first.get('versions', {}))}" + _sources_note(done),
        "- Paired by seed: same seed ⇒ same data order, the same user and E_orig tables (keep-width "
        "arms: the user table) and the same initial value of every main-model parameter whose shape "
        "does not depend on the aux width in every arm (all of them at the plain width; at the "
        "paper's width the layers that read E_orig ⊕ E_aux are wider and drawn apart); IaCN and its "
        "λ = 0 / δ = 1 control share every draw. Lift = "
        "mean ± SD of per-seed differences (unpaired difference of means in brackets); \"beyond seed "
        "noise?\" is a two-sided paired t-test at 95 %.",
        *notes,
        "",
    ]
    return lines


def _config_block(results: dict[str, dict[str, Any]], part_runs: list[Run]) -> list[str]:
    for r in part_runs:
        if r.run_id in results and r.arm.enabled and not r.arm.sets:
            cfg = results[r.run_id]["config"]
            import yaml

            return ["<details><summary>Full configuration of one IaCN run "
                    f"({r.run_id}); other arms differ only as stated</summary>", "", "```yaml",
                    yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "</details>", ""]
    return []


def _length_datasets(results: dict[str, dict[str, Any]], part_runs: list[Run]) -> list[str]:
    """One line per history length: the dataset its runs read (the header shows the first only)."""
    seen: dict[int, str] = {}
    for r in sorted(part_runs, key=lambda r: r.max_len):
        if r.run_id in results and r.max_len not in seen:
            m = results[r.run_id]
            seen[r.max_len] = (f"  - L = {r.max_len}: `{_rel(Path(m['config']['data']['path']))}`, content "
                               f"{m.get('dataset', {}).get('content_hash')}")
    return ["- Datasets by length:", *seen.values()] if seen else []


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def _per_seed_table(results, runs: list[Run]) -> list[str]:
    lines = ["| run | seed | test AUC | GAUC | logloss | train samples/s |", "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r.model, r.max_len, r.arm.key, r.seed)):
        if r.run_id in results:
            m = results[r.run_id]
            t = m["test"]
            lines.append(f"| {r.model}-L{r.max_len}-{r.arm.key} | {r.seed} | {t['auc']:.4f} | "
                         f"{t.get('gauc', math.nan):.4f} | {t.get('logloss', math.nan):.4f} | "
                         f"{m['train_samples_per_s']:,.0f} |")
    return ["<details><summary>Every run</summary>", "", *lines, "", "</details>", ""]


def write_table1(args, plan, results, out: Path, res_dir: Path, base_len: int) -> dict[str, Any]:
    runs = [r for r in plan if "table1" in r.parts]
    rows, summary = [], {}
    for model in args.models:
        a = {arm.key: aucs(results, runs, model, base_len, arm) for arm in (BASE, IACN, CONTROL)}
        lift, vs_ctrl = paired(a[IACN.key], a[BASE.key]), paired(a[IACN.key], a[CONTROL.key])
        cells = [fmt(*mean_sd(list(a[k].values())), len(a[k])) for k in (BASE.key, IACN.key, CONTROL.key)]
        rows.append(f"| {MODEL_LABELS.get(model, model)} | {' | '.join(cells)} | {fmt_lift(lift)} | "
                    f"{lift.verdict()} | {fmt_lift(vs_ctrl)} | {vs_ctrl.verdict()} |")
        summary[model] = {"auc": dict(a), "lift": vars(lift), "lift_vs_control": vars(vs_ctrl)}
    from iacn_torchrec.modules.iacn import IaCNConfig

    aux = make_config(args, next(r for r in runs if r.arm.key == IACN.key), out).iacn.aux_dim  # after --set
    paper = ", the paper's setting" if aux == IaCNConfig().aux_dim else ""
    lines = _header(f"Table 1 analogue: IaCN on each main model ({args.name})", args, runs, results, out, [
        f"- Arms: alone (no aux table); + IaCN (δ = {PAPER_DELTA:g}, λ = {PAPER_LAM:g}, aux dim {aux} per "
        f"table{paper}); control = the same aux table with δ = 1 and λ = 0 (extra "
        "embedding width trained by the main loss only: capacity-matched, no interest signal)."])
    lines += ["| model | alone | + IaCN | control | lift IaCN − alone | beyond seed noise? | "
              "lift IaCN − control | beyond seed noise? |", "|---|---|---|---|---|---|---|---|", *rows, "",
              "![test AUC per model](table1_auc.png)", ""]
    lines += _per_seed_table(results, runs) + _config_block(results, runs)
    write_atomic(res_dir / "table1.md", "\n".join(lines))
    _plot_table1(args, summary, res_dir / "table1_auc.png")
    return summary


def write_table2(args, plan, results, out: Path, res_dir: Path) -> dict[str, Any]:
    runs = [r for r in plan if "table2" in r.parts]
    m = args.sweep_model
    rows, summary = [], {}
    for L in args.lengths:
        a, b, c = (aucs(results, runs, m, L, arm) for arm in (IACN, BASE, CONTROL))
        p, q = paired(a, b), paired(a, c)
        rows.append(f"| {L} | {_cell(b)} | {_cell(a)} | {_cell(c)} | {fmt_lift(p)} | {p.verdict()} | "
                    f"{fmt_lift(q)} | {q.verdict()} |")
        summary[L] = {"base": b, "iacn": a, "control": c, "lift": vars(p), "lift_vs_control": vars(q)}
    label = MODEL_LABELS.get(m, m)
    lines = _header(f"Table 2 analogue: {label} and {label}+IaCN by maximum history length ({args.name})",
                    args, runs, results, out,
                    [f"- Each length is the dataset re-prepared from its raw source with that max_len (same "
                     f"samples and seed; only the history truncation differs). IaCN: δ = {PAPER_DELTA:g}, "
                     f"λ = {PAPER_LAM:g}; K_max = ceil(log2 L). Control: the same aux table with δ = 1 and "
                     "λ = 0 (the extra width, no interest signal), as in Table 1.",
                     *_length_datasets(results, runs)])
    lines += [f"| max history length | {label} | {label} + IaCN | control | lift IaCN − alone | beyond seed "
              "noise? | lift IaCN − control | beyond seed noise? |",
              "|---|---|---|---|---|---|---|---|", *rows, "",
              "![AUC vs history length](table2_length.png)", ""]
    lines += _per_seed_table(results, runs) + _config_block(results, runs)
    write_atomic(res_dir / "table2.md", "\n".join(lines))
    _plot_lines(summary, [("base", label), ("iacn", f"{label} + IaCN"), ("control", "control (δ=1, λ=0)")],
                "maximum history length",
                res_dir / "table2_length.png", f"{args.name}: {label} by history length")
    return summary


def write_delta(args, plan, results, out: Path, res_dir: Path, base_len: int) -> dict[str, Any]:
    runs = [r for r in plan if "delta" in r.parts]
    m = args.sweep_model
    base = aucs(results, runs, m, base_len, BASE)
    rows, summary = [], {}
    for d in args.deltas:
        a = aucs(results, runs, m, base_len, delta_arm(d))
        p = paired(a, base)
        note = " (control run: λ = 0)" if delta_arm(d) is CONTROL else ""
        rows.append(f"| {d:g}{note} | {_cell(a)} | {fmt_lift(p)} | {p.verdict()} |")
        summary[d] = {"iacn": a, "lift": vars(p)}
    label = MODEL_LABELS.get(m, m)
    lines = _header(f"δ sweep: {label}+IaCN ({args.name})", args, runs, results, out, [
        f"- λ = {PAPER_LAM:g}. δ is the main model's share of the gradient reaching E_aux (1 − δ is IaCN's). "
        "At δ = 1 IaCN's gradient into E_aux is zero, so the λ = 0 control run stands for it (same main "
        "model, IaCN not run)."])
    lines += [f"{label} alone: {fmt(*mean_sd(list(base.values())), len(base))}", "",
              f"| δ | {label} + IaCN | lift vs {label} alone | beyond seed noise? |", "|---|---|---|---|",
              *rows, "", "![AUC vs δ](delta_sweep.png)", ""]
    lines += _per_seed_table(results, runs) + _config_block(results, runs)
    write_atomic(res_dir / "delta.md", "\n".join(lines))
    _plot_delta(args, summary, base, res_dir / "delta_sweep.png")
    return summary


def write_variants(args, plan, results, out: Path, res_dir: Path, base_len: int) -> dict[str, Any]:
    runs = [r for r in plan if "variants" in r.parts]
    rows, summary = [], {}
    for model in args.variant_models:
        base = aucs(results, runs, model, base_len, BASE)
        rows.append(f"| {MODEL_LABELS.get(model, model)} alone | {_cell(base)} | | |")
        for arm in [IACN, CONTROL] + [variant_arm(spec) for spec in args.variant]:
            a = aucs(results, runs, model, base_len, arm)
            p = paired(a, base)
            rows.append(f"| {MODEL_LABELS.get(model, model)} {arm.label} | {_cell(a)} | {fmt_lift(p)} | "
                        f"{p.verdict()} |")
            summary[f"{model}/{arm.key}"] = {"iacn": a, "base": base, "lift": vars(p)}
    lines = _header(f"IaCN variants ({args.name})", args, runs, results, out, [
        f"- Each variant is IaCN at δ = {PAPER_DELTA:g}, λ = {PAPER_LAM:g} plus the IaCN overrides "
        "named (only `iacn.*` settings: the model alone has no IaCN to give them to); lifts are paired "
        "against the model alone with the same seeds."])
    lines += ["| arm | test AUC | lift vs alone | beyond seed noise? |", "|---|---|---|---|", *rows, ""]
    lines += _per_seed_table(results, runs) + _config_block(results, runs)
    write_atomic(res_dir / "variants.md", "\n".join(lines))
    return summary


# =========================================================================================== plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, ylabel: str, title: str) -> None:
    """The plots' common ending: labels, legend, one PNG at 110 dpi, the figure closed."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    _plt().close(fig)


def _plot_table1(args, summary: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    arms = [(BASE.key, "alone"), (IACN.key, f"+ IaCN (δ={PAPER_DELTA:g})"),
            (CONTROL.key, "control (δ=1, λ=0)")]
    w = 0.26
    for j, (key, label) in enumerate(arms):
        xs, ms, sds = [], [], []
        for i, model in enumerate(args.models):
            vals = list(summary[model]["auc"][key].values())
            if not vals:
                continue
            m, sd = mean_sd(vals)
            xs.append(i + (j - 1) * w)
            ms.append(m)
            sds.append(_sd0(sd))
            ax.scatter([i + (j - 1) * w] * len(vals), vals, s=8, color="k", zorder=3)
        ax.bar(xs, ms, w, yerr=sds, capsize=3, label=label)
    allv = [v for s in summary.values() for arm in s["auc"].values() for v in arm.values()]
    if allv:
        ax.set_ylim(min(allv) - 0.01, max(allv) + 0.01)
    ax.set_xticks(range(len(args.models)), [MODEL_LABELS.get(m, m) for m in args.models])
    _save(fig, ax, path, "test AUC (mean ± SD over seeds; dots: seeds)",
          f"{args.name}: IaCN on each main model")


def _plot_lines(
    summary: dict[Any, Any], series: list[tuple[str, str]], xlabel: str, path: Path, title: str
) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(summary)
    for key, label in series:
        pts = [(x, *mean_sd(list(summary[x][key].values()))) for x in xs if summary[x][key]]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[_sd0(p[2]) for p in pts],
                        marker="o", capsize=3, label=label)
    ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    _save(fig, ax, path, "test AUC (mean ± SD over seeds)", title)


def _plot_delta(args, summary: dict[float, Any], base: dict[int, float], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(d, *mean_sd(list(s["iacn"].values()))) for d, s in summary.items() if s["iacn"]]
    label = MODEL_LABELS.get(args.sweep_model, args.sweep_model)
    if pts:
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[_sd0(p[2]) for p in pts],
                    marker="o", capsize=3, label=f"{label} + IaCN")
    if base:
        m, sd = mean_sd(list(base.values()))
        ax.axhline(m, color="gray", ls="--", label=f"{label} alone")
        if not math.isnan(sd):
            ax.axhspan(m - sd, m + sd, color="gray", alpha=0.15)
    ax.set_xlabel("δ (main model's share of the E_aux gradient)")
    _save(fig, ax, path, "test AUC (mean ± SD over seeds)", f"{args.name}: δ sweep")


# ============================================================================================= CLI
def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 2)[2]
    p.add_argument("--data", type=Path, default=None,
                   help=f"prepared dataset (default: the embedded Beauty, {_rel(DEFAULT_DATA)}, "
                   "prepared if missing)")
    p.add_argument("--name", default=None,
                   help="name of the results folder (default: amazon-beauty / the data folder's name)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for Table 1 and variants (default 5)")
    p.add_argument("--table2-seeds", type=int, default=None, help="seeds for Table 2 (default --seeds)")
    p.add_argument("--delta-seeds", type=int, default=None, help="seeds for the δ sweep (default --seeds)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after N steps (smoke runs)")
    p.add_argument("--models", type=_names, default=list(TABLE1_MODELS),
                   help="Table 1 models (default din,wide_deep,dien)")
    p.add_argument("--sweep-model", default="dien", help="model of Table 2 and the δ sweep (default dien)")
    p.add_argument("--lengths", type=_ints, default=[10, 20, 50],
                   help="Table 2 history lengths (default 10,20,50)")
    p.add_argument("--deltas", type=_floats, default=[round(0.1 * i, 1) for i in range(1, 11)],
                   help="δ values of the sweep (default 0.1,...,1.0)")
    p.add_argument("--only", action="append", choices=PARTS,
                   help="run and write only this part (repeatable; default: all, variants when given)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:SECTION.FIELD=VALUE[,...]",
                   help="an extra IaCN arm (δ 0.3, λ 1 plus these overrides) paired against the model alone")
    p.add_argument("--variant-models", type=_names, default=["dien"],
                   help="models of the variants (default dien)")
    p.add_argument("--set", action="append", default=[], metavar="[MODEL:]SECTION.FIELD=VALUE",
                   help="override a config field in every run (e.g. optim.lr=0.002), or in one model's runs "
                        "(e.g. din:model.main.att_activation=sigmoid)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: on a shared 2-core box 2 threads ran DIN up to 10x"
                   " slower from oversubscription)")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="checkpoint every N steps: an interrupted run resumes mid-epoch "
                        "(0: at each epoch's end)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's checkpoints")
    p.add_argument("--progress", action="store_true", default=sys.stderr.isatty(),
                   help="per-run progress bars (default: on a terminal)")
    p.add_argument("--out", type=Path, default=None, help="run directories (default runs/reproduce/<name>)")
    p.add_argument("--results", type=Path, default=None,
                   help="tables and plots (default docs/results/<name>)")
    p.add_argument("--no-train", action="store_true", help="only rewrite tables and plots from finished runs")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    args.command_line = args.command_line or command_line()
    if args.seeds < 1:
        raise ReproduceError("--seeds must be >= 1")
    for m in list(args.models) + [args.sweep_model] + list(args.variant_models):
        if m not in MODEL_LABELS:
            raise ReproduceError(f"unknown model {m!r}; choose from {', '.join(MODEL_LABELS)}")
    for d in args.deltas:
        if not 0.0 <= d <= 1.0:
            raise ReproduceError(f"--deltas: δ={d} is not in [0, 1]")
    model_sets(args.set, "")  # a model prefix is checked here, before any run, and ...
    # ... an arm field refused with or without one
    arm_keys = [s for s in args.set if s.split("=", 1)[0].split(":")[-1].strip() in ARM_FIELDS]
    if arm_keys:
        raise ReproduceError(f"--set {arm_keys}: the arms define {', '.join(ARM_FIELDS)} "
                         "(a global value would make every arm the same run under different names); use "
                         "--deltas, or --variant NAME:iacn.field=value for other IaCN settings")
    names = [variant_arm(spec).key for spec in args.variant]
    if len(set(names)) != len(names):
        raise ReproduceError(f"--variant names must differ, got {[n[4:] for n in names]}")
    for name in ("table2_seeds", "delta_seeds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ReproduceError(f"--{name.replace('_', '-')} must be >= 1 (omit it for --seeds)")
    # every run's settings, checked as TrainConfig checks them, before any dataset is prepared or any
    # run trained
    from iacn_torchrec.train.config import ConfigError, TrainConfig

    for flag, name, value in (("--epochs", "epochs", args.epochs), ("--threads", "threads", args.threads),
                               ("--max-steps", "max_steps", args.max_steps),
                               ("--checkpoint-every", "checkpoint_every", args.checkpoint_every),
                               ("--batch-size", "data.batch_size", args.batch_size)):
        try:
            TrainConfig().override([f"{name}={json.dumps(value)}"])
        except ConfigError as e:
            raise ReproduceError(f"{flag}: {e}") from None
    from iacn_torchrec.data.store import MAX_LEN_LIMIT

    bad = [L for L in args.lengths if not 1 <= L <= MAX_LEN_LIMIT]
    if bad:
        raise ReproduceError(f"--lengths must be in [1, {MAX_LEN_LIMIT:,}], got {bad}")
    if args.max_steps is not None and (args.results is None or args.out is None):
        # the defaults hold the published runs and tables: a smoke run must not replace them (its
        # runs would push the published ones to _stale, or resume their checkpoints)
        raise ReproduceError("--max-steps makes a smoke run; pass --out DIR and --results DIR "
                             f"for its runs and tables (the defaults, runs/reproduce/{args.name or 'NAME'} "
                             "and docs/results/NAME, hold the published ones)")
    if args.data is None:
        data = ensure_default_data(DEFAULT_DATA)
        args.name = args.name or "amazon-beauty"
    else:
        data = args.data.resolve()
        args.name = args.name or data.name
    from iacn_torchrec.data.store import read_meta

    base_len = int(read_meta(data)["max_len"])
    parts = set(args.only or [p for p in PARTS if p != "variants" or args.variant])
    if "variants" in parts and not args.variant:
        raise ReproduceError("--only variants needs at least one --variant")
    lengths = sorted(set(args.lengths) | {base_len}) if "table2" in parts else [base_len]
    datasets = {L: dataset_at_length(data, L) if L != base_len else data for L in lengths}
    out = (args.out or REPO / "runs" / "reproduce" / args.name).resolve()
    res_dir = (args.results or REPO / "docs" / "results" / args.name).resolve()
    plan = build_plan(args, datasets, base_len)
    t0 = time.perf_counter()
    failures: dict[str, str] = {}
    if args.no_train:
        results = {}
        for r in plan:
            m = finished(out / r.run_id, make_config(args, r, out).to_dict())
            if m is not None:
                results[r.run_id] = m
    else:
        results, failures = execute(args, plan, out)
    res_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    if "table1" in parts:
        summary["table1"] = write_table1(args, plan, results, out, res_dir, base_len)
    if "table2" in parts:
        summary["table2"] = write_table2(args, plan, results, out, res_dir)
    if "delta" in parts:
        summary["delta"] = write_delta(args, plan, results, out, res_dir, base_len)
    if "variants" in parts:
        summary["variants"] = write_variants(args, plan, results, out, res_dir, base_len)
    from iacn_torchrec import versions

    for part, s in summary.items():
        part_runs = {r.run_id: r for r in plan if part in r.parts and r.run_id in results}
        write_atomic(res_dir / f"{part}.json", json.dumps(json_safe(
            {"command": args.command_line, "versions": versions(), "summary": s,
             "dataset_content_hashes": sorted({str(results[rid].get("dataset", {}).get("content_hash"))
                                              for rid in part_runs}),
             "runs": {rid: {"seed": r.seed, "model": r.model, "max_len": r.max_len, "arm": r.arm.key,
                            "test_auc": results[rid]["test"]["auc"], "config": results[rid]["config"],
                            "versions": results[rid].get("versions")}
                      for rid, r in part_runs.items()}}),
            indent=1, default=str, allow_nan=False))
    minutes = (time.perf_counter() - t0) / 60
    print(f"reproduce: {len(results)}/{len(plan)} runs finished ({minutes:.1f} min this call); tables and "
          f"plots in {res_dir}", flush=True)
    if failures:
        print(f"reproduce: {len(failures)} run(s) failed and are left out: " + "; ".join(
            f"{rid} ({err})" for rid, err in failures.items()), file=sys.stderr, flush=True)
        return 1
    return 0
