"""Sharding the `CTRWithIaCN` model with TorchRec: planner constraints, fused optimizers, DMP.

The orig and aux tables are separate tables of separate `EmbeddingCollection`s, so the planner
places them independently; per-table sharding types come from ``config.distributed``.

Pieces, in the order :func:`shard_model` uses them:

* :func:`apply_table_optimizers`: ``apply_optimizer_in_backward`` on every table: ``sgd`` →
  FBGEMM EXACT_SGD, ``rowwise_adagrad`` → EXACT_ROWWISE_ADAGRAD, ``adam`` → FBGEMM ADAM on CUDA
  only. Orig and aux tables may use different optimizers. Every sharded table is *fused*:
  TorchRec 1.8 offers the dense kernel only with data-parallel sharding, which FBGEMM's sequence
  (``EmbeddingCollection``) kernels reject, and FBGEMM's fused Adam does not run on CPU — so on
  CPU a sharded run needs sgd / rowwise_adagrad tables (Adam tables: the one-process plain path).
* :func:`planner_constraints`: one ``ParameterConstraints`` per table (sharding type, fused
  kernel, column-wise shard width); data-parallel is never offered.
* :func:`topology`: world size, device and memory caps of this machine (DDR = physical memory
  shared by the local ranks; HBM = the GPU's memory on CUDA).
* :func:`plan_and_wrap`: ``EmbeddingShardingPlanner.collective_plan`` (rank 0 plans and
  broadcasts) and ``DistributedModelParallel`` with ``EmbeddingCollectionSharder``.
* :func:`combined_optimizer`: the fused table optimizers + ``KeyedOptimizerWrapper(Adam)`` over
  the dense parameters, one ``CombinedOptimizer``.
* :func:`shard_model`: all of the above and the step function (``TrainPipelineSparseDist``).

Gradient reduction (what makes N ranks equal one process on the same global batch): every rank's
loss is a mean over its local batch; DDP averages the dense gradients over ranks and TorchRec's
all-to-all backward divides the embedding gradients by the world size. So the update equals the
single-process update on the concatenated global batch when every rank's means have equal
denominators: equal local batch sizes for the click loss, and also equal numbers of label-1 rows
(``L_IaCN``) and of history positions (DIEN's auxiliary loss) per rank; otherwise it is the mean
of per-rank means, as in any data-parallel training.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from iacn_torchrec.distributed.setup import StepOutput, TrainingSetup, collective_device, plain_steps
from iacn_torchrec.errors import UserError
from iacn_torchrec.train.config import ConfigError, TrainConfig

__all__ = [
    "FUSED_OPTIMIZERS",
    "FUSED_OPTIMIZER_KWARGS",
    "ALL_SHARDING_TYPES",
    "embedding_collections",
    "table_optimizer",
    "apply_table_optimizers",
    "planner_constraints",
    "topology",
    "plan_and_wrap",
    "combined_optimizer",
    "shard_model",
    "sharded_table_weights",
]

FUSED_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "rowwise_adagrad": RowWiseAdagrad,
}
# Hyper-parameters passed explicitly so the fused FBGEMM kernel and TorchRec's reference optimizer
# class (used unsharded, e.g. in tests) agree: FBGEMM's eps default is 1e-8, RowWiseAdagrad's 1e-10.
FUSED_OPTIMIZER_KWARGS: dict[str, dict[str, float]] = {"sgd": {}, "rowwise_adagrad": {"eps": 1e-8}}
# data_parallel is deliberately absent: FBGEMM's sequence (EmbeddingCollection) kernels reject it.
ALL_SHARDING_TYPES = [
    ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.COLUMN_WISE.value
]


def embedding_collections(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's TorchRec embedding collections by attribute path (``embeddings.orig`` ...)."""
    from torchrec import EmbeddingCollection

    return {n: m for n, m in model.named_modules() if isinstance(m, EmbeddingCollection)}


def _tables(model: torch.nn.Module) -> dict[str, Any]:
    """table name -> ``EmbeddingConfig`` over every collection of ``model`` (unsharded)."""
    return {cfg.name: cfg for ec in embedding_collections(model).values() for cfg in ec.embedding_configs()}


def table_optimizer(config: TrainConfig, table: str) -> str:
    """The optimizer name of ``table``: aux tables may override the embedding optimizer."""
    if table.endswith("_aux") and config.optim.aux_embedding_optimizer is not None:
        return config.optim.aux_embedding_optimizer
    return config.optim.embedding_optimizer


