"""Train a CTR model (DIN, DIEN, Wide&Deep, DLRM) with or without IaCN on a prepared dataset.

Examples::

    iacn train --data prepared/beauty --model din --iacn --delta 0.3 --lam 1 --epochs 1 --out runs/din-iacn
    iacn train --config my.yaml --set optim.embedding_optimizer=rowwise_adagrad --out runs/x

Under torchrun/TorchX (``RANK``/``WORLD_SIZE`` in the environment) every process runs this same
command and TorchRec shards the tables across them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from iacn_torchrec.fileio import check_output_path
from iacn_torchrec.train.config import DIEN_ONLY, EMBEDDING_OPTIMIZERS, MODELS, ConfigError, TrainConfig

# flag -> (config path, type)
_FLAGS: dict[str, tuple[str, type]] = {
    "data": ("data.path", str),
    "batch_size": ("data.batch_size", int),
    "eval_batch_size": ("data.eval_batch_size", int),
    "model": ("model.name", str),
    "emb_dim": ("model.emb_dim", int),
    "compile": ("model.compile", bool),
    "delta": ("iacn.delta", float),
    "lam": ("iacn.lam", float),
    "pow_p": ("iacn.pow_p", float),
    "k_max": ("iacn.k_max", int),
    "routing_iters": ("iacn.routing_iters", int),
    "aux_dim": ("iacn.aux_dim", int),
    "keep_width": ("iacn.keep_width", bool),
    "sampler": ("iacn.sampler", str),
    "num_negatives": ("iacn.num_negatives", int),
    "lr": ("optim.lr", float),
    "embedding_optimizer": ("optim.embedding_optimizer", str),
    "aux_embedding_optimizer": ("optim.aux_embedding_optimizer", str),
    "embedding_lr": ("optim.embedding_lr", float),
    "epochs": ("epochs", int),
    "max_steps": ("max_steps", int),
    "seed": ("seed", int),
    "threads": ("threads", int),
    "eval_threads": ("eval_threads", int),
    "eval_every": ("eval_every", int),
    "checkpoint_every": ("checkpoint_every", int),
    "out": ("out", str),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with config sections (data, model, iacn, optim, ...)")
    p.add_argument("--data", help="prepared dataset directory (iacn prepare --out)")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--iacn", action="store_true", default=None, help="add the IaCN auxiliary task")
    p.add_argument("--no-iacn", dest="iacn", action="store_false", help="plain main model (the default)")
    p.add_argument("--delta", type=float, help="δ: share of the main-model gradient in E_aux (default 0.3)")
    p.add_argument("--lam", type=float, help="λ: weight of L_IaCN (default 1.0)")
    p.add_argument("--pow-p", dest="pow_p", type=float, help="label-aware attention power p")
    p.add_argument("--k-max", dest="k_max", type=int, help="maximum number of interest capsules")
    p.add_argument("--routing-iters", dest="routing_iters", type=int)
    p.add_argument("--aux-dim", dest="aux_dim", type=int, help="E_aux dimension per item-side table")
    p.add_argument("--keep-width", dest="keep_width", action="store_true", default=None,
                   help="split --emb-dim into E_orig and E_aux (E_orig gets emb_dim - aux_dim), so the main "
                   "model keeps its plain width; default: E_orig keeps emb_dim (the paper's setting)")
    p.add_argument("--sampler", choices=["uniform", "log_uniform", "in_batch"])
    p.add_argument("--num-negatives", dest="num_negatives", type=int)
    p.add_argument("--emb-dim", dest="emb_dim", type=int, help="E_orig dimension per table (default 18)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the main model (faster DIN steady state, slower start; DIEN "
                        "compiles its padded path, slower than its eager jagged one)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per-rank batch size (default 128)")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate for dense parameters (default 1e-3)")
    p.add_argument("--embedding-optimizer", dest="embedding_optimizer", choices=EMBEDDING_OPTIMIZERS)
    p.add_argument("--aux-embedding-optimizer", dest="aux_embedding_optimizer", choices=EMBEDDING_OPTIMIZERS)
    p.add_argument("--embedding-lr", dest="embedding_lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop after N steps (smoke runs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads per process for training (default 1)")
    p.add_argument("--eval-threads", dest="eval_threads", type=int,
                   help="cores per process for evaluation: concurrent batches on an unsharded CPU model, "
                        "torch threads otherwise (default: the process's share of the cores)")
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    p.add_argument("--sharding", action="append", default=[], metavar="TABLE=TYPE[,TABLE=TYPE...]",
                   help="sharding type per table (table_wise, row_wise, column_wise), comma-separated "
                   "(TorchX rejects repeated flags)")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=True,
                   help="start afresh even if OUT has checkpoints (they are moved to "
                   "OUT/checkpoints.previous, replacing an older set there)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress bar; a log line every 10 s instead (the default when stderr is not a "
                        "terminal, e.g. under TorchX, where every bar refresh would become a log line)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set optim.lr=0.002 (IaCN's, with --iacn); "
                   "several overrides may be joined with ';' (TorchX rejects repeated flags)")
    p.add_argument("--out", help="run directory (metrics.json, config.yaml, checkpoints/)")


#: the optimizer of the aux tables, which only IaCN's model has: an IaCN option like iacn.*
_AUX_OPTIMIZER = "optim.aux_embedding_optimizer"


def _a_runs_config(path: Path) -> bool:
    """``path`` is the ``config.yaml`` of a run directory (``iacn train`` wrote it beside its
    ``metrics.json`` / ``checkpoints``): read as that run was trained (``from_yaml(stored=True)``)."""
    return path.name == "config.yaml" and ((path.parent / "metrics.json").is_file()
                                           or (path.parent / "checkpoints").is_dir())


def _rewrites_losslessly(path: Path) -> bool:
    """A run rewriting ``path`` (its own config.yaml) loses nothing: no comments, and every value in
    it reads back the same (fields added since the file was written may be new)."""
    import yaml

    text = path.read_text()
    if "#" in text:
        return False

    def covered(old: object, new: object) -> bool:
        if isinstance(old, dict) and isinstance(new, dict):
            return all(k in new and covered(v, new[k]) for k, v in old.items())
        return old == new

    return covered(yaml.safe_load(text) or {}, TrainConfig.from_yaml(path, stored=True).to_dict())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = (TrainConfig.from_yaml(args.config, stored=_a_runs_config(Path(args.config))) if args.config
              else TrainConfig())
    sets = []
    for flag, (path, _) in _FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            sets.append(f"{path}={json.dumps(v, ensure_ascii=False)}")  # YAML reads JSON's \u escapes
            # as UTF-16 halves: a character past U+FFFF would come back as two lone surrogates
    if args.iacn is not None:
        sets.append(f"iacn.enabled={json.dumps(args.iacn)}")
    # the flag decides, not a config file's `resume` (a one-off control, not part of the run)
    sets.append(f"resume={'true' if args.resume else 'false'}")
    if not args.progress:  # without a terminal the loop draws no bar either (runtime.show_progress)
        sets.append("progress=false")
    if args.sharding:  # a flag like the others: before --set, which wins
        st = dict(config.distributed.sharding_types)
        for a in (part for arg in args.sharding for part in arg.split(",") if part):
            if "=" not in a:
                raise ConfigError(f"--sharding {a!r}: expected TABLE=TYPE")
            t, v = a.split("=", 1)
            st[t] = v
        sets.append(f"distributed.sharding_types={json.dumps(st, ensure_ascii=False)}")
    user_sets = [part for arg in args.set for part in arg.split(";") if part.strip()]
    config = config.override(sets + user_sets)
    iacn_flags = [f"--{f.replace('_', '-')}" for f, (path, _) in _FLAGS.items()
                  if (path.startswith("iacn.") or path == _AUX_OPTIMIZER)
                  and getattr(args, f, None) is not None]
    # an option of IaCN's given on the command line while IaCN is off would change nothing (a YAML
    # config may hold them for its IaCN arms: only what this command says is checked)
    set_keys = [s.split("=", 1)[0].strip() for s in user_sets]
    iacn_flags += [f"--set {k}" for k in set_keys
                   if (k.startswith("iacn.") and k != "iacn.enabled") or k == _AUX_OPTIMIZER]
    if iacn_flags and not config.iacn.enabled:
        raise ConfigError(f"{', '.join(iacn_flags)} set IaCN's options, but IaCN is off: add --iacn")
    dien_sets = [f"--set {k}" for k in set_keys if k in DIEN_ONLY]
    if dien_sets and config.model.name != "dien":  # the same: DIEN's options, another model
        raise ConfigError(f"{', '.join(dien_sets)} set DIEN's options, but the model is "
                          f"{config.model.name}: add --model dien")
    if not config.data.path:
        raise ConfigError("no dataset: pass --data DIR (a directory made by `iacn prepare`)")
    return config


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)  # a ConfigError reaches the user as one line (cli.main)
    # before the data and the model are built: an --out that cannot be a run directory fails now
    check_output_path(config.out, "--out" if args.out else "out", directory=True, parents=True)
    written = Path(config.out) / "config.yaml"
    if args.config and written.exists() and Path(args.config).resolve() == written.resolve() \
            and not _rewrites_losslessly(written):
        # a run rewrites its own config.yaml (the file it wrote reads back unchanged); a hand-written
        # one, comments and all, would be lost
        raise ConfigError(f"--config {args.config} is the config.yaml this run writes into {config.out}: "
                          "copy it elsewhere and pass that copy")
    from iacn_torchrec.train.loop import train

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not args.out and config.out == TrainConfig().out:
        print(f"note: no --out: the run directory is {config.out} (a second run there resumes this one, or "
              "is refused if its configuration differs)", file=sys.stderr, flush=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    import torch.distributed as dist

    def group() -> bool:  # the process group a sharded run's setup created
        return dist.is_available() and dist.is_initialized()

    try:
        result = train(config, rank=rank, world_size=world_size)
        if group():
            dist.barrier()  # collectives still in flight (a pipeline stopped by max_steps) finish first
    finally:
        if group():
            dist.destroy_process_group()
    if rank == 0:
        t = result["test"]
        print(f"{config.model.name}{'+IaCN' if config.iacn.enabled else ''}: test AUC {t['auc']:.4f}  "
              f"GAUC {t['gauc']:.4f}  logloss {t['logloss']:.4f}  "
              f"train {result['train_samples_per_s']:,.0f} samples/s  -> {config.out}/metrics.json")
    return 0
