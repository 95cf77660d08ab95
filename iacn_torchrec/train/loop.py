"""The training / evaluation loop, single process or one rank of a distributed run.

`train(config)` is what ``iacn train`` runs: it builds data, model and optimizers, resumes from
the newest checkpoint of ``config.out`` when there is one, trains with a progress bar,
evaluates on the test split, checkpoints, and writes ``OUT/metrics.json``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from iacn_torchrec import versions
from iacn_torchrec.data.loader import BatchLoader, PreparedDataset
from iacn_torchrec.errors import TrainingInterrupted, UserError
from iacn_torchrec.fileio import (
    json_safe,
    lock_holder,
    release_lock,
    remove_temp_siblings,
    try_lock,
    write_atomic,
)
from iacn_torchrec.kernels import KERNELS, load_kernel
from iacn_torchrec.runtime import show_progress
from iacn_torchrec.train.checkpoint import (
    CheckpointError,
    CheckpointWorldSizeError,
    complete_steps,
    incomplete_note,
    latest_step,
    load_checkpoint,
    remove_leftovers,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_dict_mismatch,
    step_dir,
)
from iacn_torchrec.train.config import (
    DIEN_ONLY,
    LEGACY_DEFAULTS,
    TrainConfig,
    resolved_main,
    stored_model_main,
)
from iacn_torchrec.train.metrics import CTRMetrics

logger = logging.getLogger("iacn")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches trained in the current epoch (the loader may have read ahead)
    train_time_s: float = 0.0
    train_samples: int = 0
    # a periodic evaluation of this step that a stop signal skipped (stopping fast comes first): the
    # resumed run runs it before training on, so its history is the uninterrupted run's
    eval_pending: bool = False


def make_loaders(config: TrainConfig, ds: PreparedDataset, rank: int, world_size: int):
    """Train and test loaders; the train loader carries DIEN's negative behaviours and the IaCN
    sampler's negatives when the configuration needs them."""
    from iacn_torchrec.data.negatives import (
        LogUniformNegatives,
        PopularityNegativeBehaviours,
        UniformNegatives,
    )

    sampler = None
    item_log_q = None
    if config.iacn.enabled and config.iacn.sampler != "in_batch":
        if config.iacn.sampler == "uniform":
            sampler = UniformNegatives(ds.num_items, config.iacn.num_negatives, seed=config.seed)
        else:
            sampler = LogUniformNegatives(ds.item_count, config.iacn.num_negatives, seed=config.seed)
            item_log_q = sampler.log_q
    common = dict(seed=config.seed, rank=rank, world_size=world_size,
                  with_neg_hist=config.model.name == "dien", iacn_negatives=sampler)
    # min_last_batch=2: a last batch of one sample per rank would stop BatchNorm/Dice in training
    neg_hist = None
    if config.model.name == "dien" and config.data.dien_negatives == "popularity":
        neg_hist = PopularityNegativeBehaviours(ds.item_count, seed=config.seed)
    train_loader = BatchLoader(ds, "train", batch_size=config.data.batch_size, shuffle=True,
                               drop_last=config.data.drop_last, min_last_batch=2, neg_hist_sampler=neg_hist,
                               limit=config.data.num_train_samples, **common)
    # the test batches carry the negative features' keys (the collections expect them) but empty:
    # evaluation runs neither IaCN nor DIEN's aux loss
    # no rank may get an empty evaluation batch: a sharded forward cannot take one
    test_loader = BatchLoader(ds, "test", batch_size=config.data.eval_batch_size, shuffle=False,
                              placeholder_features=True, limit=config.data.num_test_samples,
                              merge_short_last=True, **common)
    if world_size > 1 and test_loader.num_samples < world_size:
        raise UserError(f"{ds.path}: {test_loader.num_samples} test sample(s) for {world_size} ranks: every "
                        "rank needs at least one to evaluate (raise data.num_test_samples, or use fewer "
                        "ranks)")
    return train_loader, test_loader, item_log_q


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: BatchLoader, device: torch.device | None = None,
    threads: int | None = None, batch_workers: int = 1,
) -> dict[str, float]:
    """AUC, log-loss and GAUC of ``model.predict`` over the loader's split (all ranks together).

    Args:
        threads: torch (intra-op) threads for the evaluation only, restored afterwards; None keeps
            the current setting.
        batch_workers: score this many batches at once, each on its own worker thread with one
            torch thread (unsharded models only: a sharded model's lookups are collectives, which
            must run in the same order on every rank). On the 2-core box two workers scored
            ~150k samples/s where one thread did ~90k and two intra-op threads ~75k
            (docs/results/performance-log.md). Metrics are updated in loader order either way.
    """
    was_training = model.training
    model.eval()
    metrics = CTRMetrics()
    before = torch.get_num_threads()
    if batch_workers > 1:
        threads = 1
    if threads:
        torch.set_num_threads(threads)

    def batches():
        for batch in loader:
            yield batch if device is None else batch.to(device)

    def scored():
        """``(batch, probs)`` in loader order."""
        if batch_workers <= 1:
            for batch in batches():
                yield batch, model.predict(batch)
            return
        with concurrent.futures.ThreadPoolExecutor(batch_workers, thread_name_prefix="iacn-eval") as pool:
            window: collections.deque = collections.deque()  # bounded: never the whole split in memory
            for batch in batches():
                window.append((batch, pool.submit(model.predict, batch)))
                if len(window) >= 2 * batch_workers:
                    done, fut = window.popleft()
                    yield done, fut.result()
            while window:
                done, fut = window.popleft()
                yield done, fut.result()

    try:
        for batch, probs in scored():
            metrics.update(probs, batch.labels, batch.sparse_features["uid"].values())
    finally:
        torch.set_num_threads(before)
        model.train(was_training)
    return metrics.compute()


