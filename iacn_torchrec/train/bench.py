"""Training benchmark: samples/s vs DeepCTR-Torch, IaCN overhead, scaling in history length and vocabulary.

``iacn bench train --data DIR [--quick] [--json]`` runs, in one invocation:

1. **Throughput** (forward + backward + update, data loading included, steady state) of DIN,
   DIN+IaCN, DIEN, DIEN+IaCN at batch 128 and 1024 on the prepared dataset, all configurations in
   one worker process and *interleaved* (round-robin blocks of steps), so a load change on this
   shared machine hits every configuration alike; ratios are medians of per-round ratios
   (``iacn_overhead_spread_by_arm``: their quartiles, how far the rounds scatter).
   ``iacn_overhead = step_time(main+IaCN) / step_time(main)``; a capacity-matched control arm
   (``+aux``: the same main model with the aux tables, λ = 0, no sampled negatives) splits it into
   the wider main model's cost and ``iacn_overhead_vs_capacity_matched`` (the capsule network's own);
   ``iacn_overhead_keep_width`` is main+IaCN with ``iacn.keep_width`` (E_aux taken out of the main
   model's own width) over main alone, ``iacn_overhead_small_aux`` main+IaCN with ``iacn.aux_dim=6``
   (the main model widened by 6 per table instead of 18) over main alone.
   An evaluation arm (``din/eval@2048``: whole passes over the test split as ``iacn train``
   evaluates, loader, worker threads and metrics included) runs in the same rounds →
   ``eval_over_train`` (its samples/s over ``din@128``'s, paired per round).
2. **Peer**: DeepCTR-Torch's DIN/DIEN through ``../shared/bench/peer_deepctr.py`` in ``.peer-venv``
   (``bash apps/peer_setup.sh``) on the same samples and threads (the peer builds its samples with
   the dataset's ``max_len`` and ``seed`` from ``meta.json``; ``peer_same_samples`` records whether
   its train and test counts are ours). Measured as the peer measures itself: train samples/s over
   one full epoch of the library's own loop (data loading, forward, backward, optimizer); ours is
   one epoch of ``iacn train`` right before and one right after the peer's epoch, averaged →
   ``speedup_vs_deepctr``. ``--quick`` and DIEN (``speedup_vs_deepctr_dien``) train on the first
   ``--peer-limit`` rows on both sides (the peer's ``--limit``, our ``data.num_train_samples``).
   ``speedup_vs_deepctr_compiled`` is one measured epoch of our compiled DIN, its compile included;
   ``speedup_vs_deepctr_fused_estimate`` is an estimate: the DIN speed-up scaled by the fused arm's
   steady-state ratio to ``din@128``. The full epochs also give the test AUC of both (and of our
   compiled DIN); ``eval_over_train_epoch`` is our first epoch's one cold end-of-epoch evaluation
   against its training throughput (a ~0.3 s pass: thread start-up and first-touch memory weigh on it).
   Evaluation runs as ``iacn train`` evaluates, on ``eval_workers`` batch workers (the machine's cores;
   training: ``--threads`` torch threads and IaCN's worker thread).
3. **Scaling** on synthetic batches (seeded): step time vs history length L ∈ {10, 20, 50, 100}
   with/without IaCN; step time vs item vocabulary (12k, 1M, 10M rows) with the fused row-wise
   Adagrad table optimizer (TorchRec DMP, one process) vs dense Adam. Every step, warm-up included,
   gets a batch of its own (no batch is reused, so the rows a step touches are not in cache from an
   earlier step).
4. **Peak RSS**: every configuration in its own fresh process (``ru_maxrss`` of that process,
   via ``os.wait4``), building the model and training 30 steps.

Every worker runs with ``OMP_WAIT_POLICY=PASSIVE`` (ours and the peer alike): on a loaded machine
OpenMP's spinning barriers otherwise make 2-thread runs many times slower than 1-thread runs. Both
also get :data:`iacn_torchrec.runtime.MALLOC_ENV` (glibc keeps freed memory), as the ``iacn``
command sets for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from iacn_torchrec import versions
from iacn_torchrec.fileio import check_output_path, save_figure, write_atomic
from iacn_torchrec.runtime import command_line

REPO = Path(__file__).resolve().parents[2]
PEER_SCRIPT = REPO.parent / "shared" / "bench" / "peer_deepctr.py"
PEER_DATA = REPO.parent / "shared" / "data" / "amazon-beauty"
PEER_PYTHON = REPO / ".peer-venv" / "bin" / "python"

#: dims that the fused (FBGEMM) table kernels accept (multiples of 4); the dense configs use 18.
FUSED_DIM = 16
#: aux dim of the two narrow-aux arms: ``+iacn/keep`` (E_orig 18 - 6 = 12 ⊕ E_aux 6 per table, the plain
#: width) and ``+iacn/aux6`` (E_orig 18 ⊕ E_aux 6: a third of the paper's widening); both have their
#: AUC lift measured in docs/results/amazon-beauty/variants.md
SMALL_AUX_DIM = 6
#: arm-name tags of the variants of ``arm_overrides``' ``iacn`` codes (plain "+iacn" for "1")
ARM_TAGS = {"w": "+aux", "s": "+iacn/serial", "k": "+iacn/keep", "a": f"+iacn/aux{SMALL_AUX_DIM}"}
#: IaCN variants read against the plain arm alone: result-key part → the arm code
IACN_VARIANTS = {"serial": "s", "keep_width": "k", "small_aux": "a"}
TABLE_WISE = {"uid": "table_wise", "item_orig": "table_wise", "cate_orig": "table_wise",
              "item_aux": "table_wise", "cate_aux": "table_wise"}


# ----------------------------------------------------------------------------------------- configs
def arm_overrides(model: str, iacn: bool | str, batch: int, fused: bool = False,
                  compiled: bool = False) -> list[str]:
    """``TrainConfig.override`` assignments of one benchmark arm (library defaults otherwise).

    ``iacn``: False/"0" the plain main model, True/"1" main + IaCN (IaCN on the worker thread, the
    default), ``"s"`` main + IaCN run serially in the main thread, ``"w"`` the *capacity-matched*
    control: the same main model reading ``E_orig ⊕ E_aux`` (aux tables included) but λ = 0 and no
    sampled negatives, i.e. IaCN's width without the capsule network; ``"k"`` main + IaCN with
    ``iacn.keep_width`` (aux dim :data:`SMALL_AUX_DIM` taken out of ``emb_dim``): the main model
    at its plain width; ``"a"`` main + IaCN with ``iacn.aux_dim`` :data:`SMALL_AUX_DIM` (the main
    model widened by that much, not by ``emb_dim``)."""
    width_only, serial, keep, small = iacn == "w", iacn == "s", iacn == "k", iacn == "a"
    iacn = width_only or serial or keep or small or iacn in (True, "1")
    sets = [f"model.name={model}", f"iacn.enabled={'true' if iacn else 'false'}", f"data.batch_size={batch}"]
    if width_only:
        sets += ["iacn.lam=0", "iacn.sampler=in_batch"]
    if serial:
        sets += ["model.iacn_worker=false"]
    if keep:
        sets += ["iacn.keep_width=true", f"iacn.aux_dim={SMALL_AUX_DIM}"]
    if small:
        sets += [f"iacn.aux_dim={SMALL_AUX_DIM}"]
    if compiled:
        sets += ["model.compile=true"]
    if fused:
        st = {k: v for k, v in TABLE_WISE.items() if iacn or not k.endswith("_aux")}
        sets += ["optim.embedding_optimizer=rowwise_adagrad", f"model.emb_dim={FUSED_DIM}",
                 f"model.user_dim={FUSED_DIM}", f"iacn.aux_dim={FUSED_DIM}",
                 f"distributed.sharding_types={json.dumps(st)}"]
    return sets


def arm_name(model: str, iacn: bool | str, batch: int, fused: bool = False, compiled: bool = False) -> str:
    tag = ARM_TAGS.get(iacn, "+iacn" if iacn in (True, "1") else "")
    return f"{model}{tag}{'/fused' if fused else ''}{'/compiled' if compiled else ''}@{batch}"


def parse_arm(spec: str) -> tuple[list[str], str]:
    """``model:iacn:batch:variant`` (variant ``0`` dense Adam, ``1`` fused row-wise Adagrad tables,
    ``c`` the main model ``torch.compile``-d, ``e`` evaluation passes over the test split in batches
    of ``batch``) → (config overrides, arm name)."""
    model, iacn, batch, variant = spec.split(":")[:4]
    if variant not in ("0", "1", "c", "e"):
        raise ValueError(f"benchmark arm {spec!r}: variant must be 0, 1, c or e")
    if variant == "e":
        sets = arm_overrides(model, iacn, 128) + [f"data.eval_batch_size={int(batch)}"]
        return sets, arm_name(model, iacn, int(batch)).replace("@", "/eval@")
    flags = dict(fused=variant == "1", compiled=variant == "c")
    return arm_overrides(model, iacn, int(batch), **flags), arm_name(model, iacn, int(batch), **flags)


def _config(data: str, sets: list[str], threads: int):
    from iacn_torchrec.train.config import TrainConfig

    base = [f"data.path={json.dumps(data)}", f"threads={threads}", "progress=false"]
    return TrainConfig().override(base + sets)


def _cycle(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _setup_on_dataset(data: str, sets: list[str], threads: int, seed: int):
    """One arm built as ``iacn train`` builds it: ``(config, train loader, test loader, setup)``."""
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.distributed.setup import build_training
    from iacn_torchrec.train.loop import make_loaders, seed_everything

    cfg = _config(data, sets + [f"seed={seed}"], threads)
    seed_everything(cfg.seed)
    ds = PreparedDataset.open(cfg.data.path)
    train_loader, test_loader, item_log_q = make_loaders(cfg, ds, 0, 1)
    return cfg, train_loader, test_loader, build_training(cfg, ds, item_log_q=item_log_q)


def _steps_on_dataset(data: str, sets: list[str], threads: int, seed: int = 0):
    """An endless step iterator of one arm on the prepared dataset (data loading included)."""
    _, train_loader, _, setup = _setup_on_dataset(data, sets, threads, seed)
    setup.model.train()
    return setup.train_steps(_cycle(train_loader))


def _evaluations_on_dataset(data: str, sets: list[str], threads: int, seed: int = 0):
    """An endless iterator of full evaluation passes over the test split, as ``iacn train`` runs
    them (its loader, cores and metrics): ``(test AUC, None)`` per pass. Returns it with the
    number of samples a pass scores and :func:`~iacn_torchrec.train.loop.evaluation_cores`' choice."""
    import torch

    from iacn_torchrec.train.loop import evaluate, evaluation_cores

    cfg, _, test_loader, setup = _setup_on_dataset(data, sets, threads, seed)
    cores = evaluation_cores(cfg, setup, 1)

    def passes():
        while True:
            m = evaluate(setup.model, test_loader, setup.device, **cores)
            yield torch.tensor(m["auc"]), None

    return passes(), test_loader.num_samples, cores