def _check_fused_dims(model: torch.nn.Module) -> None:
    bad = {name: cfg.embedding_dim for name, cfg in _tables(model).items() if cfg.embedding_dim % 4}
    if bad:
        raise ConfigError(
            "sharded tables run FBGEMM kernels, which need embedding dims that are multiples of 4; "
            f"table(s) {bad} are not: set model.emb_dim, model.user_dim and iacn.aux_dim to e.g. 16 "
            "(--emb-dim 16 --aux-dim 16 --set model.user_dim=16; with iacn.keep_width the orig tables get "
            "emb_dim - aux_dim, e.g. --emb-dim 16 --aux-dim 8 --keep-width)"
        )


def _note(message: str) -> None:
    """A one-line note on rank 0's stderr (the training loop's convention for choices it makes)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"note: {message}", file=sys.stderr, flush=True)


def apply_table_optimizers(
    model: torch.nn.Module, config: TrainConfig, device: torch.device | None = None
) -> dict[str, str]:
    """Attach a fused in-backward optimizer to every table; returns table -> optimizer name.

    Must run on the unsharded model, before `DistributedModelParallel`: the sharder reads the
    optimizer class and its arguments from each weight and builds the fused FBGEMM kernel.
    ``adam`` tables need CUDA (FBGEMM's fused Adam); on CPU they raise `ConfigError`."""
    on_cuda = device is not None and device.type == "cuda"
    chosen = {table: table_optimizer(config, table) for table in _tables(model)}
    adam = sorted(t for t, o in chosen.items() if o == "adam")
    if adam and not on_cuda:
        raise ConfigError(
            f"table(s) {adam} use optimizer 'adam', which a sharded run (more than one process, or any "
            "fused table optimizer) cannot give them on CPU: FBGEMM's fused Adam needs CUDA and TorchRec "
            "offers no dense kernel for sharded EmbeddingCollections. Use --embedding-optimizer sgd or "
            "rowwise_adagrad (and --aux-embedding-optimizer), or train in one process with adam everywhere"
        )
    _check_fused_dims(model)
    if adam:
        _note(f"table(s) {adam} use FBGEMM's fused Adam, which updates only the rows a batch looks up "
              "(one process with Adam tables updates every row, as torch.optim.Adam does): the two "
              "runs differ by more than float rounding")
    for ec in embedding_collections(model).values():
        for table, emb in ec.embeddings.items():
            opt = chosen[table]
            cls = torch.optim.Adam if opt == "adam" else FUSED_OPTIMIZERS[opt]
            kwargs = {"lr": config.optim.table_lr(opt), **FUSED_OPTIMIZER_KWARGS.get(opt, {})}
            apply_optimizer_in_backward(cls, [emb.weight], kwargs)
    return chosen


def _cw_shard_width(dim: int, world_size: int) -> int:
    """Column-wise shard width: the smallest multiple of 4 dividing ``dim`` that gives at most
    ``world_size`` shards (TorchRec's default, 128 columns, would leave an 18/16-wide table whole)."""
    for w in range(4, dim + 1, 4):
        if dim % w == 0 and dim // w <= world_size:
            return w
    return dim


def ids_per_sample(feature: str, max_len: int, num_negatives: int) -> float:
    """The planner's pooling factor of one of the loader's features (ids per sample, an upper
    bound): a history is up to ``max_len`` ids, IaCN's negatives ``S`` per label-1 sample."""
    if feature.startswith(("hist_", "neg_hist_")):
        return float(max_len)
    if feature.startswith("iacn_neg_"):
        return float(num_negatives)
    return 1.0


def planner_constraints(
    config: TrainConfig, table_optimizers: dict[str, str], table_dims: dict[str, int] | None = None,
    world_size: int = 1, table_features: dict[str, list[str]] | None = None, max_len: int = 1,
) -> dict[str, ParameterConstraints]:
    """One ``ParameterConstraints`` per table: sharding type (``config.distributed.sharding_types``,
    else any of TW/RW/CW for the planner to choose; TW/RW for row-wise Adagrad tables, whose
    per-row accumulator column-wise shards would split), the fused kernel, the column-wise shard
    width (see :func:`_cw_shard_width`) and, given ``table_features``, each feature's ids per
    sample (:func:`ids_per_sample`; TorchRec's default of 1 would undercount the histories)."""
    unknown = set(config.distributed.sharding_types) - set(table_optimizers)
    if unknown:
        raise ConfigError(
            f"distributed.sharding_types names unknown table(s) {sorted(unknown)}; "
            f"tables: {sorted(table_optimizers)}"
        )
    constraints = {}
    for table in table_optimizers:
        st = config.distributed.sharding_types.get(table)
        dim = (table_dims or {}).get(table)
        features = (table_features or {}).get(table)
        # row-wise Adagrad keeps one accumulator per row: column-wise shards would each keep their
        # own over their columns, another optimizer than the unsharded one (pinning it still can)
        offered = ALL_SHARDING_TYPES
        if table_optimizers[table] == "rowwise_adagrad":
            offered = [t for t in offered if t != ShardingType.COLUMN_WISE.value]
            if st == ShardingType.COLUMN_WISE.value:
                _note(f"{table}: column_wise with rowwise_adagrad keeps one accumulator per row and "
                      "column shard, not per row: another optimizer than the unsharded table's")
        if st == ShardingType.COLUMN_WISE.value and dim and world_size > 1 \
                and _cw_shard_width(dim, world_size) == dim:
            # TorchRec's column-wise shards are of equal width, a multiple of 4 dividing the dim
            _note(f"{table}: column_wise on {world_size} ranks leaves its {dim} columns whole (no multiple "
                  f"of 4 divides {dim} into 2 to {world_size} equal shards): it is placed like a "
                  "table_wise table")
        constraints[table] = ParameterConstraints(
            sharding_types=[st] if st else offered,
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            min_partition=_cw_shard_width(dim, world_size) if dim else None,
            pooling_factors=[ids_per_sample(f, max_len, config.iacn.num_negatives) for f in features]
            if features else [1.0],
        )
    return constraints


def _cgroup_memory_files(proc_cgroup: str = "/proc/self/cgroup") -> list[str]:
    """The memory-limit files of this process's cgroup and its ancestors, v2 (``memory.max``) and
    v1 (``memory.limit_in_bytes``): in a container the cgroup is ``/``; under Slurm or systemd,
    without a cgroup namespace, it is a path below the root and the limit sits on it or above."""
    paths: list[str] = []
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2
            base, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):  # v1
            base, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in group.split("/") if p]
        paths += [str(Path(base, *parts[:i], name)) for i in range(len(parts), -1, -1)]
    return paths + [p for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
                    if p not in paths]