def evaluation_cores(config: TrainConfig, setup: Any, world_size: int) -> dict[str, int]:
    """:func:`evaluate`'s keyword arguments for this process's cores (``setup``: a
    ``TrainingSetup``): concurrent batches on an unsharded CPU model, intra-op threads otherwise."""
    n = eval_threads(config, world_size)
    if setup.sharded or setup.device.type != "cpu":
        return {"threads": n}
    return {"batch_workers": n}


def eval_threads(config: TrainConfig, world_size: int) -> int:
    """``config.eval_threads``, or this process's share of the machine's cores."""
    if config.eval_threads:
        return config.eval_threads
    return max(1, (os.cpu_count() or 1) // max(1, world_size))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


#: what a run directory holds: ``train`` writes the first four, ``iacn reproduce`` the last
RUN_DIRECTORY_ENTRIES = ("config.yaml", "metrics.json", "checkpoints", "checkpoints.previous",
                         "reproduce_run.json")


def check_run_directory(out: Path) -> None:
    """Refuse an ``out`` that is not a run's folder: one that holds anything but a run's own files
    (hidden temporary files aside) and no ``checkpoints/``. A run writes ``config.yaml`` and
    ``metrics.json`` there and would replace a user's files of those names, as ``iacn prepare``
    and ``iacn export`` refuse a folder that is not theirs; a run's own folder may hold more (an
    export or an explain report beside its checkpoints)."""
    if not out.is_dir() or (out / "checkpoints").is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in RUN_DIRECTORY_ENTRIES and not p.name.startswith("."))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"out {out}: holds files that are not a training run's ({shown}); a run directory "
                        f"holds only {', '.join(RUN_DIRECTORY_ENTRIES)}: choose another --out")