# ------------------------------------------------------------------------------- synthetic batches
class _SynthDataset:
    """What ``build_training`` reads from a dataset: counts and ``meta["max_len"]``."""

    def __init__(self, num_users: int, num_items: int, num_cates: int, max_len: int) -> None:
        self.num_users, self.num_items, self.num_cates = num_users, num_items, num_cates
        self.meta = {"max_len": max_len}


def synthetic_batches(batch: int, max_len: int, num_users: int, num_items: int, num_cates: int,
                      neg_hist: bool, num_negatives: int, seed: int, count: int = 8) -> list[Any]:
    """``count`` seeded batches with the loader's KJT layout: history lengths uniform on
    ``[1, max_len]``, ids uniform (so at 10M items nearly every looked-up row is distinct, across
    batches too: the scaling arms draw one batch per step)."""
    import numpy as np
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from iacn_torchrec.data.loader import BASE_KEYS, IACN_NEG_KEYS, NEG_HIST_KEYS, Batch

    rng = np.random.default_rng(seed)
    keys = BASE_KEYS + (NEG_HIST_KEYS if neg_hist else []) + (IACN_NEG_KEYS if num_negatives else [])
    out = []
    for _ in range(count):
        lens = rng.integers(1, max_len + 1, size=batch)
        n = int(lens.sum())
        item = lambda k: rng.integers(1, num_items + 1, size=k)  # noqa: E731
        cate = lambda k: rng.integers(1, num_cates + 1, size=k)  # noqa: E731
        parts = [rng.integers(1, num_users + 1, size=batch), item(batch), cate(batch), item(n), cate(n)]
        lengths = [np.ones(batch, np.int64)] * 3 + [lens, lens]
        if neg_hist:
            parts += [item(n), cate(n)]
            lengths += [lens, lens]
        labels = rng.integers(0, 2, size=batch)
        if num_negatives:  # the loader's layout: S negatives for each label-1 row, none for the others
            p = int(labels.sum())
            parts += [item(p * num_negatives), cate(p * num_negatives)]
            lengths += [num_negatives * labels] * 2
        kjt = KeyedJaggedTensor(keys=keys, values=torch.from_numpy(np.concatenate(parts).astype(np.int64)),
                                lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int64)))
        out.append(Batch(kjt, torch.from_numpy(labels.astype(np.float32))))
    return out