def _physical_memory() -> int:
    """The memory this process may use: the machine's, or less under a cgroup limit (a container,
    TorchX's memMB on Kubernetes or Slurm). 0 when unknown (TorchRec's default then)."""
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: leave TorchRec's default
        return 0
    for path in _cgroup_memory_files():
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < mem:  # "max" (v2) or a huge number (v1): no limit
            mem = int(raw)
    return mem


def topology(world_size: int, device: torch.device) -> Topology:
    """This run's topology: ranks, device kind, and the memory that really exists per rank
    (DDR: 85 % of physical memory, or of the cgroup's limit, over the local ranks; HBM: the GPU's
    total memory)."""
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    mem = _physical_memory()
    hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    trainer = TrainerConfig(
        world_size=world_size,
        local_world_size=local_world_size,
        # 85 %: TorchRec's storage reservation shrinks HBM only, so the DDR headroom for dense
        # parameters, optimizer state and activations is kept back here
        ddr_cap_bytes=int(0.85 * mem) // max(local_world_size, 1) if mem else None,
        hbm_cap_bytes=hbm,
    )
    return TopologyFactory.create_topology(trainer, kernel_config=KernelConfig(compute_device=device.type))


def _freeze_table_metadata(model: torch.nn.Module) -> None:
    """Pin the embedding module's table/feature lists before sharding.

    ``InterestAwareEmbeddings.feature_names()`` asks its collections for ``embedding_configs()``,
    which a ``ShardedEmbeddingCollection`` does not have; the lists never change, so they are
    computed once here on the unsharded module (and the pipeline's fx tracer sees constants).
    """
    from iacn_torchrec.modules.embeddings import InterestAwareEmbeddings

    for m in model.modules():
        if isinstance(m, InterestAwareEmbeddings) and "feature_names" not in vars(m):
            configs = m.table_configs()
            names = m.feature_names()
            m.table_configs = lambda configs=tuple(configs): list(configs)  # type: ignore[method-assign]
            m.feature_names = lambda names=tuple(names): list(names)  # type: ignore[method-assign]