def kernels_used(config: TrainConfig, setup: Any) -> list[str]:
    """The C++ kernels (:data:`~iacn_torchrec.kernels.KERNELS`) this run's steps call: they are CPU
    kernels, the lookup kernel serves the unsharded tables, the others their model's layers. A model
    that gains a kernel is added here; a test checks the list against what each model's run loads
    (``tests/test_train_e2e.py::test_the_kernels_loaded_before_the_clock_are_the_ones_the_run_calls``)."""
    if setup.device.type != "cpu":
        return []
    used = [] if setup.sharded else ["concat_lookup"]
    if config.model.name in ("din", "dien"):  # the attention unit
        used.append("din_attention")
    main = resolved_main(config.model.name, config.model.main)
    if any(v == "dice" for k, v in main.items() if k.endswith("activation")):  # towers, attention: Dice
        used.append("dice")
    if config.model.name == "dien":
        used += ["packed_recurrence", "next_behaviour_loss"]
    if config.iacn.enabled:
        used.append("iacn_fused")
    return [k for k in KERNELS if k in used]


#: held by the process (rank 0) training a run directory: a second ``iacn train`` on it is refused
RUN_LOCK = ".train.lock"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.train.lock`` (:func:`~iacn_torchrec.fileio.try_lock`) while this process trains
    the run directory ``out``: two runs writing one folder would mix their checkpoints and records.
    Held, it also makes the temporary files of crashed earlier writers safe to remove."""
    path = out / RUN_LOCK
    fd = try_lock(path)
    if fd is None:
        raise UserError(f"{out}: another `iacn train` (pid {lock_holder(path)}) is training this run: "
                        "wait for it to finish, or use another --out")
    try:
        yield
    finally:
        release_lock(path, fd)


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """The names of the dense parameters holding a NaN or an infinity (sharded tables are not read)."""
    return [name for name, p in model.named_parameters()
            if type(p) in (torch.Tensor, torch.nn.Parameter) and not bool(torch.isfinite(p).all())]


def train(config: TrainConfig, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train ``config``; returns (and on rank 0 writes) the metrics dictionary."""
    with contextlib.ExitStack() as held:  # what rank 0 holds while it trains: the run's lock
        return _train(config, rank, world_size, held)


