"""Contracts of the metrics, the data protocols, the samplers' streams, the dataset hash, the
seeds and the sharded path that a mutation review found unpinned: each test fails under the
change named in its docstring ("mutant"), which the rest of the suite let pass."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from iacn_torchrec.data.loader import BatchLoader, PreparedDataset
from iacn_torchrec.data.prepare import prepare_dataset
from iacn_torchrec.data.sources import DataError
from iacn_torchrec.train.metrics import CTRMetrics, group_auc

# --------------------------------------------------------------------------------------------
# helpers


def _write(tmp: Path, rows: list[str], items: dict[str, str]) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "i.tsv").write_text("user_id\titem_id\ttimestamp\n" + "\n".join(rows) + "\n")
    (tmp / "m.tsv").write_text("item_id\tcate_leaf\n" + "".join(f"{i}\t{c}\n" for i, c in items.items()))
    return tmp / "i.tsv", tmp / "m.tsv"


def _synthetic(tmp: Path, n_users: int = 40, n_items: int = 30, seed: int = 0,
               user_prefix: str = "") -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for t in range(int(rng.integers(3, 12))):
            rows.append(f"{user_prefix}{u:03d}\t{rng.integers(0, n_items)}\t{1000 + t}")
    return _write(tmp, rows, {str(i): str(i % 4) for i in range(n_items)})


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gaps2")
    inter, items = _synthetic(d / "raw")
    return prepare_dataset("tsv", interactions=inter, items=items, max_len=5, seed=1, out=d / "ds",
                           progress=False)


# --------------------------------------------------------------------------------------------
# metrics.py


def test_logloss_clips_saturated_probabilities_at_1e_7():
    """Mutants M05 (no clamp) / M06 (clamp 1e-3). A float32 sigmoid saturates to exactly 1.0 (or
    0.0) for |logit| > ~17: a right, fully confident prediction must cost ~0, not make the log-loss
    NaN (0 * log 0), and the clip at 1e-7 must not bend confident but unsaturated ones."""
    p = torch.tensor([1.0, 0.0, 0.9999, 1e-5, 1.0, 0.3])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    m = CTRMetrics()
    m.update(p, y, torch.tensor([1, 1, 2, 2, 3, 3]))
    got = m.compute()["logloss"]
    pc = np.clip(p.double().numpy(), 1e-7, 1 - 1e-7)
    yy = y.double().numpy()
    ref = float(-np.mean(yy * np.log(pc) + (1 - yy) * np.log(1 - pc)))
    assert math.isfinite(got)
    assert got == pytest.approx(ref, rel=1e-12)
    # a right saturated prediction alone costs about nothing, a wrong one -log(1e-7)
    one = CTRMetrics()
    one.update(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1, 1]))
    assert 0 <= one.compute()["logloss"] < 1e-6


def test_auc_ranks_the_unclipped_probabilities():
    """Mutant M07 (AUC/GAUC over the log-loss's clipped scores). Confident negatives' probabilities
    below 1e-7 still rank: clipping would tie them and turn a perfect ranking into 0.5."""
    m = CTRMetrics()
    m.update(torch.tensor([1e-8, 1e-9, 1e-8, 1e-10]), torch.tensor([1.0, 0.0, 1.0, 0.0]),
             torch.tensor([1, 1, 2, 2]))
    r = m.compute()
    assert r["auc"] == 1.0 and r["gauc"] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["one-key sort", "lexsort"])
def test_gauc_tie_blocks_do_not_span_users(dtype):
    """Mutant M11 (tie blocks by score only, not by (user, score)). One user's highest score equal
    to the next user's lowest must not average their within-user ranks; a constant model scores
    GAUC 0.5 whatever the users' sizes."""
    scores = np.array([0.25, 0.5, 0.5, 0.75], dtype=dtype).astype(np.float64)
    if dtype is np.float64:
        scores = scores + np.array([0, 0, 0, 1e-12])  # not float32 values: the lexsort path
    uids = np.array([1, 1, 2, 2])
    labels = np.array([0, 1, 0, 1], dtype=bool)  # both users rank their pair right
    assert group_auc(uids, scores, labels) == (1.0, 2)
    uids = np.array([1, 1, 2, 2, 2, 2])
    labels = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    assert group_auc(uids, np.full(6, 0.5), labels) == (0.5, 2)


# --------------------------------------------------------------------------------------------
# negatives.py / loader.py


def test_log_uniform_ranks_ties_by_ascending_id():
    """Mutant N03 (ties by descending id; minor). The docstring's rank order: most popular first,
    ties by ascending id."""
    from iacn_torchrec.data.negatives import LogUniformNegatives

    assert LogUniformNegatives(np.array([0, 3, 3, 1, 3, 0]), 1).rank_to_item.tolist() == [1, 2, 4, 3, 5]


def test_negative_behaviours_and_iacn_negatives_follow_their_own_keys(small):
    """Mutants L01 (the neg-hist key without its trailing 1: with the trainer's one seed for both
    samplers it is the IaCN negatives' key, one stream for both), L02 / L03 (rank 0's key on every
    rank: all ranks draw the same negatives). Keys: IaCN ``(sampler seed, loader seed, epoch,
    batch, rank)``, negative behaviours the same with a trailing 1."""
    from iacn_torchrec.data.negatives import PopularityNegativeBehaviours, UniformNegatives

    ds = PreparedDataset.open(small)
    nh = PopularityNegativeBehaviours(ds.item_count, seed=7)
    iacn = UniformNegatives(ds.num_items, 4, seed=7)  # make_loaders gives both config.seed
    draws = {}
    for rank in (0, 1):
        loader = BatchLoader(ds, "train", 16, shuffle=True, seed=3, rank=rank, world_size=2,
                             with_neg_hist=True, neg_hist_sampler=nh, iacn_negatives=iacn)
        loader.set_epoch(2)
        it = iter(loader)
        next(it)
        b = next(it)  # batch index 1
        kjt, labels = b.sparse_features, b.labels.numpy() > 0.5
        real = kjt["hist_item"].values().numpy()
        want_nh = nh.sample(np.random.default_rng([7, 3, 2, 1, rank, 1]), real)
        assert np.array_equal(kjt["neg_hist_item"].values().numpy(), want_nh), rank
        want_iacn = iacn.sample(np.random.default_rng([7, 3, 2, 1, rank]), len(labels))[labels].reshape(-1)
        assert np.array_equal(kjt["iacn_neg_item"].values().numpy(), want_iacn), rank
        draws[rank] = iacn.sample(np.random.default_rng([7, 3, 2, 1, rank]), 16)
    assert not np.array_equal(draws[0], draws[1])


# --------------------------------------------------------------------------------------------
# store.py / loader.verify


def test_content_hash_covers_the_vocabularies(tmp_path):
    """Mutant S01 (vocabularies left out of the hash). Two sources with the same structure but other
    raw user ids give identical arrays; their datasets are not the same content (an export maps raw
    ids through the vocabularies, and resume compares datasets by this hash)."""
    def prepared(name: str, **kw) -> Path:
        inter, items = _synthetic(tmp_path / name, **kw)
        return prepare_dataset("tsv", interactions=inter, items=items, out=tmp_path / f"d{name}",
                               progress=False)

    a, b = prepared("a"), prepared("b", user_prefix="x")
    ma, mb = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert ma["arrays"].keys() == mb["arrays"].keys()
    for rel in ma["arrays"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "vocab" / "uid.tsv").read_bytes() != (b / "vocab" / "uid.tsv").read_bytes()
    assert ma["content_hash"] != mb["content_hash"]


def test_verify_detects_an_edited_array_with_values_in_range(small, tmp_path):
    """Mutant S02 (verify never raises). ``open(verify=True)`` recomputes the content hash: an edit
    that keeps every value in range (which the open's range checks cannot see) is refused."""
    d = tmp_path / "copy"
    shutil.copytree(small, d)
    PreparedDataset.open(d, verify=True)  # intact
    a = np.load(d / "train" / "item.npy")
    j = int(np.flatnonzero(a != a[0])[0])
    a[0], a[j] = a[j], a[0]
    np.save(d / "train" / "item.npy", a)
    PreparedDataset.open(d)  # the cheap checks pass
    with pytest.raises(DataError, match=r"content hash sha256:\w+ differs from meta\.json"):
        PreparedDataset.open(d, verify=True)


# --------------------------------------------------------------------------------------------
# train/loop.py


def test_train_seed_reaches_the_model_initialisation(small, tmp_path, monkeypatch):
    """Mutant T03 (``seed_everything(0)`` whatever ``config.seed``). Seeds are the unit of the
    paired comparison (DESIGN.md, Measuring): the same seed builds the same initial model, another
    seed another one (not only another data order)."""
    from iacn_torchrec.distributed import setup as setup_module
    from iacn_torchrec.modules.iacn import IaCNConfig
    from iacn_torchrec.train.config import DataConfig, ModelConfig, TrainConfig
    from iacn_torchrec.train.loop import train

    real, initial = setup_module.build_training, []

    def recording(*args, **kwargs):
        s = real(*args, **kwargs)
        initial.append({k: v.detach().clone() for k, v in s.model.state_dict().items()})
        return s

    monkeypatch.setattr(setup_module, "build_training", recording)
    for i, seed in enumerate((1, 1, 2)):
        train(TrainConfig(data=DataConfig(path=str(small), batch_size=32), model=ModelConfig(name="din"),
                          iacn=IaCNConfig(enabled=True), out=str(tmp_path / f"r{i}"), max_steps=1,
                          seed=seed, progress=False))
    same, other = initial[0], initial[2]
    assert all(torch.equal(initial[1][k], v) for k, v in same.items())
    assert not torch.equal(same["embeddings.orig.embeddings.item_orig.weight"],
                           other["embeddings.orig.embeddings.item_orig.weight"])


# --------------------------------------------------------------------------------------------
# distributed/sharding.py


def test_sharded_dense_adam_gets_the_weight_decay(small):
    """Mutant D02 (``optim.weight_decay`` dropped on the sharded path). The config says weight decay
    applies to the dense parameters on every path; a fused table optimizer shards even one process,
    whose dense Adam must carry it."""
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    from iacn_torchrec.distributed.setup import build_training
    from iacn_torchrec.modules.iacn import IaCNConfig
    from iacn_torchrec.train.config import DataConfig, ModelConfig, TrainConfig
    from iacn_torchrec.train.loop import make_loaders, seed_everything

    cfg = TrainConfig(data=DataConfig(path=str(small), batch_size=16),
                      model=ModelConfig(name="din", emb_dim=8, user_dim=8),
                      iacn=IaCNConfig(enabled=True, aux_dim=8), progress=False)
    cfg.optim.embedding_optimizer, cfg.optim.weight_decay = "sgd", 0.03
    seed_everything(0)
    ds = PreparedDataset.open(small)
    _, _, log_q = make_loaders(cfg, ds, 0, 1)
    setup = build_training(cfg, ds, item_log_q=log_q)
    assert setup.sharded
    dense = [opt for _, opt in setup.optimizer.optimizers if isinstance(opt, KeyedOptimizerWrapper)]
    assert dense and all(g["weight_decay"] == 0.03 for o in dense for g in o.param_groups)


def _average_worker(rank: int, world_size: int, out: str) -> None:
    from iacn_torchrec.distributed.sharding import average_running_statistics

    buffers = [torch.full((3,), float(rank + 1)), torch.full((2, 2), 10.0 * (rank + 1))]
    average_running_statistics(buffers, world_size)
    if rank == 0:
        torch.save(buffers, out)


def test_running_statistics_are_averaged_over_the_ranks(tmp_path):
    """Mutant D04 (the all-reduced sum not divided by the world size). The ranks' BatchNorm / Dice
    running statistics become their *mean*: equal on every rank is not enough (a sum is equal too,
    and evaluates with doubled means and variances)."""
    from iacn_torchrec.distributed.testing import spawn

    out = str(tmp_path / "avg.pt")
    spawn(_average_worker, 2, out)
    a, b = torch.load(out)
    assert torch.equal(a, torch.full((3,), 1.5)) and torch.equal(b, torch.full((2, 2), 15.0))


def test_the_training_loader_shuffles_every_epoch(small):
    """Mutant T14 (``make_loaders``' train loader with ``shuffle=False``; the suite kills it only
    incidentally, by a float tolerance in an unrelated resume test). The din train split is stored
    user by user: training reads it in the permutation ``default_rng([seed, epoch])``, another one
    each epoch; the evaluation loader reads in file order."""
    from iacn_torchrec.modules.iacn import IaCNConfig
    from iacn_torchrec.train.config import DataConfig, ModelConfig, TrainConfig
    from iacn_torchrec.train.loop import make_loaders

    cfg = TrainConfig(data=DataConfig(path=str(small), batch_size=16), model=ModelConfig(name="din"),
                      iacn=IaCNConfig(enabled=True), seed=6, progress=False)
    ds = PreparedDataset.open(small)
    train_loader, test_loader, _ = make_loaders(cfg, ds, 0, 1)
    n = train_loader.num_samples
    for epoch in (0, 1):
        train_loader.set_epoch(epoch)
        assert np.array_equal(train_loader.order(), np.random.default_rng([6, epoch]).permutation(n))
    assert np.array_equal(test_loader.order(), np.arange(test_loader.num_samples))