def _steps_on_synthetic(sets: list[str], threads: int, num_items: int, max_len: int, batch: int,
                        steps: int):
    """(step iterator, how the arm trains its tables) on ``steps`` seeded synthetic batches, each
    used once (then again from the first, should more steps be taken)."""
    import itertools

    from iacn_torchrec.distributed.setup import build_training
    from iacn_torchrec.train.loop import seed_everything

    cfg = _config("synthetic", sets, threads)
    seed_everything(cfg.seed)
    ds = _SynthDataset(num_users=22_363, num_items=num_items, num_cates=195, max_len=max_len)
    setup = build_training(cfg, ds)
    setup.model.train()
    S = cfg.iacn.num_negatives if cfg.iacn.enabled and cfg.iacn.sampler != "in_batch" else 0
    batches = synthetic_batches(batch, max_len, ds.num_users, num_items, ds.num_cates,
                                neg_hist=cfg.model.name == "dien", num_negatives=S, seed=cfg.seed,
                                count=max(1, steps))
    kernels = {f"{module}.{name}": f"{ps.sharding_type}/{ps.compute_kernel}"
               for module, shardings in (setup.plan.plan.items() if setup.plan else ())
               for name, ps in shardings.items()}
    tables = {"sharded": setup.sharded, "embedding_optimizer": cfg.optim.embedding_optimizer,
              "kernels": kernels}
    return setup.train_steps(itertools.cycle(batches)), tables