class PlanError(UserError, RuntimeError):
    """The planner found no sharding plan for the training tables on this topology."""


def plan_and_wrap(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> tuple[DistributedModelParallel, ShardingPlan, dict[str, str]]:
    """Plan with `EmbeddingShardingPlanner` (rank 0 plans, all ranks get the same plan) and wrap
    ``model`` in `DistributedModelParallel`. Returns ``(dmp, plan, table -> optimizer)``."""
    world_size = dist.get_world_size()
    table_optimizers = apply_table_optimizers(model, config, device)
    tables = _tables(model)
    dims = {name: cfg.embedding_dim for name, cfg in tables.items()}
    features = {name: list(cfg.feature_names) for name, cfg in tables.items()}
    max_len = max((m.max_len for m in model.modules() if hasattr(m, "max_len")), default=1)
    _freeze_table_metadata(model)
    sharders = [EmbeddingCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=topology(world_size, device),
        batch_size=config.data.batch_size,  # per rank (TorchRec's default is 512)
        constraints=planner_constraints(config, table_optimizers, dims, world_size, features, max_len),
        # 15% of each rank's HBM kept for dense parameters, their optimizer state and activations
        # (TorchRec's reservation shrinks HBM only; on CPU topology() leaves the DDR headroom)
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )

    def plan_or_error() -> tuple[ShardingPlan | None, str | None]:
        try:  # the error travels to every rank: none is left waiting for a plan that never comes
            return planner.plan(model, sharders), None
        except PlannerError as e:
            return None, str(e)

    # what collective_plan does (rank 0 plans, every rank gets the result), with the error broadcast too
    plan, error = invoke_on_rank_and_broadcast_result(dist.GroupMember.WORLD, 0, plan_or_error)
    if plan is None:
        by_size = sorted(tables.items(), key=lambda kv: -kv[1].num_embeddings * kv[1].embedding_dim)
        sizes = ", ".join(f"{n} {c.num_embeddings:,}x{c.embedding_dim} "
                          f"({c.num_embeddings * c.embedding_dim * 4 / 2**20:,.1f} MiB)" for n, c in by_size)
        lines = (error or "").strip().splitlines()
        reason = lines[0].rstrip(". ") if lines else "no reason given"
        raise PlanError(
            f"TorchRec's planner found no sharding plan for the tables on {world_size} {device.type} "
            f"rank(s) (tables, largest first: {sizes}; sharding types pinned: "
            f"{config.distributed.sharding_types or 'none'}): {reason}. "
            "Use more ranks, smaller tables, or other --sharding types; `iacn plan` shows what fits where"
        )
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    return dmp, plan, table_optimizers


def plan_summary(plan: ShardingPlan | None) -> dict[str, str] | None:
    """``{"module.table": "sharding_type kernel ranks [offsets+sizes ...]"}``: what a checkpoint's
    per-rank shards depend on (None for an unsharded model)."""
    if plan is None:
        return None
    out = {}
    for module, tables in plan.plan.items():
        for table, ps in tables.items():  # type: ignore[union-attr]
            shards = getattr(ps.sharding_spec, "shards", None) or []
            layout = " ".join(f"{list(s.shard_offsets)}+{list(s.shard_sizes)}" for s in shards)
            out[f"{module}.{table}"] = \
                f"{ps.sharding_type} {ps.compute_kernel} ranks {ps.ranks} {layout}".strip()
    return out


def combined_optimizer(dmp: DistributedModelParallel, config: TrainConfig) -> CombinedOptimizer:
    """The fused table optimizers + Adam over the dense parameters (every sharded table is fused)."""
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense_opt = KeyedOptimizerWrapper(
        dense,
        lambda params: torch.optim.Adam(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay),
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense_opt])