def _train(config: TrainConfig, rank: int, world_size: int, held: contextlib.ExitStack) -> dict[str, Any]:
    from iacn_torchrec.distributed.setup import build_training, load_training_state
    from iacn_torchrec.distributed.sharding import plan_summary

    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    out = Path(config.out)
    check_run_directory(out)
    if config.data.path:  # recorded absolute (config.yaml, metrics.json): export and explain find it
        # from any directory. Resume does not compare it (the dataset's content hash stands for it).
        config = replace(config, data=replace(config.data, path=str(Path(config.data.path).resolve())))
    ds = PreparedDataset.open(config.data.path)
    train_loader, test_loader, item_log_q = make_loaders(config, ds, rank, world_size)
    setup = build_training(config, ds, item_log_q=item_log_q, rank=rank, world_size=world_size)
    model, optimizer, device = setup.model, setup.optimizer, setup.device
    # now, not at the first step: a first use's build (~30 s each, when `make install` did not) stays
    # out of train samples/s; recorded, since the ATen fallback of a kernel that failed to build
    # computes the same function up to float rounding, not bit for bit
    kernel_paths = {name: "cpp" if load_kernel(name) is not None else "aten"
                    for name in kernels_used(config, setup)}
    run_versions = versions()  # once: the same for every checkpoint and the metrics
    eval_kw = evaluation_cores(config, setup, world_size)

    state = TrainState()
    history: list[dict[str, Any]] = []  # the periodic evaluations (kept across a resume)
    loss_ema = None
    resumed_from = None
    segments: list[dict[str, Any]] = []  # how each earlier invocation of this run trained its steps
    ckpt_root = str(out / "checkpoints")
    fingerprint = config_fingerprint(config, ds.meta.get("content_hash"))
    plan = plan_summary(setup.plan)  # what the per-rank shards depend on: checked on resume, saved
    newest = latest_step(ckpt_root) if config.resume else None  # the checkpoint to resume from
    if config.resume and rank == 0:  # unfinished newer steps are passed over: say so
        note = incomplete_note(ckpt_root, newest, f"resuming from step {newest}" if newest is not None
                               else "no complete checkpoint: starting from step 0")
        if note:
            print(note, file=sys.stderr, flush=True)
    if newest is not None:
        try:
            ck = load_checkpoint(ckpt_root, newest, rank=rank, world_size=world_size)
        except CheckpointError as e:  # a damaged newest checkpoint: say how to reach an older one
            if isinstance(e, CheckpointWorldSizeError):  # older ones were written by the same ranks
                raise
            steps = complete_steps(ckpt_root)
            if len(steps) < 2:
                raise CheckpointError(f"{e}; it is the run's only checkpoint: start over with --no-resume "
                                      "(which moves it to checkpoints.previous)") from e
            raise CheckpointError(f"{e}; the checkpoint before it (step {steps[-2]}) may be intact: remove "
                                  f"{step_dir(ckpt_root, steps[-1])} to resume from there, or start over "
                                  "with --no-resume") from e
        # one process on the dense path is not sharded: distributed.* plays no part there
        differ = fingerprint_differences(ck.get("config_fingerprint"), fingerprint,
                                          ignore=() if setup.sharded else ("distributed.",))
        if differ:
            raise CheckpointError(
                f"{ckpt_root}: the checkpoint was written by a different configuration ("
                + shown_differences(differ) + "); "
                + main_model_hint(ck.get("config_fingerprint"), fingerprint)
                + "use another --out, or --no-resume to start over (the old checkpoints are moved to "
                "checkpoints.previous, replacing an older set there)"
            )
        saved_plan = ck.get("plan")
        # (checkpoints written before the plan was saved are not checked)
        if saved_plan is not None and saved_plan != plan:
            tables = sorted(k for k in set(saved_plan) | set(plan or {})
                            if saved_plan.get(k) != (plan or {}).get(k))
            raise CheckpointError(
                f"{ckpt_root}: the checkpoint's tables were sharded by another plan ({', '.join(tables)}: "
                f"{saved_plan.get(tables[0])!r} then, {(plan or {}).get(tables[0])!r} now); pin the sharding "
                "types (--sharding) and resume on the same devices"
            )
        try:
            load_training_state(setup, ck["model"], ck["optimizer"])
        except (RuntimeError, KeyError) as e:
            # only a state that does not fit the model is the checkpoint's fault (reproduce then
            # retrains); out-of-memory, process-group and other errors surface as they are
            if isinstance(e, RuntimeError) and not any(
                    m in str(e) for m in ("Error(s) in loading state_dict", "size mismatch")):
                raise
            raise CheckpointError(f"{ckpt_root}: the checkpoint does not fit this model "
                                  f"({state_dict_mismatch(e)})") from e
        try:
            state = TrainState(**ck["train_state"])
        except TypeError as e:  # not a mapping, or fields this version does not have
            raise CheckpointError(f"{step_dir(ckpt_root, newest)}: its 'train_state' is damaged "
                                  f"({e})") from None
        if state.batch_in_epoch >= len(train_loader):  # saved after the epoch's last batch
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        # the position trained so far, not the loader's read-ahead position (pipelining prefetches)
        train_loader.load_state_dict({"epoch": state.epoch, "batch": state.batch_in_epoch})
        set_rng_state(ck["rng"], step_dir(ckpt_root, newest))
        history, loss_ema = list(ck.get("history", [])), ck.get("loss_ema")
        resumed_from = state.step
        segments = list(ck.get("segments") or [{"from_step": 0, "to_step": state.step, "recorded": False}])
        if rank == 0:
            print(f"resuming {out} from its checkpoint at step {state.step} (epoch {state.epoch})",
                  file=sys.stderr, flush=True)
    if rank == 0 and not setup.sharded and config.distributed.sharding_types:
        print("note: distributed.sharding_types is not used: one process with Adam tables is not sharded "
              "(a fused table optimizer or more processes shard it)", file=sys.stderr, flush=True)
    if rank == 0 and config.model.compile:
        print("note: model.compile: the first steps compile the main model (DIN here: ~6 s with a warm "
              "inductor cache, ~40 s from a fresh one) before the progress moves",
              file=sys.stderr, flush=True)
    if rank == 0 and train_loader.dropped_per_epoch and not config.data.drop_last:
        print(f"note: each epoch's last {train_loader.dropped_per_epoch} training sample(s) are not "
              "trained on: a last batch of fewer than 2 samples per rank cannot train BatchNorm",
              file=sys.stderr, flush=True)
    # written once the data opened and any checkpoint proved to be this configuration's: a refused
    # run leaves the directory (and the run that owns it) as it was
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        held.enter_context(run_lock(out))  # before anything in it changes
        for name in ("metrics.json", "config.yaml"):  # what crashed writers of this run left
            remove_temp_siblings(out / name)
        if Path(ckpt_root).is_dir():
            remove_leftovers(ckpt_root)
        if not config.resume and Path(ckpt_root).exists():
            # starting over: the old run's checkpoints would otherwise stay "the newest" (higher
            # steps survive pruning) for a later resume, export or explain, and its metrics.json
            # would pass for this run's until this one writes its own. One generation is kept.
            aside = out / "checkpoints.previous"
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(ckpt_root, aside)
            for name in ("metrics.json", "config.yaml"):  # the set-aside run keeps its record
                if (out / name).exists():
                    os.replace(out / name, aside / name)
            print(f"note: --no-resume: the previous checkpoints (with metrics.json and config.yaml) of "
                  f"{out} were moved to {aside}", file=sys.stderr, flush=True)
        # the run as a config to train it again (`iacn train --config OUT/config.yaml`): its directory
        # absolute (from any working directory it is this run), and no one-off --no-resume, which
        # would set this run's checkpoints aside
        write_atomic(out / "config.yaml", replace(config, out=str(out.resolve()), resume=True).to_yaml())
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        dist.barrier()  # no rank writes a checkpoint before the old ones are out of the way
    last_checkpoint = [resumed_from]

    def this_segment() -> dict[str, Any]:
        """How this invocation trained (a resume may change these: they are not fingerprinted)."""
        return {"from_step": resumed_from or 0, "to_step": state.step, "threads": torch.get_num_threads(),
                "world_size": world_size, "iacn_worker": config.model.iacn_worker,
                "compile": config.model.compile, "kernels": kernel_paths, "versions": run_versions}

    def checkpoint() -> None:
        if last_checkpoint[0] == state.step:  # e.g. a periodic one on the last step: already saved
            return
        last_checkpoint[0] = state.step
        # the loss is checked before each update: the one after it is checked here, so that no
        # checkpoint of a diverged model is written (a resume would start from it)
        bad = nonfinite_parameters(model)
        if bad:
            shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            raise FloatingPointError(f"parameters became non-finite at step {state.step} ({shown}); lower "
                                     "the learning rate")
        final = save_checkpoint(
            ckpt_root,
            state.step,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "train_state": vars(state).copy(),
                "rng": rng_state(),
                "history": history,
                "loss_ema": loss_ema,
                "config_fingerprint": fingerprint,
                "plan": plan,
                "segments": segments + [this_segment()],
            },
            rank=rank,
            world_size=world_size,
        )
        _maybe_inject_fault(state.step, rank, final)

    max_steps = config.max_steps
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * config.epochs
    total = total if max_steps is None else min(max_steps, total)
    with_bar = rank == 0 and show_progress(config.progress)
    bar = tqdm(total=total, initial=state.step, disable=not with_bar, unit="step", dynamic_ncols=True)
    model.train()
    done = max_steps is not None and state.step >= max_steps
    if rank == 0 and resumed_from is not None and (done or state.epoch >= config.epochs):
        print(f"note: the checkpoint at step {state.step} is already at or past this run's end ({total} "
              "steps for its --epochs / --max-steps): nothing to train; evaluating that model",
              file=sys.stderr, flush=True)
    shows_iacn = config.iacn.enabled and config.iacn.lam > 0
    last_eval: tuple[int, dict[str, Any], float] | None = None  # (step, metrics, seconds) of the newest
    last_log = time.perf_counter()
    # one process: Ctrl-C / SIGTERM end the step in progress, checkpoint and stop (with several
    # ranks each would stop at another step; there the launcher's signal ends the job as before)
    stop_signal = _StopOnSignal() if world_size == 1 else None
    stopped_by_signal = False  # the loop broke for a signal (one after the last step changes nothing)

    def periodic_evaluation() -> None:
        nonlocal last_eval
        setup.pause()
        t_eval = time.perf_counter()
        m = evaluate(_unwrap_for_eval(model), test_loader, device, **eval_kw)
        last_eval = (state.step, m, time.perf_counter() - t_eval)
        history.append({"step": state.step, "epoch": state.epoch, **m})
        if rank == 0:
            bar.write(f"step {state.step}: test auc {m['auc']:.4f} gauc {m['gauc']:.4f} "
                      f"logloss {m['logloss']:.4f}")

    if state.eval_pending:  # the evaluation the interrupted run skipped at this step
        periodic_evaluation()
        state.eval_pending = False
    try:
        while state.epoch < config.epochs and not done:
            if state.batch_in_epoch == 0:
                train_loader.set_epoch(state.epoch)
            t0 = time.perf_counter()
            for loss, (_logits, _main_loss, iacn_loss) in setup.train_steps(train_loader):
                state.step += 1
                state.batch_in_epoch += 1
                # every rank's samples (rank 0's count times the ranks undercounts a partial last batch)
                state.train_samples += train_loader.global_batch_samples(state.batch_in_epoch - 1)
                lv = float(loss.detach())
                if not np.isfinite(lv):
                    raise FloatingPointError(
                        f"loss became {lv} at step {state.step}; lower the learning rate")
                loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
                if state.step % config.log_every == 0 or state.step == 1:
                    elapsed = state.train_time_s + time.perf_counter() - t0
                    shown = {"loss": f"{loss_ema:.4f}"}
                    if shows_iacn:
                        shown["iacn"] = f"{float(iacn_loss):.3f}"
                    shown["sps"] = f"{state.train_samples / max(elapsed, 1e-9):,.0f}"
                    bar.set_postfix(shown)
                    # without the bar (--no-progress, or no terminal: logs, CI) a line at most every 10 s
                    if rank == 0 and not with_bar and time.perf_counter() - last_log >= 10:
                        last_log = time.perf_counter()
                        print(f"step {state.step}/{total} (epoch {state.epoch + 1}): "
                              + ", ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
                bar.update(1)
                interrupted = stop_signal is not None and stop_signal.received is not None
                stopped_by_signal = stopped_by_signal or interrupted
                stop = (max_steps is not None and state.step >= max_steps) or interrupted
                periodic_eval = config.eval_every and state.step % config.eval_every == 0
                periodic_ckpt = config.checkpoint_every and state.step % config.checkpoint_every == 0
                if periodic_eval or periodic_ckpt or stop:
                    state.train_time_s += time.perf_counter() - t0
                    # before the checkpoint, which saves the history; also at a --max-steps stop,
                    # so a resumed run's history is the straight run's (a signal ends the step
                    # without it, stopping fast, and leaves it to the resumed run)
                    if periodic_eval and not interrupted:
                        periodic_evaluation()
                    elif periodic_eval:
                        state.eval_pending = True
                    if periodic_ckpt and not stop:
                        checkpoint()
                    t0 = time.perf_counter()
                if stop:
                    done = True
                    break
            else:
                state.train_time_s += time.perf_counter() - t0
                state.epoch += 1
                state.batch_in_epoch = 0
                if not config.checkpoint_every and state.epoch < config.epochs:
                    checkpoint()  # by default at the end of every epoch (and of the run)
                continue
        bar.close()
        checkpoint()  # still under the handlers: a stop signal now lets it finish, then stops
        stopped_by_signal = stopped_by_signal or bool(stop_signal and stop_signal.received)
    finally:
        if stop_signal is not None:
            stop_signal.restore()
    if stopped_by_signal:
        again = "the same command again" if config.resume else "it again without --no-resume"
        raise TrainingInterrupted(
            f"{stop_signal.received} at step {state.step}: checkpoint saved under {ckpt_root}; "
            f"run {again} to resume", stop_signal.signum)
    if rank == 0 and state.step == 0:
        print("warning: no training step ran (too few training samples for one batch?): the model "
              "evaluated and checkpointed is the untrained one", file=sys.stderr, flush=True)
    setup.pause()
    if last_eval is not None and last_eval[0] == state.step:  # evaluated at this very step already
        test, eval_s = last_eval[1], last_eval[2]
    else:
        t_eval = time.perf_counter()
        test = evaluate(_unwrap_for_eval(model), test_loader, device, **eval_kw)
        eval_s = time.perf_counter() - t_eval
    result = {
        "test": test,
        "history": history,
        "steps": state.step,
        "resumed_from_step": resumed_from,
        # a max_steps stop on an epoch's last batch leaves the loop before the epoch is counted
        "epochs_completed": state.epoch + int(0 < steps_per_epoch <= state.batch_in_epoch),
        "train_samples": state.train_samples,
        "train_time_s": state.train_time_s,
        "train_samples_per_s": state.train_samples / max(state.train_time_s, 1e-9),
        "eval_samples_per_s": test["samples"] / max(eval_s, 1e-9),
        "world_size": world_size,
        # the ranks' BatchNorm / Dice running statistics averaged after every step (sharding.py)
        "running_statistics_averaged": world_size > 1,
        "parameters": setup.num_parameters,
        "config": config.to_dict(),
        "dataset": {k: ds.meta.get(k)
                    for k in ("source", "protocol", "max_len", "seed", "counts", "content_hash")},
        "versions": run_versions,
        "kernels": kernel_paths,
        # every invocation that trained these steps (one, unless the run was resumed)
        "segments": segments + [this_segment()],
    }
    if rank == 0:
        # strict JSON: an undefined figure (an AUC over one label) is null, not NaN
        write_atomic(out / "metrics.json",
                     json.dumps(json_safe(result), indent=1, default=str, allow_nan=False))
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        dist.barrier()
    return result


class _StopOnSignal:
    """SIGINT / SIGTERM set ``received`` (the signal's name) instead of stopping the process, so the
    loop finishes its step, checkpoints and stops. Main thread only (elsewhere it does nothing);
    :meth:`restore` puts the previous handlers back. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        import threading

        self.received: str | None = None
        self.signum = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:  # ignored on purpose (a background job): stays so
                continue
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now
            self.restore()
            raise KeyboardInterrupt
        self.received, self.signum = signal.Signals(signum).name, signum
        # os.write, not print: a handler that prints while the main thread writes stderr can raise
        os.write(2, f"\n{self.received}: finishing the current step, then checkpointing (again to stop "
                    "at once)\n".encode())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


FAULT_ENV = "IACN_KILL_AFTER_CHECKPOINT"


def _maybe_inject_fault(step: int, rank: int, path: str) -> None:
    """Fault injection for resume tests: ``IACN_KILL_AFTER_CHECKPOINT=STEP:RANK`` makes that rank
    SIGKILL itself right after checkpoint STEP is complete (as a preempted or crashed worker)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    try:
        want_step, want_rank = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected STEP:RANK") from None
    if step == want_step and rank == want_rank:
        logger.warning("%s: rank %d kills itself after writing %s", FAULT_ENV, rank, path)
        os.kill(os.getpid(), signal.SIGKILL)


def _unwrap_for_eval(model: torch.nn.Module) -> torch.nn.Module:
    """`predict` lives on our framework module; DMP wraps it as ``.module``."""
    return model if hasattr(model, "predict") else _unwrap(model)


# not part of what a checkpoint computes: how and how long a run goes, where IaCN runs, whether the
# main model is compiled (in place: the same parameters), and where the dataset lies (its content
# hash stands for it)
_NOT_FINGERPRINTED = ("out", "epochs", "max_steps", "eval_every", "checkpoint_every", "log_every", "progress",
                      "resume", "threads", "eval_threads", "data.num_test_samples", "data.eval_batch_size",
                      "data.path", "model.iacn_worker", "model.compile",
                      "distributed.backend")  # gloo or nccl: the same numbers


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections → ``{"section.field": value}`` (a mapping-valued field stays whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k.endswith("sharding_types") and f"{prefix}{k}" != "model.main":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_fingerprint(config: TrainConfig, content_hash: str | None) -> str:
    """What must match for a checkpoint to be resumable: the configuration without run-control and
    execution fields, and the prepared dataset's content hash (not its path)."""
    d = {k: v for k, v in _flat(config.to_dict()).items() if k not in _NOT_FINGERPRINTED}
    d["model.main"] = resolved_main(config.model.name, config.model.main)  # the model, not its spelling
    d["data.content_hash"] = content_hash
    return json.dumps(d, sort_keys=True, default=str)


def _stored_main(old: dict[str, Any]) -> Any:
    """The main model a flattened stored fingerprint was built with, every field
    (:func:`~iacn_torchrec.train.config.resolved_main`); one stored before ``model.main`` existed
    gets the model it had (:func:`~iacn_torchrec.train.config.stored_model_main`)."""
    model = {"name": old.get("model.name")} | ({"main": old["model.main"]} if "model.main" in old else {})
    return resolved_main(model["name"], stored_model_main(model))


def main_model_hint(stored: str | None, current: str) -> str:
    """When a checkpoint's main model differs from this run's (``model.main``), the ``--set``
    assignments that build the checkpoint's (e.g. a Wide&Deep run from before its reference deep
    part) followed by "or ", else ``""``."""
    try:
        main = _stored_main(_flat(json.loads(stored or "")))
    except (json.JSONDecodeError, AttributeError):
        return ""
    new = json.loads(current).get("model.main")
    if not isinstance(main, dict) or not isinstance(new, dict) or main == new:
        return ""
    sets = " ".join(f"--set 'model.main.{k}={json.dumps(v)}'" for k, v in main.items() if new.get(k) != v)
    return f"resume the checkpoint's main model with {sets}, or "


def shown_differences(differ: list[str], limit: int = 8) -> str:
    """:func:`fingerprint_differences` for a message: the first ``limit``, then how many more."""
    return "; ".join(differ[:limit]) + (f"; {len(differ) - limit} more" if len(differ) > limit else "")


def fingerprint_differences(stored: str | None, current: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """``field: checkpoint → this run`` for every fingerprinted field that differs. A field the
    checkpoint's fingerprint lacks (added to the config since) counts at its default, the
    behaviour that run had, or at its :data:`~iacn_torchrec.train.config.LEGACY_DEFAULTS` value
    where the default has changed since; :data:`~iacn_torchrec.train.config.DIEN_ONLY` fields count
    for DIEN only. Checkpoints
    of earlier versions (a nested fingerprint with the dataset's path and no hash) are compared
    without the hash. Fields starting with a prefix in ``ignore`` are not compared."""
    try:
        old = json.loads(stored) if stored else None
    except json.JSONDecodeError:
        old = None
    if not isinstance(old, dict):
        return ["no configuration fingerprint in the checkpoint"]
    old = {k: v for k, v in _flat(old).items() if k not in _NOT_FINGERPRINTED}
    old["model.main"] = _stored_main(old)
    new = json.loads(current)
    if "data.content_hash" not in old:
        new.pop("data.content_hash", None)
    defaults = _flat(TrainConfig().to_dict()) | LEGACY_DEFAULTS
    for k in new:
        if k not in old and k in defaults:
            old[k] = json.loads(json.dumps(defaults[k], default=str))
    for fp in (old, new):
        if fp.get("model.name") != "dien":
            for k in DIEN_ONLY:  # read by DIEN only
                fp.pop(k, None)
    return [f"{k}: {old.get(k, '(absent)')!r} → {new.get(k, '(absent)')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not k.startswith(ignore)]
