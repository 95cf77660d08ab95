"""The fused in-backward update of sharded tables carries the δ split.

Two gloo ranks take one step with fused SGD on row-wise-sharded aux tables and column-wise
orig tables. The table deltas must equal

    ΔE_aux  = -lr · ((1-δ)·λ·g_IaCN + δ·g_main)
    ΔE_orig = -lr · g_main

with ``g_main = ∂L_main/∂E`` and ``g_IaCN = ∂L_IaCN/∂E`` taken by *separate* backward passes on the
unsharded model over the global batch (the two ranks' batches joined): ``δ = 1, λ = 0`` gives
``g_main`` alone and ``δ = 0, λ = 1`` gives ``g_IaCN`` on the aux tables.
"""

from __future__ import annotations

import torch
from test_distributed_equivalence import make_config, make_loaders, make_model

from iacn_torchrec.distributed.testing import concat_batches, spawn, write_tiny_dataset

PLAN = {"uid": "table_wise", "item_orig": "column_wise", "cate_orig": "column_wise",
        "item_aux": "row_wise", "cate_aux": "row_wise"}
AUX = ("embeddings.aux.embeddings.item_aux.weight", "embeddings.aux.embeddings.cate_aux.weight")
ORIG = ("embeddings.orig.embeddings.item_orig.weight", "embeddings.orig.embeddings.cate_orig.weight")


def worker(rank: int, world_size: int, data: str, out: str) -> None:
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.distributed.sharding import shard_model, sharded_table_weights

    ds = PreparedDataset.open(data)
    config = make_config(data, "din", PLAN, "sgd", "sgd")
    setup = shard_model(make_model(config, ds), config, torch.device("cpu"), 0)
    before = sharded_table_weights(setup.model)
    train, _ = make_loaders(config, ds, rank, world_size)
    next(iter(setup.train_steps(train)))
    setup.pause()
    after = sharded_table_weights(setup.model)
    if rank == 0:
        torch.save({k: after[k] - before[k] for k in after}, out)


def test_fused_update_of_aux_table_is_the_delta_split(tmp_path):
    from iacn_torchrec.data.loader import PreparedDataset

    data = str(write_tiny_dataset(tmp_path / "tiny"))
    out = str(tmp_path / "delta.pt")
    spawn(worker, 2, data, out)
    delta_sharded = torch.load(out, weights_only=False)

    ds = PreparedDataset.open(data)
    config = make_config(data, "din", PLAN, "sgd", "sgd")
    lr, delta, lam = config.optim.embedding_lr, config.iacn.delta, config.iacn.lam
    assert 0 < delta < 1 and lam not in (0.0, 1.0)
    batch = concat_batches([next(iter(make_loaders(config, ds, r, 2)[0])) for r in range(2)])

    def grads(d: float, la: float) -> dict[str, torch.Tensor]:
        model = make_model(config, ds)  # same seed: the same initial weights each time
        model.delta, model.lam = d, la
        loss, _ = model(batch)
        params = dict(model.named_parameters())
        g = torch.autograd.grad(loss, [params[k] for k in AUX + ORIG])
        return dict(zip(AUX + ORIG, g, strict=True))

    g_main = grads(1.0, 0.0)  # main path unscaled, IaCN not run
    g_iacn = grads(0.0, 1.0)  # main path into E_aux scaled by 0: only L_IaCN reaches the aux tables
    for k in AUX:
        expected = -lr * ((1 - delta) * lam * g_iacn[k] + delta * g_main[k])
        assert expected.abs().max() > 1e-4  # both terms are live
        assert (g_iacn[k] - g_main[k]).abs().max() > 1e-4
        torch.testing.assert_close(delta_sharded[k], expected, rtol=1e-4, atol=1e-7)
    for k in ORIG:
        # with δ = 0, λ = 1 the orig tables still get exactly g_main: L_IaCN never reaches E_orig
        torch.testing.assert_close(g_iacn[k], g_main[k], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(delta_sharded[k], -lr * g_main[k], rtol=1e-4, atol=1e-7)


def test_sharding_refuses_table_dims_fbgemm_cannot_run():
    """FBGEMM's table kernels need dims that are multiples of 4: the check names every bad table
    (with ``iacn.keep_width`` the orig tables get emb_dim - aux_dim) before any process group."""
    import pytest

    from iacn_torchrec.distributed.sharding import _check_fused_dims
    from iacn_torchrec.models.framework import build_model
    from iacn_torchrec.modules.iacn import IaCNConfig
    from iacn_torchrec.train.config import ConfigError

    kept = build_model("din", 9, 30, 4, 5, IaCNConfig(enabled=True, aux_dim=6, keep_width=True), emb_dim=16)
    with pytest.raises(ConfigError, match=r"'item_orig': 10, 'cate_orig': 10.*'item_aux': 6.*keep-width"):
        _check_fused_dims(kept)
    _check_fused_dims(build_model("din", 9, 30, 4, 5, IaCNConfig(enabled=True, aux_dim=8, keep_width=True),
                                  emb_dim=16))


def test_cpu_sharded_tables_refuse_adam_and_get_their_fused_optimizer():
    """On CPU a sharded run cannot give a table Adam (FBGEMM's fused Adam needs CUDA): the error
    names exactly the Adam tables. Otherwise each table's weight carries its own in-backward
    optimizer (orig and aux chosen independently) with the table learning rate."""
    import pytest

    from iacn_torchrec.distributed.sharding import FUSED_OPTIMIZERS, apply_table_optimizers
    from iacn_torchrec.models.framework import build_model
    from iacn_torchrec.train.config import ConfigError

    def model_for(config):
        torch.manual_seed(0)
        return build_model("din", 9, 30, 4, 5, iacn=config.iacn, emb_dim=8, user_dim=8)

    mixed = make_config("/x", "din", orig_opt="sgd", aux_opt="adam")
    with pytest.raises(ConfigError, match=r"table\(s\) \['cate_aux', 'item_aux'\] use optimizer 'adam'"):
        apply_table_optimizers(model_for(mixed), mixed, torch.device("cpu"))
    config = make_config("/x", "din", orig_opt="sgd", aux_opt="rowwise_adagrad")
    model = model_for(config)
    chosen = apply_table_optimizers(model, config, torch.device("cpu"))
    assert chosen == {"uid": "sgd", "item_orig": "sgd", "cate_orig": "sgd",
                      "item_aux": "rowwise_adagrad", "cate_aux": "rowwise_adagrad"}
    weights = {name.split(".")[-2]: p for name, p in model.named_parameters() if ".embeddings." in name}
    assert set(weights) == set(chosen)
    for table, w in weights.items():
        (opt,) = w._optimizer_classes  # what TorchRec's sharder turns into the fused kernel
        assert opt is FUSED_OPTIMIZERS[chosen[table]]
        assert w._optimizer_kwargs[0]["lr"] == config.optim.table_lr(chosen[table])
