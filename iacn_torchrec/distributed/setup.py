"""Model, optimizers and the step function for one training process.

Two paths, one model:

* **plain** (one process, every table on the dense kernel with ``torch.optim.Adam``, as the peer
  libraries do): the `CTRWithIaCN` module as built, a single Adam optimizer.
* **sharded** (any fused table optimizer, or more than one process): the same module wrapped in
  TorchRec's `DistributedModelParallel` with a plan from `EmbeddingShardingPlanner`; every table
  is updated inside backward by its FBGEMM fused optimizer (SGD / row-wise Adagrad; Adam on CUDA
  only), the dense parameters by Adam in a `KeyedOptimizerWrapper`, both in one
  `CombinedOptimizer`. `TrainPipelineSparseDist` drives the steps.

The δ gradient split acts on the embedding lookup outputs, before the fused update, so it holds
on both paths unchanged.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from iacn_torchrec.train.config import TrainConfig

StepOutput = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class TrainingSetup:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    train_steps: Callable[[Any], Iterator[StepOutput]]  # loader -> (loss, (logits, main, iacn)) per step
    num_parameters: int
    sharded: bool
    plan: Any = None
    # Hand the model back from the train pipeline (which rewrites the sharded modules' forward)
    # before it is called outside the pipeline, e.g. for evaluation; the next step re-attaches.
    pause: Callable[[], None] = lambda: None


def load_training_state(
    setup: TrainingSetup, model_state: dict[str, Any], optimizer_state: dict[str, Any]
) -> None:
    """Restore model and optimizer states saved from ``setup.model`` / ``setup.optimizer``.

    TorchRec's keyed optimizers load *in place* and refuse an empty (never stepped) state, so the
    lazily created Adam state of the dense parameters is materialised first by a zero-gradient
    step (``KeyedOptimizer.init_state``) — before the weights are loaded, so that step cannot
    touch them. Sharded tables and fused optimizer states (ShardedTensors) copy into this rank's
    shards; the plan must match the saving run's (same world size and sharding types).
    """
    if setup.sharded:
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

        opts = setup.optimizer.optimizers if isinstance(setup.optimizer, CombinedOptimizer) else []
        for _, opt in opts:
            if isinstance(opt, KeyedOptimizerWrapper) and not opt.state:
                opt.init_state()
        setup.optimizer.zero_grad(set_to_none=True)
    else:
        optimizer_state = _regroup(setup, optimizer_state)
    setup.model.load_state_dict(model_state)
    setup.optimizer.load_state_dict(optimizer_state)


def _regroup(setup: TrainingSetup, state: dict[str, Any]) -> dict[str, Any]:
    """A one-process Adam state saved with one parameter group (before the tables got their own,
    for ``optim.embedding_lr``) in this optimizer's groups: per-parameter state is keyed by the
    position in ``model.parameters()`` there and by the position across the groups here; the
    groups' settings are this run's."""
    groups = setup.optimizer.state_dict()["param_groups"]
    if len(state.get("param_groups", [])) != 1 or len(groups) == 1:
        return state
    order = [p for g in setup.optimizer.param_groups for p in g["params"]]
    position = {id(p): i for i, p in enumerate(order)}
    params = list(setup.model.parameters())
    if len(state["param_groups"][0]["params"]) != len(params):
        return state  # not this model's: load_state_dict names the mismatch
    return {"state": {position[id(params[i])]: s for i, s in state["state"].items()}, "param_groups": groups}


def build_model_from_config(
    config: TrainConfig, ds, item_log_q: torch.Tensor | None = None
) -> torch.nn.Module:
    """The unsharded `CTRWithIaCN` for ``config`` on dataset ``ds`` (seeded by the caller)."""
    from iacn_torchrec.models.framework import build_model, main_model_config

    return build_model(
        config.model.name,
        model_config=main_model_config(config.model.name, config.model.main),
        num_users=ds.num_users,
        num_items=ds.num_items,
        num_cates=ds.num_cates,
        max_len=int(ds.meta["max_len"]),
        iacn=config.iacn,
        emb_dim=config.model.emb_dim,
        user_dim=config.model.user_dim,
        item_log_q=item_log_q,
        dien_aux_loss_weight=config.model.dien_aux_loss_weight,
        dien_hidden=config.model.dien_hidden,
    )


def plain_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> Callable[[Any], Iterator[StepOutput]]:
    """The step loop without a pipeline: batch to ``device``, zero_grad, forward, backward, step."""
    move = device.type != "cpu"  # the loader's batches are CPU tensors already

    def steps(loader) -> Iterator[StepOutput]:
        for batch in loader:
            if move:
                batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss, out = model(batch)
            # With IaCN on its worker thread the graph is freed after the step, not inside backward:
            # each freed tensor that Python saw takes the GIL, which the worker's Python holds, and
            # the main backward waited for it (measured: docs/results/performance-log.md, round 12).
            try:
                loss.backward(retain_graph=getattr(model, "iacn_on_worker", False))
            except BaseException:
                from iacn_torchrec.models.framework import drain_iacn_worker

                drain_iacn_worker()  # the IaCN started beside this backward ends before the error leaves
                raise
            optimizer.step()
            detached = loss.detach()
            del loss  # the graph goes here, while the worker is idle
            yield detached, out

    return steps


def collective_device() -> torch.device:
    """Where tensors must be for a collective of the default group: NCCL reduces and gathers CUDA
    tensors only (gloo, and no group at all: the CPU)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(rank: int, world_size: int, backend: str | None = None) -> None:
    """Join (or, for a single process, create) the default process group.

    Launched by torchrun/TorchX the environment names the rendezvous; a lone process gets a
    private file-based gloo group so TorchRec's sharded modules work in one process too.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        from iacn_torchrec.errors import UserError

        raise UserError("distributed.backend=nccl needs CUDA GPUs and a torch built with NCCL; this "
                        "machine has none: use gloo (or leave distributed.backend out)")
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    else:
        if world_size != 1:
            raise RuntimeError(
                "more than one rank needs MASTER_ADDR/MASTER_PORT (launch with torchrun/torchx)"
            )
        fd, path = tempfile.mkstemp(prefix="iacn-pg-")
        os.close(fd)
        os.unlink(path)
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)


def build_training(
    config: TrainConfig, ds, item_log_q: torch.Tensor | None = None, rank: int = 0, world_size: int = 1
) -> TrainingSetup:
    """Model, optimizer and step function for this process."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    model = build_model_from_config(config, ds, item_log_q)
    if config.model.compile:
        model.compile_submodules()
    n_params = sum(p.numel() for p in model.parameters())
    if world_size == 1 and not config.optim.fused(aux_tables=config.iacn.enabled):
        model = model.to(device)
        # not with a compiled main model, whose kernels hold the GIL: there the worker gains little
        # (round 7: DIN+IaCN 7.89 ms a step on the worker, 8.38 serial) and eager DIN+IaCN on the
        # worker is faster than either (7.25 ms), docs/results/performance-log.md
        if config.model.iacn_worker and not config.model.compile:
            model.run_iacn_on_worker()
        # the tables at optim.table_lr("adam") without weight decay, as on the sharded path; one
        # group when that is the dense parameters' setting too (a second group costs ~2 % of a DIN step)
        tables = list(model.embeddings.parameters())
        table_ids = {id(p) for p in tables}
        groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
        if config.optim.table_lr("adam") != config.optim.lr or config.optim.weight_decay:
            groups = [{"params": [p for p in model.parameters() if id(p) not in table_ids]},
                      {"params": tables, "lr": config.optim.table_lr("adam"), "weight_decay": 0.0}]
        optimizer = torch.optim.Adam(
            groups, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
            fused=True,  # one vectorised kernel per tensor on CPU too: ~4x cheaper than the default loop
        )
        return TrainingSetup(
            model, optimizer, device, plain_steps(model, optimizer, device), n_params, sharded=False
        )

    from iacn_torchrec.distributed.sharding import shard_model

    if device.type == "cuda":  # NCCL's collectives (the planner's broadcast too) use the current device
        torch.cuda.set_device(device)
    init_process_group(rank, world_size, config.distributed.backend)
    return shard_model(model, config, device, n_params)