def sharded_table_weights(dmp: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every embedding table gathered into one full tensor on every rank, on the CPU (tests; a
    finished run's checkpoint is assembled by ``train.checkpoint.load_full_state``).

    Keys are the unsharded state-dict names (``embeddings.orig.embeddings.item_orig.weight`` ...).
    A collective: all ranks must call it.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    on = collective_device()
    out: dict[str, torch.Tensor] = {}
    for name, t in dmp.state_dict().items():
        if not isinstance(t, ShardedTensor):
            continue
        full = torch.zeros(t.size(), dtype=t.dtype, device=on)
        for shard in t.local_shards():
            o = shard.metadata.shard_offsets
            s = shard.metadata.shard_sizes
            full[o[0] : o[0] + s[0], o[1] : o[1] + s[1]] = shard.tensor.detach()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(full)  # shards are disjoint: the sum assembles the table
        out[name] = full.cpu()
    return out


def copy_tables_into_shards(dmp: torch.nn.Module, tables: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) table weights into this rank's shards of ``dmp``, in place.

    The sharded kernels allocate and initialise their own storage; copying the unsharded module's
    tables in makes a seeded run start from the same weights on any number of ranks (and from the
    same weights as the unsharded model). ``tables``: state-dict name -> ``[rows, dim]``."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for name, t in dmp.state_dict().items():
            if not isinstance(t, ShardedTensor) or name not in tables:
                continue
            full = tables[name]
            if tuple(full.shape) != tuple(t.size()):
                raise ValueError(
                    f"copy_tables_into_shards: {name} is {tuple(t.size())}, got {tuple(full.shape)}"
                )
            for shard in t.local_shards():
                (r, c), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(full[r : r + nr, c : c + nc])


def running_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """The running means and variances of ``model``'s BatchNorm layers (the towers' input BatchNorm,
    Dice's), which each rank updates from its own batches."""
    return [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]


def average_running_statistics(buffers: list[torch.Tensor], world_size: int) -> None:
    """Replace every rank's ``buffers`` by their mean over the ranks (one flat all-reduce). After
    each step this keeps them equal on all ranks: a running mean is linear, so the result is the
    running statistics of the ranks' mean batch statistics, and a checkpoint (which keeps rank 0's
    dense state) evaluates as training evaluated."""
    if world_size < 2 or not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for b in buffers:
        b.copy_(flat[offset: offset + b.numel()].view_as(b))
        offset += b.numel()


def shard_model(
    model: torch.nn.Module, config: TrainConfig, device: torch.device, n_params: int
) -> TrainingSetup:
    """DMP-wrap ``model`` (unsharded `CTRWithIaCN`), build the combined optimizer and the step function.

    With ``config.distributed.pipeline`` the steps run through ``TrainPipelineSparseDist``, which
    overlaps the next batches' input distribution with this step's compute and so reads up to two
    batches ahead of the step it returns (the loop counts trained batches itself for resume)."""
    tables = {f"{path}.embeddings.{name}.weight": emb.weight.detach()  # kept alive, not copied
              for path, ec in embedding_collections(model).items() for name, emb in ec.embeddings.items()}
    dmp, plan, _ = plan_and_wrap(model, config, device)
    copy_tables_into_shards(dmp, tables)
    del tables
    optimizer = combined_optimizer(dmp, config)
    lam = config.iacn.lam if config.iacn.enabled else 0.0
    stats, world = running_statistics(dmp), dist.get_world_size()

    # an evaluation between pipelined steps interleaves its collectives with the pipeline's input
    # distribution of the next batch, in flight: with several ranks gloo then fails on mismatched
    # all-to-alls. Periodic evaluation on several ranks steps without the pipeline (the same results).
    if config.distributed.pipeline and not (config.eval_every and world > 1):
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        current: list[Any] = []  # the pipeline of the running steps() generator

        def pause() -> None:
            if current:
                current[0].detach()

        def steps(loader) -> Iterator[StepOutput]:
            pause()
            pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
            current[:] = [pipeline]
            it = iter(loader)
            while True:
                try:
                    logits, main_loss, iacn_loss = pipeline.progress(it)
                except StopIteration:
                    pipeline.detach()
                    return
                average_running_statistics(stats, world)
                yield (main_loss + lam * iacn_loss).detach(), (logits, main_loss, iacn_loss)

        return TrainingSetup(dmp, optimizer, device, steps, n_params, sharded=True, plan=plan, pause=pause)

    plain = plain_steps(dmp, optimizer, device)

    def unpipelined(loader) -> Iterator[StepOutput]:
        for out in plain(loader):
            average_running_statistics(stats, world)
            yield out

    return TrainingSetup(dmp, optimizer, device, unpipelined, n_params, sharded=True, plan=plan)
