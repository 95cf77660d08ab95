"""TorchRec's own DLRM on the Amazon Beauty samples, without and with the IaCN plug-in.

    python apps/dlrm_example.py                       # 1 epoch per arm, seed 0
    python apps/dlrm_example.py --max-steps 300 --dim 32 --aux-dim 8

The model is ``torchrec.models.dlrm.DLRM`` exactly as TorchRec ships it, built on a plain
``EmbeddingBagCollection`` (tables ``uid``, ``item`` [features item, hist_item], ``cate`` [cate,
hist_cate], all of dim D, mean pooling) with one dense feature, ``log(1 + history length)``.
``attach_iacn`` then swaps the EBC for an ``IaCNEmbeddingBagCollection``: the item and category
tables become ``E_orig`` (D − a) ⊕ ``E_aux`` (a) so DLRM still sees D-dimensional features, IaCN
reads the history through ``E_aux`` and the step minimises ``L_main + λ·L_IaCN``. Both arms share
the seed (same data order, same dense-arch initialisation) and print their test AUC.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from iacn_torchrec.data.loader import BatchLoader, PreparedDataset
from iacn_torchrec.data.negatives import UniformNegatives
from iacn_torchrec.errors import UserError
from iacn_torchrec.experiments.reproduce import DEFAULT_DATA, ensure_default_data
from iacn_torchrec.models.dlrm_plugin import EBCIaCNSpec, EBCModelWithIaCN, attach_iacn, log_history_length
from iacn_torchrec.modules.iacn import IaCNConfig, IaCNTask
from iacn_torchrec.train.metrics import CTRMetrics


def build_dlrm(ds: PreparedDataset, dim: int) -> DLRM:
    """A stock TorchRec DLRM over the Beauty features (nothing IaCN-specific here)."""
    tables = [
        EmbeddingBagConfig(name="uid", num_embeddings=ds.num_users + 1, embedding_dim=dim,
                           feature_names=["uid"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="item", num_embeddings=ds.num_items + 1, embedding_dim=dim,
                           feature_names=["item", "hist_item"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="cate", num_embeddings=ds.num_cates + 1, embedding_dim=dim,
                           feature_names=["cate", "hist_cate"], pooling=PoolingType.MEAN),
    ]
    return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=1,
                dense_arch_layer_sizes=[32, dim], over_arch_layer_sizes=[128, 64, 1])


class PlainDLRMTrain(torch.nn.Module):
    """DLRM's BCE step on our batches (TorchRec's ``DLRMTrain`` expects ``batch.dense_features``)."""

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        logits = self.model(log_history_length(batch.sparse_features), batch.sparse_features).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (logits.detach(), loss.detach(), torch.zeros(()))

    @torch.no_grad()
    def predict(self, batch) -> torch.Tensor:
        return torch.sigmoid(self.model(log_history_length(batch.sparse_features), batch.sparse_features)
                             .squeeze(-1))


def train_and_eval(step_module, train_loader, test_loader, lr: float, max_steps: int | None) -> dict:
    opt = torch.optim.Adam(step_module.parameters(), lr=lr)
    step_module.train()
    t0, steps = time.perf_counter(), 0
    for batch in train_loader:
        opt.zero_grad(set_to_none=True)
        loss, (_, main_loss, iacn_loss) = step_module(batch)
        loss.backward()
        opt.step()
        steps += 1
        if steps % 200 == 0:
            print(f"  step {steps}: main loss {float(main_loss):.4f}  IaCN loss {float(iacn_loss):.3f}",
                  flush=True)
        if max_steps is not None and steps >= max_steps:
            break
    train_s = time.perf_counter() - t0
    step_module.eval()
    metrics = CTRMetrics()
    for batch in test_loader:
        metrics.update(step_module.predict(batch), batch.labels, batch.sparse_features["uid"].values())
    return {**metrics.compute(), "steps": steps, "ms_per_step": 1000 * train_s / max(steps, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="prepared dataset (default: embedded Beauty)")
    p.add_argument("--dim", type=int, default=64, help="D, DLRM's embedding dim (default 64)")
    p.add_argument("--aux-dim", type=int, default=16, help="a, the aux width carved out of D (default 16)")
    p.add_argument("--delta", type=float, default=0.3)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=None, help="steps per arm (default: one epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-plain", action="store_true", help="skip the plain DLRM arm")
    args = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"{p.prog}: error: {msg}", file=sys.stderr)
        return 2

    # everything checked before the first arm trains (a bad --aux-dim used to surface only after it)
    for opt, v in (("--dim", args.dim), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if v < 1:
            return fail(f"{opt} must be >= 1, got {v}")
    if args.max_steps is not None and args.max_steps < 1:
        return fail(f"--max-steps must be >= 1 (leave it out for one epoch), got {args.max_steps}")
    if not 0 < args.aux_dim < args.dim:
        return fail(f"--aux-dim must be in [1, --dim - 1] = [1, {args.dim - 1}], got {args.aux_dim}")
    if not args.lr > 0:  # (NaN too)
        return fail(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.delta <= 1:
        return fail(f"--delta must be in [0, 1], got {args.delta}")
    if not (math.isfinite(args.lam) and args.lam >= 0):
        return fail(f"--lam must be finite and >= 0, got {args.lam}")
    torch.set_num_threads(args.threads)
    try:
        if args.data is None:
            ds = PreparedDataset.open(ensure_default_data(DEFAULT_DATA))
        else:
            ds = PreparedDataset.open(args.data)
    except UserError as e:
        return fail(f"--data {e}" if args.data is not None else str(e))
    max_len = int(ds.meta["max_len"])
    sampler = UniformNegatives(ds.num_items, num_negatives=10, seed=args.seed)

    def loaders():
        # the aux tables also embed the IaCN negatives, so both splits carry them
        return (BatchLoader(ds, "train", args.batch_size, shuffle=True, seed=args.seed,
                            iacn_negatives=sampler),
                BatchLoader(ds, "test", 4096, iacn_negatives=sampler))

    results = {}
    if not args.no_plain:
        torch.manual_seed(args.seed)
        print(f"== DLRM (D={args.dim}) ==", flush=True)
        results["DLRM"] = train_and_eval(PlainDLRMTrain(build_dlrm(ds, args.dim)), *loaders(), args.lr,
                                         args.max_steps)

    torch.manual_seed(args.seed)
    model = build_dlrm(ds, args.dim)
    spec = EBCIaCNSpec(aux_tables=("item", "cate"), target_features=("item", "cate"),
                       history_features=("hist_item", "hist_cate"),
                       negative_features=("iacn_neg_item", "iacn_neg_cate"), user_feature="uid",
                       max_len=max_len)
    path = attach_iacn(model, spec, aux_dim=args.aux_dim, delta=args.delta)
    ebc = model.get_submodule(path)
    assert type(model) is DLRM  # the class is TorchRec's, untouched; only its EBC instance changed
    task = IaCNTask(IaCNConfig(enabled=True, aux_dim=args.aux_dim, delta=args.delta, lam=args.lam),
                    item_dim=ebc.aux_item_dim, max_len=max_len, user_dim=ebc.user_dim)
    print(f"== DLRM + IaCN: {path} item/cate tables {args.dim - args.aux_dim} orig + {args.aux_dim} aux, "
          f"δ={args.delta}, λ={args.lam} ==", flush=True)
    results["DLRM+IaCN"] = train_and_eval(EBCModelWithIaCN(model, task, lam=args.lam), *loaders(), args.lr,
                                          args.max_steps)

    print(f"\n{'arm':12}{'test AUC':>10}{'GAUC':>8}{'logloss':>9}{'steps':>7}{'ms/step':>9}")
    for name, r in results.items():
        print(f"{name:12}{r['auc']:10.4f}{r['gauc']:8.4f}{r['logloss']:9.4f}{r['steps']:7d}{r['ms_per_step']:9.1f}")
    if len(results) == 2:
        print(f"lift (one seed; Beauty's seed noise is a few 0.001 AUC, docs/results/amazon-beauty): "
              f"{results['DLRM+IaCN']['auc'] - results['DLRM']['auc']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
