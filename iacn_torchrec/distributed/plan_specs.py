"""Inputs of the sharding planner benchmarks: model specs, topologies, plan options.

A :class:`ModelSpec` describes the embedding tables of a CTR model with or without IaCN, named as
in ``docs/architecture.md``: the user table ``uid`` and the item-side tables ``item_orig``,
``cate_orig`` (module ``orig``) plus, with IaCN, their twins ``item_aux``, ``cate_aux`` (module
``aux``). Specs come from a dict (YAML/JSON scenario files) or from a prepared dataset's
``meta.json``; bad input raises :class:`SpecError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iacn_torchrec.errors import UserError

GIB = 1024**3
GBPS = GIB / 1000  # 1 GiB/s in bytes/ms, TorchRec's bandwidth unit (its defaults: 600 and 12.5 GiB/s)

# optimizer name -> (TorchRec/torch optimizer class path, state floats per row, state floats per element)
OPTIMIZERS: dict[str, tuple[str, int, int]] = {
    "sgd": ("torch.optim.SGD", 0, 0),
    "rowwise_adagrad": ("torchrec.optim.RowWiseAdagrad", 1, 0),
    "adagrad": ("torch.optim.Adagrad", 0, 1),
    "adam": ("torch.optim.Adam", 0, 2),
}


#: every sharding type a plan may name (TorchRec's ShardingType values) -> its usual abbreviation
#: (plan tables, logs)
ST_ABBR = {
    "table_wise": "TW",
    "row_wise": "RW",
    "column_wise": "CW",
    "data_parallel": "DP",
    "table_row_wise": "TWRW",
    "table_column_wise": "TWCW",
    "grid_shard": "GS",
}

#: sharding types TorchRec's sharders accept, per collection kind and compute device (as
#: ``EmbeddingCollectionSharder.sharding_types`` / ``EmbeddingBagCollectionSharder.sharding_types``
#: list them; a sequence EmbeddingCollection's data-parallel lookup fails in fbgemm on CPU)
SUPPORTED_SHARDING_TYPES: dict[tuple[bool, str], tuple[str, ...]] = {
    (False, "cuda"): ("table_wise", "row_wise", "column_wise", "data_parallel"),
    (False, "cpu"): ("table_wise", "row_wise", "column_wise"),
    (True, "cuda"): tuple(ST_ABBR),
    (True, "cpu"): ("table_wise", "column_wise", "table_column_wise", "data_parallel"),
}


class SpecError(UserError, ValueError):
    """A model spec, topology or meta.json that cannot be used; the message names where and what."""


def is_int(v: Any) -> bool:
    """An integer, not a bool (YAML's ``true`` is an ``int`` to Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_sharding_types(types: tuple[str, ...] | None, pooled: bool, compute_device: str) -> None:
    """Refuse sharding types the model's collections cannot use on ``compute_device``."""
    if types is None:
        return
    allowed = SUPPORTED_SHARDING_TYPES[(pooled, compute_device)]
    bad = [t for t in types if t not in allowed]
    if bad:
        kind = "pooled EmbeddingBagCollection" if pooled else "sequence EmbeddingCollection"
        raise SpecError(f"plan options: sharding_types {bad} not supported by {kind} tables on "
                        f"{compute_device}; allowed: {list(allowed)}")


@dataclass(frozen=True)
class TableSpec:
    """One embedding table as the planner sees it.

    ``pooling_factors[i]`` is the mean number of ids per sample of ``feature_names[i]`` (for a
    sequence feature: the mean history length).
    """

    name: str
    module: str  # "orig" or "aux": the EmbeddingCollection that holds it
    num_embeddings: int
    embedding_dim: int
    feature_names: tuple[str, ...]
    pooling_factors: tuple[float, ...]

    @property
    def param_bytes(self) -> int:
        """fp32 weights: rows × dim × 4."""
        return self.num_embeddings * self.embedding_dim * 4


@dataclass(frozen=True)
class ModelSpec:
    """Embedding tables of a DIN/DIEN-style model (plus IaCN's aux twins when ``aux_dim > 0``).

    Counts exclude the padding row: a table has ``count + 1`` rows (index 0 = padding/unknown).
    ``hist_len`` is the mean behaviour-history length per sample (the pooling factor of the
    ``hist_*`` sequence features); ``neg_hist`` adds DIEN's negative behaviours (same length);
    ``iacn_negatives`` is the mean number of sampled-softmax negatives IaCN looks up per sample in
    the aux tables: the loader draws S_neg for each label-1 sample and none for the others, so
    S_neg × the positive share (S_neg / 2 on din-protocol data; 0 for the in-batch sampler).
    ``pooled=True`` builds DLRM-style EmbeddingBagCollections (one pooled lookup per feature)
    instead of sequence EmbeddingCollections, for orig and aux alike, with the aux tables added
    beside the orig ones (``orig_dim + aux_dim`` in all). The DLRM plug-in is laid out differently
    (an EC aux carved out of the model's dim, docs/dlrm.md): plan it as a sequence spec.
    """

    name: str
    num_users: int
    num_items: int
    num_cates: int
    orig_dim: int = 18
    aux_dim: int = 18
    user_dim: int = 18
    hist_len: float = 10.0
    neg_hist: bool = False
    iacn_negatives: float = 0.0
    pooled: bool = False

    def __post_init__(self) -> None:
        for f in ("num_users", "num_items", "num_cates", "orig_dim", "user_dim", "aux_dim"):
            if not is_int(getattr(self, f)):
                raise SpecError(f"model spec {self.name!r}: field {f!r} must be an integer, "
                                f"got {getattr(self, f)!r}")
        for f in ("num_users", "num_items", "num_cates", "orig_dim", "user_dim"):
            if getattr(self, f) <= 0:
                raise SpecError(f"model spec {self.name!r}: field {f!r} must be > 0, got {getattr(self, f)}")
        for f in ("hist_len", "iacn_negatives"):
            if not is_num(getattr(self, f)):
                raise SpecError(f"model spec {self.name!r}: field {f!r} must be a finite number, "
                                f"got {getattr(self, f)!r}")
        if self.aux_dim < 0 or self.iacn_negatives < 0 or self.hist_len < 0:
            raise SpecError(f"model spec {self.name!r}: aux_dim, iacn_negatives and hist_len must be >= 0")

    def with_aux_dim(self, aux_dim: int) -> ModelSpec:
        return dataclasses.replace(self, aux_dim=aux_dim)

    def tables(self, with_iacn: bool = True) -> list[TableSpec]:
        """The tables in architecture order: orig (uid, item_orig, cate_orig), then aux when asked."""
        L = float(self.hist_len)
        item_f, item_p = ["item", "hist_item"], [1.0, L]
        cate_f, cate_p = ["cate", "hist_cate"], [1.0, L]
        if self.neg_hist:
            item_f, item_p = item_f + ["neg_hist_item"], item_p + [L]
            cate_f, cate_p = cate_f + ["neg_hist_cate"], cate_p + [L]
        # an EmbeddingCollection holds one dim: uid gets a collection of its own when it differs
        # (as InterestAwareEmbeddings does); bags may mix dims
        user_module = "orig" if self.pooled or self.user_dim == self.orig_dim else "user"
        out = [
            TableSpec("uid", user_module, self.num_users + 1, self.user_dim, ("uid",), (1.0,)),
            TableSpec("item_orig", "orig", self.num_items + 1, self.orig_dim, tuple(item_f), tuple(item_p)),
            TableSpec("cate_orig", "orig", self.num_cates + 1, self.orig_dim, tuple(cate_f), tuple(cate_p)),
        ]
        if with_iacn and self.aux_dim > 0:
            s = float(self.iacn_negatives)
            ia_f, ia_p = list(item_f), list(item_p)
            ca_f, ca_p = list(cate_f), list(cate_p)
            if s > 0:
                ia_f, ia_p = ia_f + ["iacn_neg_item"], ia_p + [s]
                ca_f, ca_p = ca_f + ["iacn_neg_cate"], ca_p + [s]
            out += [
                TableSpec("item_aux", "aux", self.num_items + 1, self.aux_dim, tuple(ia_f), tuple(ia_p)),
                TableSpec("cate_aux", "aux", self.num_cates + 1, self.aux_dim, tuple(ca_f), tuple(ca_p)),
            ]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "<spec>") -> ModelSpec:
        """Build from a mapping (a scenario's ``model:`` section); unknown or bad fields name ``where``."""
        if not isinstance(d, dict):
            raise SpecError(f"{where}: model spec must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SpecError(f"{where}: unknown model field(s) {unknown}; known: {sorted(names)}")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                if f.default is dataclasses.MISSING:
                    raise SpecError(f"{where}: missing required model field {f.name!r}")
                continue
            v = d[f.name]
            try:
                if f.name == "name":
                    kw[f.name] = str(v)
                elif f.name in ("neg_hist", "pooled"):
                    if not isinstance(v, bool):
                        raise TypeError
                    kw[f.name] = v
                elif isinstance(v, bool):  # YAML true/false is no number
                    raise TypeError
                elif f.name in ("hist_len", "iacn_negatives"):  # means: fractions allowed
                    kw[f.name] = float(v)
                else:
                    fv = float(v)  # allows 1e9 in YAML
                    if fv != int(fv):
                        raise TypeError
                    kw[f.name] = int(fv)
            except (TypeError, ValueError, OverflowError):  # int(inf): OverflowError
                raise SpecError(f"{where}: model field {f.name!r} has a bad value {v!r}") from None
        try:
            return cls(**kw)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None

    @classmethod
    def from_meta(cls, path: str | Path, **overrides: Any) -> ModelSpec:
        """Read a prepared dataset's ``meta.json`` (``counts.users/items/categories``, ``max_len``).

        ``path`` is the dataset directory or the meta.json itself. The history length defaults to
        ``max_len`` (an upper bound: pass ``hist_len=`` for the mean); other fields via overrides.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "meta.json"
        if not p.is_file():
            raise SpecError(
                f"{p}: no such meta.json (expected a prepared dataset directory or its meta.json)"
            )
        try:
            meta = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SpecError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise SpecError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise SpecError(f"{p}: cannot read ({e.strerror})") from None
        counts = meta.get("counts") if isinstance(meta, dict) else None
        if not isinstance(counts, dict):
            raise SpecError(
                f"{p}: missing object field 'counts' (need counts.users, counts.items, counts.categories)"
            )

        def need(key: str, obj: dict[str, Any], label: str) -> int:
            v = obj.get(key)
            if not is_num(v) or v <= 0 or v != int(v):  # finite: 1e400 in JSON is inf
                raise SpecError(f"{p}: field {label!r} must be a positive integer, got {v!r}")
            return int(v)

        kw: dict[str, Any] = dict(
            name=p.resolve().parent.name,  # the dataset's folder (meta["source"] describes its raw files)
            num_users=need("users", counts, "counts.users"),
            num_items=need("items", counts, "counts.items"),
            num_cates=need("categories", counts, "counts.categories"),
        )
        if "hist_len" not in overrides:
            kw["hist_len"] = float(need("max_len", meta, "max_len"))
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True)
class TopologySpec:
    """A simulated cluster (TorchRec ``Topology``); capacities per rank in GiB, bandwidths in GiB/s
    (``*_bw_gbps``: the unit of TorchRec's own defaults)."""

    world_size: int
    local_world_size: int = 8
    compute_device: str = "cuda"
    hbm_gib: float = 80.0
    ddr_gib: float = 256.0
    intra_host_bw_gbps: float | None = None  # None: TorchRec's defaults (600 / 12.5 GiB/s)
    inter_host_bw_gbps: float | None = None

    def __post_init__(self) -> None:
        for name in ("world_size", "local_world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"topology: {name} must be an integer >= 1, got {v!r}")
        for name in ("hbm_gib", "ddr_gib", "intra_host_bw_gbps", "inter_host_bw_gbps"):
            v = getattr(self, name)
            if v is None and name.endswith("bw_gbps"):
                continue
            if not is_num(v) or not v > 0:  # finite: int(inf GiB) would fail in build()
                raise SpecError(f"topology: {name} must be a positive finite number, got {v!r}")
        if self.compute_device not in ("cuda", "cpu"):
            raise SpecError(f"topology: compute_device must be 'cuda' or 'cpu', got {self.compute_device!r}")

    def build(self):  # -> torchrec Topology
        from torchrec.distributed.planner import Topology

        kw: dict[str, Any] = {}
        if self.intra_host_bw_gbps is not None:
            kw["intra_host_bw"] = self.intra_host_bw_gbps * GBPS
        if self.inter_host_bw_gbps is not None:
            kw["inter_host_bw"] = self.inter_host_bw_gbps * GBPS
        return Topology(
            world_size=self.world_size,
            compute_device=self.compute_device,
            local_world_size=min(self.local_world_size, self.world_size),
            hbm_cap=int(self.hbm_gib * GIB) if self.compute_device == "cuda" else None,
            ddr_cap=int(self.ddr_gib * GIB),
            **kw,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "<topology>") -> TopologySpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SpecError(f"{where}: unknown topology field(s) {unknown}; known: {sorted(names)}")
        try:
            return cls(**d)
        except (TypeError, SpecError) as e:
            raise SpecError(f"{where}: {str(e).removeprefix('topology: ')}") from None


@dataclass(frozen=True)
class PlanOptions:
    """How to plan: batch size per rank, optimizer, kernels, storage reservation, sharding types.

    ``sharding_types=None`` picks per table: data-parallel (cuda only) + table-wise + row-wise for
    tables under ``small_table_bytes``; table-wise + row-wise (+ column-wise up to
    ``column_wise_max_world`` ranks) otherwise; table-wise only up to ``table_wise_max_world``
    ranks. This keeps the planner's search space, and so its run time, bounded at 1024 ranks.
    ``offload``: "never" (HBM kernels only), "auto" (retry with
    fused_uvm_caching when the HBM-only plan does not fit) or "always".
    """

    batch_size: int = 512
    optimizer: str = "rowwise_adagrad"
    offload: str = "auto"
    cache_load_factor: float = 0.2
    reserve_fraction: float = 0.15
    sharding_types: tuple[str, ...] | None = None
    small_table_bytes: int = 1 * GIB
    column_wise_max_world: int = 256
    table_wise_max_world: int = 256

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(
                f"plan options: optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.offload not in ("never", "auto", "always"):
            raise SpecError(f"plan options: offload must be never|auto|always, got {self.offload!r}")

        for name in ("batch_size", "small_table_bytes", "column_wise_max_world", "table_wise_max_world"):
            v, lo = getattr(self, name), 1 if name == "batch_size" else 0
            if not is_int(v) or v < lo:
                raise SpecError(f"plan options: {name} must be an integer >= {lo}, got {v!r}")
        if not is_num(self.cache_load_factor) or not 0 < self.cache_load_factor <= 1:
            raise SpecError(f"plan options: cache_load_factor must be in (0, 1], "
                            f"got {self.cache_load_factor!r}")
        if not is_num(self.reserve_fraction) or not 0 <= self.reserve_fraction < 1:
            raise SpecError(f"plan options: reserve_fraction must be in [0, 1), "
                            f"got {self.reserve_fraction!r}")
        if self.sharding_types is not None:
            types = self.sharding_types
            if isinstance(types, str) or not types or not all(isinstance(t, str) for t in types):
                raise SpecError(f"plan options: sharding_types must be a non-empty list of names, "
                                f"got {types!r}")
            bad = [t for t in types if t not in ST_ABBR]
            if bad:
                raise SpecError(f"plan options: unknown sharding type(s) {bad}; known: {list(ST_ABBR)}")

    def optimizer_state_bytes(self, rows: int, cols: int) -> int:
        """Optimizer state of a (rows × cols) fp32 shard: per-row and per-element floats."""
        _, per_row, per_elem = OPTIMIZERS[self.optimizer]
        return 4 * (rows * per_row + rows * cols * per_elem)


def fmt_bytes(n: float) -> str:
    """Human-readable bytes (GiB/MiB/KiB)."""
    if not math.isfinite(n):
        return str(n)
    a = abs(n)
    for unit, scale in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if a >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