# ---------------------------------------------------------------------------------------- workers
def _time_steps(it, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        loss, _ = next(it)
    float(loss.detach())
    return (time.perf_counter() - t) / n


def _interleaved(arms: dict[str, tuple[Any, int]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin timing: ``arms[name] = (step iterator, steps per block)`` → seconds/step per round,
    after ``warmup`` untimed steps of each arm. Round ``r`` starts at the ``r``-th arm (the order
    rotates), so no arm always follows the same one (e.g. the evaluation arm's cache-cold aftermath)."""
    for it, _k in arms.values():
        if warmup:
            _time_steps(it, warmup)
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            it, k = arms[name]
            times[name].append(_time_steps(it, k))
    return times


def worker_throughput(a: argparse.Namespace) -> dict[str, Any]:
    """All real-data arms in this process, interleaved; seconds/step per round."""
    import torch

    torch.set_num_threads(a.threads)
    arms, samples, eval_cores = {}, {}, {}
    for spec in a.arms:
        sets, name = parse_arm(spec)
        if spec.split(":")[3] == "e":  # one evaluation pass per round
            it, samples[name], eval_cores[name] = _evaluations_on_dataset(a.data, sets, a.threads)
            arms[name] = (it, 1)
            continue
        k = max(2, a.block_samples // int(spec.split(":")[2]))
        arms[name] = (_steps_on_dataset(a.data, sets, a.threads), k)
    return {"step_s": _interleaved(arms, a.rounds, warmup=a.warmup), "samples_per_step": samples,
            "eval_cores": eval_cores}


def worker_scaling(a: argparse.Namespace) -> dict[str, Any]:
    """Synthetic-batch arms (``model:iacn:batch:fused:L:items``), interleaved."""
    import torch

    torch.set_num_threads(a.threads)
    arms, tables = {}, {}
    for spec in a.arms:
        model, iacn, batch, fused, L, items = spec.split(":")
        sets = arm_overrides(model, iacn == "1", int(batch), fused == "1")
        steps, tables[spec] = _steps_on_synthetic(sets, a.threads, int(items), int(L), int(batch),
                                                  steps=a.warmup + a.rounds * a.block_steps)
        arms[spec] = (steps, a.block_steps)
    return {"step_s": _interleaved(arms, a.rounds, warmup=a.warmup), "tables": tables}


def worker_rss(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    it = _steps_on_dataset(a.data, parse_arm(a.arms[0])[0], a.threads)
    _time_steps(it, 30)
    return {}


def worker_auc(a: argparse.Namespace) -> dict[str, Any]:
    """One epoch of ``iacn train`` (the library's loop): test AUC, train and eval samples/s."""
    from iacn_torchrec.train.loop import train

    with tempfile.TemporaryDirectory(prefix="iacn-bench-") as out:
        run_sets = [f"out={json.dumps(out)}", "epochs=1", "resume=false", "checkpoint_every=0"]
        if a.train_limit:  # the peer's --limit: its first N train rows
            run_sets.append(f"data.num_train_samples={a.train_limit}")
        sets = parse_arm(a.arms[0])[0] + run_sets
        cfg = _config(a.data, sets, a.threads)
        r = train(cfg)
    return {"test_auc": r["test"]["auc"], "train_samples": r["train_samples"],
            "train_samples_per_s": r["train_samples_per_s"], "eval_samples_per_s": r["eval_samples_per_s"]}


WORKERS = {"throughput": worker_throughput, "scaling": worker_scaling, "rss": worker_rss, "auc": worker_auc}


# ------------------------------------------------------------------------------------ orchestrator
def _env() -> dict[str, str]:
    """Our workers' and the peer's environment alike: passive OpenMP waits, and glibc keeping freed
    memory as the ``iacn`` command does (:mod:`iacn_torchrec.runtime`)."""
    from iacn_torchrec.runtime import MALLOC_ENV

    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    for k, v in MALLOC_ENV.items():
        env.setdefault(k, v)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_process(cmd: list[str], timeout: float | None = None) -> tuple[dict[str, Any], float]:
    """Run ``cmd``; returns (its last stdout line as JSON, its peak RSS in MiB via ``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=_env(), cwd=REPO)
        t0 = time.monotonic()
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.monotonic() - t0 > timeout:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.strip()]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (exit {p.returncode}):\n{err.read()[-3000:]}")
        return json.loads(lines[-1]), usage.ru_maxrss / 1024.0


def _worker_cmd(kind: str, a: argparse.Namespace, arms: list[str], **extra: Any) -> list[str]:
    cmd = [sys.executable, "-m", "iacn_torchrec.train.bench", "--worker", kind, "--data", str(a.data),
           "--threads", str(a.threads)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd + ["--arms", *arms]


def check_peer(a: argparse.Namespace) -> None:
    """The peer's venv, script and data, checked before any timing starts."""
    if not PEER_PYTHON.exists():
        raise SystemExit(f"iacn bench train: {PEER_PYTHON} missing: run `bash apps/peer_setup.sh` first "
                         "(or pass --no-peer)")
    for what, path in (("peer script", PEER_SCRIPT), ("peer data (--peer-data)", Path(a.peer_data))):
        if not path.exists():
            raise SystemExit(f"iacn bench train: {what} {path} not found: it comes from the shared/ "
                             "checkout beside this repository (or pass --no-peer)")


def run_peer(a: argparse.Namespace, model: str, limit: int | None) -> tuple[dict[str, Any], float]:
    """One epoch of the peer's ``model`` on its first ``limit`` train rows (all if None), its samples
    built as the dataset's (``max_len``, ``seed`` of ``a.meta``)."""
    check_peer(a)
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--data", str(a.peer_data), "--model", model, "--epochs", "1",
           "--threads", str(a.threads), "--max-len", str(a.meta["max_len"]), "--seed", str(a.meta["seed"]),
           "--batch", "128"]
    if limit:
        cmd += ["--limit", str(limit)]
    return run_process(cmd)


def peer_record(peer: dict[str, Any], rss: float, a: argparse.Namespace, limit: int | None) -> dict[str, Any]:
    """What the peer's run reports, and whether it trained and tested on as many samples as we do
    (the same din-protocol samples: the peer's are built from ``--peer-data``, ours are ``--data``)."""
    counts = a.meta["counts"]
    n_train = min(limit, counts["train_samples"]) if limit else counts["train_samples"]
    return {"samples_per_s": peer["train_samples_per_s"], "test_auc": peer["per_epoch"][-1]["test_auc"],
            "n_train": peer["n_train"], "n_test": peer.get("n_test"),
            "eval_samples_per_s": peer["eval_samples_per_s"], "peak_rss_mib": rss,
            "threads": peer.get("threads"), "seed": peer.get("seed"), "versions": peer.get("versions"),
            "same_samples": peer["n_train"] == n_train and peer.get("n_test") == counts["test_samples"]}


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _paired(num: list[float], den: list[float]) -> float:
    return _med([x / y for x, y in zip(num, den, strict=True)])


def _paired_spread(num: list[float], den: list[float]) -> list[float]:
    """``[25 %, 75 %]`` quartiles of the per-round ratios behind :func:`_paired`: how far one run's
    rounds scatter (the second core's availability moves the IaCN worker's figures)."""
    ratios = [x / y for x, y in zip(num, den, strict=True)]
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q[0], q[2]]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def orchestrate(a: argparse.Namespace) -> dict[str, Any]:
    if not a.no_peer:
        check_peer(a)
    from iacn_torchrec.kernels import KERNELS, load_kernel

    res: dict[str, Any] = {"machine": _machine(), "versions": versions(), "threads": a.threads,
                           "data": str(a.data), "command": command_line(),
                           "settings": {"rounds": a.rounds, "block_samples": a.block_samples,
                                        "warmup": a.warmup, "peer_limit": a.peer_limit,
                                        "peer_data": None if a.no_peer else str(a.peer_data)},
                           "data_meta": {k: a.meta.get(k) for k in ("protocol", "max_len", "seed",
                                                                    "content_hash")},
                           # which the arms ran: the fused CPU kernels or the ATen ops
                           "iacn_kernel": "fused" if load_kernel("iacn_fused") is not None else "aten",
                           "din_attention_kernel": "fused" if load_kernel("din_attention") is not None
                           else "aten",
                           "recurrence_kernel": "cpp" if load_kernel("packed_recurrence") is not None
                           else "python",
                           "lookup_kernel": "cpp" if load_kernel("concat_lookup") is not None else "aten",
                           "dien_aux_loss_kernel": "cpp" if load_kernel("next_behaviour_loss") is not None
                           else "aten",
                           # all of them (the keys above are kept for comparison with older runs)
                           "kernels": {k: "cpp" if load_kernel(k) is not None else "aten" for k in KERNELS},
                           "quick": bool(a.quick), "load_before": _uptime()}
    batches = [128] if a.quick else [128, 1024]
    models = ["din"] if a.quick else ["din", "dien"]
    specs = [f"{m}:{i}:{b}:0" for b in batches for m in models for i in ("0", "w", "1")]
    specs += [f"{m}:s:128:0" for m in models]  # IaCN serially in the main thread: the worker's effect
    specs += [f"{m}:k:128:0" for m in models]  # IaCN at the plain model's width (iacn.keep_width)
    specs += [f"{m}:a:128:0" for m in models]  # IaCN with a narrower aux table (iacn.aux_dim=6)
    specs += ["din:0:128:c", "din:1:128:c"]  # main model torch.compile-d (IaCN then runs serially)
    if not a.quick:
        specs += [f"din:{i}:128:1" for i in (0, 1)]  # fused sparse table optimizer arms
    specs += ["din:0:2048:e"]  # evaluation passes over the test split, as `iacn train` evaluates
    _log(f"[1/4] throughput, interleaved: {', '.join(specs)}")
    tp, _ = run_process(_worker_cmd("throughput", a, specs, rounds=a.rounds, block_samples=a.block_samples,
                                    warmup=a.warmup))
    step = {k: v for k, v in tp["step_s"].items() if k not in tp["samples_per_step"]}
    table = {}
    for name, ts in tp["step_s"].items():
        samples = tp["samples_per_step"].get(name, int(name.rsplit("@", 1)[1]))
        table[name] = {"step_ms": 1e3 * _med(ts), "samples_per_s": samples / _med(ts)}
    # evaluation vs training throughput, paired per round (DIN: a test-split pass vs a batch-128 step)
    n_test = tp["samples_per_step"]["din/eval@2048"]
    res["eval_over_train"] = n_test / 128 * _paired(tp["step_s"]["din@128"], tp["step_s"]["din/eval@2048"])
    res["eval_workers"] = tp["eval_cores"]["din/eval@2048"]
    overhead, vs_capacity, width, spread = {}, {}, {}, {}
    # serial: IaCN without the worker thread; keep_width: without widening the main model; small_aux:
    # widening it by SMALL_AUX_DIM, not emb_dim
    variants: dict[str, dict[str, float]] = {kind: {} for kind in IACN_VARIANTS}
    for name in step:
        kind = next((k for k, code in IACN_VARIANTS.items() if ARM_TAGS[code] in name), None)
        if kind is not None:
            base = name.replace(ARM_TAGS[IACN_VARIANTS[kind]], "")
            variants[kind][base] = _paired(step[name], step[base])
        elif "+iacn" in name:
            base = name.replace("+iacn", "")
            overhead[base] = _paired(step[name], step[base])
            spread[base] = _paired_spread(step[name], step[base])
            matched = name.replace("+iacn", "+aux")
            if matched in step:  # the capsule network's own cost, and the wider main model's
                vs_capacity[base] = _paired(step[name], step[matched])
                width[base] = _paired(step[matched], step[base])
    res["throughput"] = table
    res["iacn_overhead_by_arm"] = overhead
    res["iacn_overhead_spread_by_arm"] = spread
    res["iacn_overhead_vs_capacity_matched_by_arm"] = vs_capacity
    res["width_overhead_by_arm"] = width
    for kind, ratios in variants.items():
        res[f"iacn_overhead_{kind}_by_arm"] = ratios
    res["iacn_overhead"] = overhead["din@128"]
    res["iacn_overhead_vs_capacity_matched"] = vs_capacity["din@128"]
    if "dien@128" in overhead:
        res["iacn_overhead_dien"] = overhead["dien@128"]
        res["iacn_overhead_vs_capacity_matched_dien"] = vs_capacity["dien@128"]
    for kind in ("keep_width", "small_aux"):  # headline figures (serial has none)
        for arm, suffix in (("din@128", ""), ("dien@128", "_dien")):
            if arm in variants[kind]:
                res[f"iacn_overhead_{kind}{suffix}"] = variants[kind][arm]

    if not a.no_peer:
        _log("[2/4] DeepCTR-Torch peer (DIN), one epoch; ours, one epoch of `iacn train` right before and "
             "after it")
        limit = a.peer_limit if a.quick else None

        def around_peer(model: str, limit: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            """One epoch of ``iacn train`` (the library's own loop, like for like with the peer's
            figure) right before and one right after the peer's epoch, on the same train rows."""
            cmd = _worker_cmd("auc", a, [f"{model}:0:128:0"], **({"train_limit": limit} if limit else {}))
            before, _ = run_process(cmd)
            peer, rss = run_peer(a, model, limit)
            after, _ = run_process(cmd)
            return [before, after], peer_record(peer, rss, a, limit)

        epochs, peer_din = around_peer("din", limit)
        res["peer"] = {"din": peer_din}
        din_sps = [e["train_samples_per_s"] for e in epochs]
        res["ours_din_128_samples_per_s"] = din_sps
        res["speedup_vs_deepctr"] = statistics.fmean(din_sps) / res["peer"]["din"]["samples_per_s"]
        if "din/fused@128" in table:  # not measured against the peer: the DIN figure × a steady-state ratio
            fused_gain = table["din/fused@128"]["samples_per_s"] / table["din@128"]["samples_per_s"]
            res["speedup_vs_deepctr_fused_estimate"] = fused_gain * res["speedup_vs_deepctr"]
        if not a.quick:
            _log("      DIEN: ours and the peer's, one epoch each on the first --peer-limit train rows")
            dien_epochs, res["peer"]["dien"] = around_peer("dien", a.peer_limit)
            res["ours_dien_128_samples_per_s"] = [e["train_samples_per_s"] for e in dien_epochs]
            res["ours_dien_epoch"] = dien_epochs[0]
            res["speedup_vs_deepctr_dien"] = (statistics.fmean(res["ours_dien_128_samples_per_s"])
                                              / res["peer"]["dien"]["samples_per_s"])
            _log("      one epoch of our compiled DIN (its compile included)")
            auc = epochs[0]
            res["ours_din_epoch"] = auc
            res["ours_din_compiled_epoch"], _ = run_process(_worker_cmd("auc", a, ["din:0:128:c"]))
            res["speedup_vs_deepctr_compiled"] = (res["ours_din_compiled_epoch"]["train_samples_per_s"]
                                                  / res["peer"]["din"]["samples_per_s"])
            res["auc_delta_vs_deepctr"] = auc["test_auc"] - res["peer"]["din"]["test_auc"]
            # the one cold evaluation at the end of that epoch, against the epoch's training
            res["eval_over_train_epoch"] = auc["eval_samples_per_s"] / auc["train_samples_per_s"]

    if not a.quick:
        _log("[3/4] scaling: history length, then vocabulary")
        lens = [10, 20, 50, 100]
        specs = [f"din:{i}:128:0:{L}:12101" for L in lens for i in (0, 1)]
        sc, _ = run_process(_worker_cmd("scaling", a, specs, rounds=a.rounds, block_steps=5, warmup=2))
        main_t = {L: sc["step_s"][f"din:0:128:0:{L}:12101"] for L in lens}
        iacn_t = {L: sc["step_s"][f"din:1:128:0:{L}:12101"] for L in lens}
        res["scaling_length"] = [{"L": L, "din_ms": 1e3 * _med(main_t[L]),
                                  "din_iacn_ms": 1e3 * _med(iacn_t[L]),
                                  "iacn_overhead": _paired(iacn_t[L], main_t[L])} for L in lens]
        vocab = [12_101, 1_000_000, 10_000_000]
        # the fused arms of every size interleaved in one process (paired ratios, as above); the dense
        # arms one process per size: the 10M dense arm alone needs ~3 GB
        fused = {V: f"din:0:128:1:20:{V}" for V in vocab}
        sf, _ = run_process(_worker_cmd("scaling", a, list(fused.values()), rounds=8, block_steps=4,
                                        warmup=3))
        rows = []
        for V in vocab:
            dense = f"din:0:128:0:20:{V}"
            sv, rss = run_process(_worker_cmd("scaling", a, [dense], rounds=4, block_steps=3, warmup=2))
            rows.append({"items": V, "dense_adam_ms": 1e3 * _med(sv["step_s"][dense]),
                         "fused_rowwise_adagrad_ms": 1e3 * _med(sf["step_s"][fused[V]]),
                         "dense_process_peak_rss_mib": rss})
        for r in rows:
            r["dense_vs_12k"] = r["dense_adam_ms"] / rows[0]["dense_adam_ms"]
            r["fused_vs_12k"] = _paired(sf["step_s"][fused[r["items"]]], sf["step_s"][fused[vocab[0]]])
        res["scaling_vocab"] = rows
        res["fused_10m_over_12k"] = rows[-1]["fused_vs_12k"]

        _log("[4/4] peak RSS, one fresh process per configuration")
        rss = {}
        for spec in [f"{m}:{i}:{b}:0" for b in (128, 1024) for m in ("din", "dien") for i in (0, 1)]:
            _, rss[parse_arm(spec)[1]] = run_process(_worker_cmd("rss", a, [spec]))
        for name, v in rss.items():
            table[name]["peak_rss_mib"] = v
    res["load_after"] = _uptime()
    return res


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__repr__()
    except OSError:
        return "?"


def _machine() -> dict[str, Any]:
    import platform

    cpu = "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def render(res: dict[str, Any]) -> str:
    """Human-readable summary (the tables of docs/results/performance.md)."""
    lines = [f"machine: {res['machine']['cpu']} ({res['machine']['cores']} cores), threads {res['threads']}, "
             f"load {res['load_before']} -> {res['load_after']}", "",
             "| arm | step ms | samples/s | peak RSS MiB |", "|---|---:|---:|---:|"]
    for name, r in res["throughput"].items():
        rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "–"  # measured per config in full runs
        lines.append(f"| {name} | {r['step_ms']:.2f} | {r['samples_per_s']:,.0f} | {rss} |")
    spread = res.get("iacn_overhead_spread_by_arm", {})
    lines += ["", "iacn_overhead (paired per round; the middle half of the rounds in brackets): " + ", ".join(
        f"{k} {v:.3f}" + (f" ({spread[k][0]:.2f}–{spread[k][1]:.2f})" if k in spread else "")
        for k, v in res["iacn_overhead_by_arm"].items())]
    if res.get("iacn_overhead_vs_capacity_matched_by_arm"):
        lines.append("iacn_overhead_vs_capacity_matched (vs aux tables, λ=0): " + ", ".join(
            f"{k} {v:.3f}" for k, v in res["iacn_overhead_vs_capacity_matched_by_arm"].items()))
        lines.append("width overhead (aux tables, λ=0, vs plain): " + ", ".join(
            f"{k} {v:.3f}" for k, v in res["width_overhead_by_arm"].items()))
    if "eval_over_train" in res:
        workers = res.get("eval_workers", {})
        cores = (f"{workers['batch_workers']} batch workers" if "batch_workers" in workers
                 else f"{workers.get('threads', '?')} threads")
        lines.append("evaluation / training throughput (DIN, test-split passes vs batch-128 steps, "
                     f"paired per round; evaluation on {cores}, as `iacn train` evaluates): "
                     f"{res['eval_over_train']:.1f}x")
    from iacn_torchrec.train.config import ModelConfig

    d = ModelConfig().emb_dim
    if res.get("iacn_overhead_keep_width_by_arm"):
        lines.append(f"iacn_overhead at the plain width (iacn.keep_width: E_orig {d - SMALL_AUX_DIM} ⊕ "
                     f"E_aux {SMALL_AUX_DIM} per table): " + ", ".join(
                         f"{k} {v:.3f}" for k, v in res["iacn_overhead_keep_width_by_arm"].items()))
    if res.get("iacn_overhead_small_aux_by_arm"):
        lines.append(f"iacn_overhead with a narrower aux table (iacn.aux_dim={SMALL_AUX_DIM}: E_orig {d} ⊕ "
                     f"E_aux {SMALL_AUX_DIM} per table): " + ", ".join(
                         f"{k} {v:.3f}" for k, v in res["iacn_overhead_small_aux_by_arm"].items()))
    if res.get("iacn_overhead_serial_by_arm"):
        lines.append("iacn_overhead with IaCN serial in the main thread (no worker): " + ", ".join(
            f"{k} {v:.3f}" for k, v in res["iacn_overhead_serial_by_arm"].items()))
    if "speedup_vs_deepctr" in res:
        p = res["peer"]["din"]
        ours = res["ours_din_128_samples_per_s"]

        def before_after(xs: list[float]) -> str:
            return f"{statistics.fmean(xs):,.0f} (the same rows, before / after it: " + \
                " / ".join(f"{x:,.0f}" for x in xs) + ")"

        for model, peer in res["peer"].items():
            if not peer.get("same_samples", True):
                n = f"{peer['n_train']}/{peer['n_test']}"
                lines.append(f"WARNING: the peer's {model} trained/tested on {n} "
                             "samples, not as many as ours: --peer-data is not the source of --data, so "
                             "its speed-up and AUC compare different samples")
        lines.append(f"DeepCTR-Torch DIN {p['samples_per_s']:,.0f} samples/s (one epoch of {p['n_train']:,} "
                     f"rows, its own loop) vs `iacn train` {before_after(ours)} -> speedup_vs_deepctr "
                     f"{res['speedup_vs_deepctr']:.2f}")
        if "speedup_vs_deepctr_compiled" in res:
            c = res["ours_din_compiled_epoch"]["train_samples_per_s"]
            lines.append(f"  our main model torch.compile-d, one epoch, its compile included: {c:,.0f} "
                         f"samples/s -> {res['speedup_vs_deepctr_compiled']:.2f}")
        if "speedup_vs_deepctr_fused_estimate" in res:
            lines.append(f"  (estimate, not measured against the peer) fused row-wise Adagrad tables (dim "
                         f"{FUSED_DIM}): {res['speedup_vs_deepctr_fused_estimate']:.2f}, the speed-up × the "
                         "fused arm's steady-state ratio to din@128")
        if "speedup_vs_deepctr_dien" in res:
            d = res["peer"]["dien"]
            lines.append(f"DeepCTR-Torch DIEN {d['samples_per_s']:,.0f} samples/s (one epoch of the first "
                         f"{d['n_train']:,} rows) vs ours {before_after(res['ours_dien_128_samples_per_s'])} "
                         f"-> speedup_vs_deepctr_dien {res['speedup_vs_deepctr_dien']:.2f}")
        if "ours_din_epoch" in res:
            o = res["ours_din_epoch"]
            lines.append(f"1 epoch DIN test AUC: ours {o['test_auc']:.4f} vs DeepCTR-Torch "
                         f"{p['test_auc']:.4f}; its one cold end-of-epoch evaluation / the epoch's training: "
                         f"{res['eval_over_train_epoch']:.1f}x")
            if "ours_din_compiled_epoch" in res:
                lines.append(f"  compiled: test AUC {res['ours_din_compiled_epoch']['test_auc']:.4f}")
    if "scaling_length" in res:
        lines += ["", "| L | DIN ms | DIN+IaCN ms | overhead |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['L']} | {r['din_ms']:.2f} | {r['din_iacn_ms']:.2f} | {r['iacn_overhead']:.3f} |"
                  for r in res["scaling_length"]]
        lines += ["", "| item rows | dense Adam ms | fused row-wise Adagrad ms | dense ×12k | fused ×12k |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['items']:,} | {r['dense_adam_ms']:.1f} | {r['fused_rowwise_adagrad_ms']:.1f} | "
                  f"{r['dense_vs_12k']:.2f} | {r['fused_vs_12k']:.2f} |" for r in res["scaling_vocab"]]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 if "scaling_length" in res else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    ax = axes[0][0]
    names = [k for k in res["throughput"] if "/eval@" not in k]  # training arms (evaluation: in the text)
    vals = [res["throughput"][k]["samples_per_s"] for k in names]
    colors = ["tab:orange" if "+iacn" in k else "tab:green" if "+aux" in k else "tab:blue" for k in names]
    if "peer" in res:  # epoch figures, ours beside the peer's: not the steady-state bars above them
        epochs = [("din", "ours_din_128_samples_per_s"), ("dien", "ours_dien_128_samples_per_s")]
        for model, key in epochs:
            if model in res["peer"]:
                names += [f"ours {model}@128 (epoch)", f"deepctr {model}@128 (epoch)"]
                vals += [statistics.fmean(res[key]), res["peer"][model]["samples_per_s"]]
                colors += ["tab:purple", "tab:gray"]
    ax.barh(names, vals, color=colors)
    ax.set_xlabel("train samples/s (interleaved steady state; '(epoch)': one epoch each, vs the peer)")
    ax.set_title("throughput (blue: main, green: +aux width, orange: +IaCN)")
    ax.invert_yaxis()
    if n == 3:
        ax = axes[0][1]
        sl = res["scaling_length"]
        ax.plot([r["L"] for r in sl], [r["din_ms"] for r in sl], "o-", label="DIN")
        ax.plot([r["L"] for r in sl], [r["din_iacn_ms"] for r in sl], "o-", label="DIN+IaCN")
        ax.set_xlabel("max history length L")
        ax.set_ylabel("step ms (batch 128)")
        ax.set_title("step time vs history length")
        ax.legend()
        ax = axes[0][2]
        sv = res["scaling_vocab"]
        ax.plot([r["items"] for r in sv], [r["dense_adam_ms"] for r in sv], "o-", label="dense Adam")
        ax.plot([r["items"] for r in sv], [r["fused_rowwise_adagrad_ms"] for r in sv], "o-",
                label="fused row-wise Adagrad")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("item table rows")
        ax.set_ylabel("step ms (DIN, batch 128)")
        ax.set_title("step time vs vocabulary")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="prepared/amazon-beauty-din-L20-s0",
                   help="prepared din-protocol dataset (iacn prepare --out)")
    p.add_argument("--peer-data", dest="peer_data", default=str(PEER_DATA),
                   help="folder with interactions.tsv / items.tsv for the peer script")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, ours and the peer's (default 1: faster for both on this 2-core box)")
    p.add_argument("--quick", action="store_true", help="DIN only, batch 128 (plain, +aux, +IaCN, serial, "
                   "keep-width, aux 6, compiled with and without IaCN, evaluation) and the peer's DIN on the "
                   "first --peer-limit train rows, ours on the same rows")
    p.add_argument("--no-peer", dest="no_peer", action="store_true", help="skip DeepCTR-Torch")
    p.add_argument("--peer-limit", dest="peer_limit", type=int, default=30_000,
                   help="the first N train rows that both sides train on in the epochs of --quick (DIN) "
                   "and of DIEN")
    p.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    p.add_argument("--block-samples", dest="block_samples", type=int, default=2560,
                   help="samples per arm and round")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per arm")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line last")
    p.add_argument("--out", metavar="PREFIX",
                   help="write PREFIX.json and PREFIX.png (e.g. docs/results/performance)")
    # internal: worker processes
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--arms", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--block-steps", dest="block_steps", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--train-limit", dest="train_limit", type=int, default=0, help=argparse.SUPPRESS)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what would fail (or mean nothing) only after minutes of timing: counts out of range, a
    folder that is not a prepared dataset, an ``--out`` that cannot be written. Sets ``args.meta``."""
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.errors import UserError

    for flag, value, least in (("--threads", args.threads, 1), ("--rounds", args.rounds, 1),
                               ("--block-samples", args.block_samples, 1), ("--warmup", args.warmup, 0),
                               ("--peer-limit", args.peer_limit, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: no such prepared dataset "
                        "(make one with `iacn prepare --source tsv ... --out DIR`)")
    args.meta = PreparedDataset.open(args.data).meta  # a DataError names what is wrong with it
    if args.out:
        for suffix in (".json", ".png"):
            check_output_path(args.out + suffix, "--out", parents=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)


def run(args: argparse.Namespace) -> int:
    if args.worker:
        res = WORKERS[args.worker](args)
        print(json.dumps(res))
        return 0
    check_arguments(args)
    res = orchestrate(args)
    print(render(res))
    if args.out:
        write_atomic(Path(args.out + ".json"), json.dumps(res, indent=1))
        plot(res, Path(args.out + ".png"))
    if args.json:
        print(json.dumps(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="iacn bench train", description=__doc__.strip().splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
