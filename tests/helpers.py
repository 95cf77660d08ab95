"""Small shared builders for tests: a batch with a planted interest signal, a planted dataset, an
``apps/`` script loaded as a module."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class Batch:
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor


def planted_batch(
    B: int, seed: int, num_users: int, num_items: int, num_cates: int, max_len: int,
    num_negatives: int = 0, neg_hist: bool = False,
) -> Batch:
    """A batch in the loader's KJT layout with a planted signal: each user's history comes from one
    category; label-1 targets share it, label-0 targets are uniform. Items ``1..num_items`` map to
    categories in contiguous blocks. ``neg_hist`` adds DIEN's negative behaviours,
    ``num_negatives`` IaCN's sampled negatives (S per sample)."""
    NU, NI, NC, L, S = num_users, num_items, num_cates, max_len, num_negatives
    g = torch.Generator().manual_seed(seed)
    per = NI // NC
    i2c = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(NI) // per + 1])
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    user_cate = torch.randint(0, NC, (B,), generator=g)
    labels = torch.randint(0, 2, (B,), generator=g)
    in_cate = user_cate * per + 1 + torch.randint(0, per, (B,), generator=g)
    item = torch.where(labels.bool(), in_cate, torch.randint(1, NI + 1, (B,), generator=g))
    owner = torch.repeat_interleave(torch.arange(B), lengths)
    hist = user_cate[owner] * per + 1 + torch.randint(0, per, (len(owner),), generator=g)
    ones = torch.ones(B, dtype=torch.long)
    keys = ["uid", "item", "cate", "hist_item", "hist_cate"]
    vals = [torch.randint(1, NU + 1, (B,), generator=g), item, i2c[item], hist, i2c[hist]]
    lens = [ones, ones, ones, lengths, lengths]
    if neg_hist:
        nh = torch.randint(1, NI + 1, (len(owner),), generator=g)
        keys += ["neg_hist_item", "neg_hist_cate"]
        vals += [nh, i2c[nh]]
        lens += [lengths, lengths]
    if S:
        neg = torch.randint(1, NI + 1, (B * S,), generator=g)
        keys += ["iacn_neg_item", "iacn_neg_cate"]
        vals += [neg, i2c[neg]]
        lens += [ones * S, ones * S]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(vals), torch.cat(lens))
    return Batch(kjt, labels.float())


def positives_only_negatives(batch: Batch, rows: torch.Tensor | None = None) -> Batch:
    """``batch`` with the IaCN negatives of ``rows`` only (default: the label-1 rows), the
    loader's layout; the other features unchanged."""
    d = batch.sparse_features.to_dict()
    B = batch.labels.numel()
    keep = batch.labels > 0.5 if rows is None else torch.zeros(B, dtype=torch.bool).index_fill(0, rows, True)
    keys, vals, lens = [], [], []
    for k, jt in d.items():
        v, n = jt.values(), jt.lengths()
        if k.startswith("iacn_neg_"):
            v, n = v.view(B, -1)[keep].reshape(-1), n * keep
        keys.append(k), vals.append(v), lens.append(n)
    return Batch(KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(vals), torch.cat(lens)), batch.labels)


def prepare_planted(root: Path, num_users: int, seed: int, **planted_kwargs):
    """A planted-interest dataset (``data.synthetic.make_planted_interests``) prepared like the
    real data (din protocol, max_len 16) under ``root``; returns ``(planted, prepared_dir)``."""
    from iacn_torchrec.data.prepare import prepare_dataset
    from iacn_torchrec.data.synthetic import make_planted_interests

    p = make_planted_interests(root / "raw", num_users=num_users, seed=seed, **planted_kwargs)
    return p, prepare_dataset(
        "tsv", interactions=p.interactions, items=p.items, category_column="cate", max_len=16, seed=0,
        out=root / "prep", progress=False,
    )


def din_iacn_after_sgd_steps(configure=None, steps: int = 3, model_name: str = "din") -> list[torch.Tensor]:
    """Parameters of a small DIN+IaCN (or ``model_name`` + IaCN: δ split, sampled negatives,
    user-profile layer) after ``steps`` SGD steps on planted batches, from seed 0;
    ``configure(model)`` runs before training (e.g. to switch a kernel off). SGD, not Adam: Adam's
    g/sqrt(v) would turn float32 rounding in a near-zero gradient into a full step, hiding whether
    two runs compute the same function."""
    from iacn_torchrec.models.framework import build_model
    from iacn_torchrec.modules.iacn import IaCNConfig

    torch.manual_seed(0)
    model = build_model(model_name, 20, 60, 6, 8, IaCNConfig(enabled=True, aux_dim=4, num_negatives=5),
                        emb_dim=4)
    if configure is not None:
        configure(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        batch = planted_batch(32, step, 20, 60, 6, 8, num_negatives=5, neg_hist=model_name == "dien")
        opt.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def count_calls(monkeypatch, function_class) -> list[int]:
    """Counts ``function_class.apply`` calls (a list growing by one per call) for the test's duration:
    which of two code paths ran."""
    calls: list[int] = []
    apply = function_class.apply
    monkeypatch.setattr(function_class, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def load_app(name: str) -> ModuleType:
    """``apps/<name>.py`` (not a package) loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "apps" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
