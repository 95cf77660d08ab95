"""The DLRM plug-in: TorchRec's own DLRM, unmodified, with an IaCN EBC; the wrapper's output against a
hand-computed reference, the δ gradient split on its aux tables, training, and `--model dlrm`."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchrec.models.dlrm as dlrm_module
from helpers import Batch, planted_batch, positives_only_negatives
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iacn_torchrec.models.dlrm_plugin import (
    DLRMMain,
    EBCIaCNSpec,
    EBCModelWithIaCN,
    IaCNEmbeddingBagCollection,
    attach_iacn,
)
from iacn_torchrec.models.framework import build_model
from iacn_torchrec.modules.embeddings import EmbeddedBatch
from iacn_torchrec.modules.iacn import IaCNConfig, IaCNTask

NU, NI, NC, L, S, D, A = 20, 60, 6, 8, 5, 8, 3

_DLRM_FILE = Path(inspect.getsourcefile(DLRM))

# TorchRec's DLRM classes as a process that never imported this project sees them: their file's
# sha256 and, per class, every attribute (functions by their bytecode)
_FINGERPRINT = """
import hashlib, inspect, json, types
import torchrec.models.dlrm as d

def fp(cls):
    out = {}
    for k, v in vars(cls).items():
        f = getattr(v, "__func__", v)
        out[k] = hashlib.sha256(f.__code__.co_code).hexdigest() if isinstance(f, types.FunctionType) \
            else type(v).__name__
    return out

print(json.dumps({"file": hashlib.sha256(open(inspect.getsourcefile(d), "rb").read()).hexdigest(),
                  **{c: fp(getattr(d, c)) for c in ("DLRM", "SparseArch", "DenseArch", "InteractionArch",
                                                   "OverArch")}}))
"""


def _dlrm_fingerprint(in_process: bool) -> dict:
    if not in_process:
        out = subprocess.run([sys.executable, "-c", _FINGERPRINT], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        exec(_FINGERPRINT, scope)  # noqa: S102 - our own constant
    return json.loads(buf.getvalue())


def make_batch(B: int, seed: int, S: int = S) -> Batch:
    return planted_batch(B, seed, NU, NI, NC, L, num_negatives=S)


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="uid", num_embeddings=NU + 1, embedding_dim=D, feature_names=["uid"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="item", num_embeddings=NI + 1, embedding_dim=D,
                           feature_names=["item", "hist_item"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="cate", num_embeddings=NC + 1, embedding_dim=D,
                           feature_names=["cate", "hist_cate"], pooling=PoolingType.SUM),
    ]


def dlrm_with_iacn(delta: float = 0.3, lam: float = 1.0, seed: int = 0, sampler: str = "uniform",
                   item_log_q: torch.Tensor | None = None) -> EBCModelWithIaCN:
    torch.manual_seed(seed)
    model = DLRM(EmbeddingBagCollection(tables()), dense_in_features=1, dense_arch_layer_sizes=[8, D],
                 over_arch_layer_sizes=[16, 1])
    attach_iacn(model, EBCIaCNSpec(max_len=L), aux_dim=A, delta=delta)
    ebc = model.sparse_arch.embedding_bag_collection
    cfg = IaCNConfig(enabled=True, aux_dim=A, num_negatives=S, sampler=sampler, delta=delta, lam=lam)
    task = IaCNTask(cfg, item_dim=ebc.aux_item_dim, max_len=L, user_dim=ebc.user_dim)
    return EBCModelWithIaCN(model, task, lam=lam, item_log_q=item_log_q)


def test_plugin_leaves_dlrm_untouched():
    tr = dlrm_with_iacn()
    model = tr.model
    # the instance is TorchRec's class itself, whose code is the installed file, unpatched
    assert type(model) is DLRM and type(model.sparse_arch) is dlrm_module.SparseArch
    assert _dlrm_fingerprint(in_process=True) == _dlrm_fingerprint(in_process=False)
    assert DLRM.forward.__code__.co_filename == str(_DLRM_FILE)
    assert "forward" not in vars(model) and "forward" not in vars(model.sparse_arch)
    # DLRM still sees equal dims D through the wrapper (its interaction needs them)
    ebc = model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, IaCNEmbeddingBagCollection)
    assert [t.embedding_dim for t in ebc.embedding_bag_configs()] == [D, D, D] and model.sparse_arch.D == D
    assert ebc.orig.embedding_bags["item"].weight.shape == (NI + 1, D - A)
    assert ebc.orig.embedding_bags["uid"].weight.shape == (NU + 1, D)  # not an aux table: untouched
    assert ebc.aux.embeddings["item_aux"].weight.shape == (NI + 1, A)

    # the unmodified forward on the wrapper equals DLRM's arches on a hand-built [B, F, D]
    batch = make_batch(6, seed=3)
    kjt = batch.sparse_features
    dense = torch.log1p(kjt["hist_item"].lengths().float()).unsqueeze(1)
    tr.eval()
    logits = model(dense, kjt)
    sparse = ebc(kjt).to_dict()
    stacked = torch.stack([sparse[f] for f in ["uid", "item", "hist_item", "cate", "hist_cate"]], dim=1)
    ref = model.over_arch(model.inter_arch(model.dense_arch(dense), stacked))
    torch.testing.assert_close(logits, ref)


def test_attach_keeps_the_unsplit_tables_and_refuses_weighted_bags():
    torch.manual_seed(0)
    model = DLRM(EmbeddingBagCollection(tables()), dense_in_features=1, dense_arch_layer_sizes=[8, D],
                 over_arch_layer_sizes=[16, 1])
    uid = model.sparse_arch.embedding_bag_collection.embedding_bags["uid"].weight.detach().clone()
    attach_iacn(model, EBCIaCNSpec(max_len=L), aux_dim=A)
    # the user table is the model's own (a trained DLRM keeps it), the split ones start afresh
    assert torch.equal(model.sparse_arch.embedding_bag_collection.orig.embedding_bags["uid"].weight, uid)
    weighted = DLRM(EmbeddingBagCollection(tables(), is_weighted=True), dense_in_features=1,
                    dense_arch_layer_sizes=[8, D], over_arch_layer_sizes=[16, 1])
    with pytest.raises(ValueError, match="weighted EmbeddingBagCollection"):
        attach_iacn(weighted, EBCIaCNSpec(max_len=L), aux_dim=A)


def test_wrapper_output_is_orig_pool_concat_aux_pool():
    tr = dlrm_with_iacn()
    ebc = tr.ebc
    batch = make_batch(5, seed=4)
    kjt = batch.sparse_features
    kt = ebc(kjt)
    assert kt.keys() == ["uid", "item", "hist_item", "cate", "hist_cate"]
    out = kt.to_dict()
    W = {n: ebc.orig.embedding_bags[n].weight for n in ("uid", "item", "cate")}
    Wa = {n: ebc.aux.embeddings[f"{n}_aux"].weight for n in ("item", "cate")}
    for feature, table, mode in [("item", "item", "mean"), ("hist_item", "item", "mean"),
                                 ("cate", "cate", "sum"), ("hist_cate", "cate", "sum")]:
        ids = kjt[feature].to_dense()
        for b in range(5):
            rows = torch.cat([W[table][ids[b]], Wa[table][ids[b]]], dim=1)  # [n, D] = orig ⊕ aux
            ref = rows.mean(0) if mode == "mean" else rows.sum(0)
            torch.testing.assert_close(out[feature][b], ref)
    torch.testing.assert_close(out["uid"], W["uid"][kjt["uid"].values()])
    # IaCN's views: aux rows of the padded history, the target and the negatives, item ⊕ cate
    v = ebc.iacn_views(kjt)
    hist_ids, lengths = kjt["hist_item"].to_dense(), kjt["hist_item"].lengths()
    assert v.aux_hist.shape == (5, L, 2 * A) and v.aux_negatives.shape == (5, S, 2 * A)
    hist_cates = kjt["hist_cate"].to_dense()
    for b in range(5):
        n = int(lengths[b])
        torch.testing.assert_close(v.aux_hist[b, :n], torch.cat([Wa["item"][hist_ids[b]],
                                                                 Wa["cate"][hist_cates[b]]], dim=1))
        assert v.aux_hist[b, n:].abs().sum() == 0
    torch.testing.assert_close(v.aux_target, torch.cat([Wa["item"][kjt["item"].values()],
                                                        Wa["cate"][kjt["cate"].values()]], dim=1))
    neg_items = kjt["iacn_neg_item"].values().view(5, S)
    neg_cates = kjt["iacn_neg_cate"].values().view(5, S)
    assert torch.equal(v.negative_ids, neg_items)
    neg_rows = torch.cat([Wa["item"][neg_items], Wa["cate"][neg_cates]], dim=2)
    torch.testing.assert_close(v.aux_negatives, neg_rows)
    torch.testing.assert_close(v.user, out["uid"])


@pytest.mark.parametrize("delta,lam", [(0.3, 1.0), (0.7, 0.5), (0.0, 2.0)])
def test_gradient_split_on_aux_tables(delta, lam):
    tr = dlrm_with_iacn(delta=delta, lam=lam)
    ebc = tr.ebc
    w_aux = ebc.aux.embeddings["item_aux"].weight
    w_orig = ebc.orig.embedding_bags["item"].weight
    batch = make_batch(16, seed=2)
    labels = batch.labels

    # references from δ-free graphs: δ = 0 leaves the IaCN path unscaled (views from a fresh aux
    # lookup: no forward ran yet), δ = 1 the main path
    ebc.delta = 0.0
    torch.manual_seed(7)  # IaCN's training-mode routing logits
    l_iacn = tr.iacn_loss(ebc.iacn_views(batch.sparse_features), labels)
    (g_iacn,) = torch.autograd.grad(l_iacn, [w_aux])
    ebc.delta = 1.0
    l_main = F.binary_cross_entropy_with_logits(tr._logits(batch), labels)
    g_main, g_main_orig = torch.autograd.grad(l_main, [w_aux, w_orig])
    assert g_main.abs().sum() > 0 and g_iacn.abs().sum() > 0

    ebc.delta = delta
    torch.manual_seed(7)
    loss, (_, main_loss, iacn_loss) = tr(batch)
    loss.backward()
    torch.testing.assert_close(w_aux.grad, (1 - delta) * lam * g_iacn + delta * g_main)
    torch.testing.assert_close(w_orig.grad, g_main_orig)  # L_IaCN never reaches E_orig
    # nor the uid table (E_orig too), which IaCN's user-profile layer reads as a feature
    w_uid = ebc.orig.embedding_bags["uid"].weight
    g_uid = w_uid.grad.clone()
    w_uid.grad = None
    torch.manual_seed(7)
    F.binary_cross_entropy_with_logits(tr._logits(batch), labels).backward()
    torch.testing.assert_close(g_uid, w_uid.grad)
    torch.testing.assert_close(loss.detach(), main_loss + lam * iacn_loss)
    torch.testing.assert_close(iacn_loss, l_iacn.detach())


def test_dlrm_with_iacn_trains():
    tr = dlrm_with_iacn()
    opt = torch.optim.Adam(tr.parameters(), lr=1e-2)
    held_out = make_batch(256, seed=1000)

    def evaluate() -> tuple[float, float]:
        tr.eval()
        p = tr.predict(held_out)
        tr.train()
        torch.manual_seed(0)
        _, (_, _, il) = tr(held_out)
        return float(F.binary_cross_entropy(p, held_out.labels)), float(il)

    main0, iacn0 = evaluate()
    for step in range(80):
        loss, _ = tr(make_batch(64, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    main1, iacn1 = evaluate()
    assert main1 < main0 - 0.1, (main0, main1)  # the planted signal is learnt
    assert iacn1 < iacn0 - 0.1, (iacn0, iacn1)
    assert tr.ebc._last is None  # the aux lookup is not kept past a step


def test_negatives_of_positive_rows_only_give_the_same_step():
    """The project's loader writes IaCN's negatives on label-1 samples only: through the plug-in the
    loss and every gradient equal those of the same batch with negatives on every sample."""
    full = make_batch(16, seed=5)
    assert 0 < full.labels.sum() < 16
    results = []
    for batch in (full, positives_only_negatives(full)):
        tr = dlrm_with_iacn()
        torch.manual_seed(1)
        loss, (_, _, iacn_loss) = tr(batch)
        loss.backward()
        results.append((loss.detach(), iacn_loss, {n: p.grad for n, p in tr.named_parameters()
                                                    if p.grad is not None}))
    (la, ia, ga), (lb, ib, gb) = results
    assert ia > 0 and torch.equal(la, lb) and torch.equal(ia, ib) and ga.keys() == gb.keys()
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n
    negatives_on_label0 = positives_only_negatives(full, rows=torch.nonzero(full.labels < 0.5).squeeze(1))
    with pytest.raises(ValueError, match="the label-1 rows"):
        dlrm_with_iacn()(negatives_on_label0)


def test_log_uniform_sampler_through_the_plugin():
    """The plug-in passes log Q of the targets and negatives (by item id) to IaCN, as CTRWithIaCN
    does: its loss equals IaCN called by hand with them, and differs from the uncorrected one."""
    log_q = torch.log_softmax(torch.randn(NI + 1, generator=torch.Generator().manual_seed(4)), 0)
    with pytest.raises(ValueError, match="'log_uniform' needs item_log_q"):
        dlrm_with_iacn(sampler="log_uniform")
    batch = make_batch(16, seed=3)
    losses = []
    for q in (log_q, torch.zeros(NI + 1)):
        model = dlrm_with_iacn(sampler="log_uniform", item_log_q=q)
        torch.manual_seed(1)  # the routing logits' draws
        losses.append(model(batch)[1][2])
    ref_model = dlrm_with_iacn(sampler="log_uniform", item_log_q=log_q)
    torch.manual_seed(1)
    ref_model._logits(batch)
    v = ref_model.ebc.iacn_views(batch.sparse_features)
    ref = ref_model.iacn(v.aux_hist, v.hist_lengths, v.aux_target, batch.labels.float(), user=v.user,
                         aux_negatives=v.aux_negatives, target_ids=v.target_ids, negative_ids=v.negative_ids,
                         negative_rows=v.negative_rows, neg_log_q=log_q[v.negative_ids],
                         target_log_q=log_q[v.target_ids])
    torch.testing.assert_close(losses[0], ref.detach())
    assert not torch.allclose(losses[0], losses[1])


def test_plugin_errors_name_the_field():
    model = DLRM(EmbeddingBagCollection(tables()), 1, [8, D], [16, 1])
    with pytest.raises(ValueError, match=r"aux_dim=8 must be in \(0, 8\)"):
        attach_iacn(model, EBCIaCNSpec(max_len=L), aux_dim=D)
    with pytest.raises(ValueError, match=r"aux_tables\[0\]='items'"):
        attach_iacn(model, EBCIaCNSpec(aux_tables=("items", "cate")), aux_dim=A)
    with pytest.raises(ValueError, match=r"history_features\[1\]='hist_item' is not a feature of table"):
        attach_iacn(model, EBCIaCNSpec(history_features=("hist_item", "hist_item")), aux_dim=A)
    with pytest.raises(ValueError, match="one feature per aux table"):
        EBCIaCNSpec(target_features=("item",))
    attach_iacn(model, EBCIaCNSpec(max_len=L), aux_dim=A)
    with pytest.raises(ValueError, match="already has IaCN"):
        attach_iacn(model, EBCIaCNSpec(max_len=L), aux_dim=A, ebc_path="sparse_arch.embedding_bag_collection")
    kjt = make_batch(4, seed=0).sparse_features
    short = KeyedJaggedTensor.from_lengths_sync(kjt.keys()[:5], kjt.values()[: int(kjt.lengths()[:20].sum())],
                                                kjt.lengths()[:20])
    with pytest.raises(KeyError, match="iacn_neg_item"):
        model.sparse_arch.embedding_bag_collection(short)
    # λ and δ live in the task's config: a different λ, or the EBC's δ from attach_iacn, is refused
    ebc = model.sparse_arch.embedding_bag_collection
    task = IaCNTask(IaCNConfig(enabled=True, aux_dim=A, num_negatives=S, lam=0.5, delta=0.7),
                    item_dim=ebc.aux_item_dim, max_len=L, user_dim=ebc.user_dim)
    with pytest.raises(ValueError, match=r"attach_iacn\(delta=...\) .* is 0.3, .* delta=0.7"):
        EBCModelWithIaCN(model, task)
    ebc.delta = 0.7
    with pytest.raises(ValueError, match=r"lam is 1.0, the IaCN task's config has lam=0.5"):
        EBCModelWithIaCN(model, task, lam=1.0)
    assert EBCModelWithIaCN(model, task).lam == 0.5


@pytest.mark.parametrize("emb_dim,aux_dim", [(12, 6), (18, 18)])
def test_framework_dlrm_main_trains(emb_dim, aux_dim):
    """`build_model("dlrm")`: DLRM's arches over the framework's embeddings; with orig + aux = the user
    dim no projection is needed (the plug-in's setting), otherwise the user is projected."""
    torch.manual_seed(0)
    cfg = IaCNConfig(enabled=True, aux_dim=aux_dim, num_negatives=S)
    model = build_model("dlrm", NU, NI, NC, L, cfg, emb_dim=emb_dim, user_dim=18)
    assert isinstance(model.main_model, DLRMMain)
    assert (model.main_model.user_proj is None) == (emb_dim + aux_dim == 18)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(40):
        loss, (_, main_loss, iacn_loss) = model(make_batch(64, seed=step % 8))
        first = float(main_loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(main_loss) < first - 0.1
    plain = build_model("dlrm", NU, NI, NC, L, IaCNConfig(enabled=False), emb_dim=18)
    assert plain.iacn is None and plain.embeddings.aux is None and plain.main_model.user_proj is None


@pytest.mark.parametrize("user_dim", [6, 4])
def test_dlrm_main_against_hand_reference(user_dim):
    """`DLRMMain.forward` by hand: the five sparse features (user, or its projection when
    `user_dim != d`; target item and category halves; the mean of the *real* behaviours split the
    same way, 0 for an empty history), the dense `log1p(n_u)`, every pairwise dot of
    [dense, sparse...] in TorchRec's upper-triangle order after the dense vector, then OverArch.
    Padded slots hold garbage that must not count."""
    torch.manual_seed(0)
    B, d = 5, 3
    main = DLRMMain(user_dim, 2 * d, L)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([0, 1, 3, L, 2])
    hist = torch.randn(B, L, 2 * d, generator=g)
    hist[torch.arange(L).unsqueeze(0) >= lengths.unsqueeze(1)] = 1e6  # garbage past n_u
    user, target = torch.randn(B, user_dim, generator=g), torch.randn(B, 2 * d, generator=g)
    logits, aux = main(EmbeddedBatch(user, target, hist, lengths))
    assert aux is None and logits.shape == (B,)

    rows = []
    for b in range(B):
        n = int(lengths[b])
        mean = hist[b, :n].sum(0) / n if n else torch.zeros(2 * d)
        u = user[b] @ main.user_proj.weight.t() if user_dim != d else user[b]
        feats = [main.dense_arch(torch.log1p(lengths[b:b + 1].float()).view(1, 1))[0],
                 u, target[b, :d], target[b, d:], mean[:d], mean[d:]]
        dots = [feats[i] @ feats[j] for i in range(len(feats)) for j in range(i + 1, len(feats))]
        rows.append(torch.cat([feats[0], torch.stack(dots)]))
    ref = main.over_arch(torch.stack(rows)).squeeze(-1)
    assert (main.user_proj is None) == (user_dim == d)
    torch.testing.assert_close(logits, ref)


def test_wrapper_equals_a_plain_ebc_of_concatenated_tables_with_empty_bags():
    """Pooling, empty bags included (MEAN and SUM give 0, as TorchRec's own bags do), against a plain
    TorchRec EmbeddingBagCollection whose tables are ``cat(E_orig, E_aux)``."""
    ebc = dlrm_with_iacn().ebc
    plain = EmbeddingBagCollection(tables())
    with torch.no_grad():
        for name, bag in plain.embedding_bags.items():
            parts = [ebc.orig.embedding_bags[name].weight]
            if f"{name}_aux" in ebc.aux.embeddings:
                parts.append(ebc.aux.embeddings[f"{name}_aux"].weight)
            bag.weight.copy_(torch.cat(parts, dim=1))
    keys = ["uid", "item", "cate", "hist_item", "hist_cate", "iacn_neg_item", "iacn_neg_cate"]
    one = torch.ones(4, dtype=torch.long)
    lengths = {"hist_item": torch.tensor([2, 0, 3, 0]), "iacn_neg_item": one * S}  # rows 1, 3: empty
    lengths["hist_cate"], lengths["iacn_neg_cate"] = lengths["hist_item"], lengths["iacn_neg_item"]
    g = torch.Generator().manual_seed(0)
    sizes = {"uid": NU, "item": NI, "cate": NC, "hist_item": NI, "hist_cate": NC, "iacn_neg_item": NI,
             "iacn_neg_cate": NC}
    ids = {k: torch.randint(1, sizes[k] + 1, (int(lengths.get(k, one).sum()),), generator=g) for k in keys}
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat([ids[k] for k in keys]),
                                              torch.cat([lengths.get(k, one) for k in keys]))
    got, ref = ebc(kjt).to_dict(), plain(kjt).to_dict()
    assert sorted(got) == sorted(ref) == sorted(keys[:5])
    for k in keys[:5]:
        torch.testing.assert_close(got[k], ref[k], msg=k)
    assert not got["hist_item"][[1, 3]].any() and not got["hist_cate"][[1, 3]].any()


# ============================================ `iacn train --model M` → `iacn export` → `iacn score`
def cli_train_export_score(model_name: str, tmp_path: Path, capsys, dims: list[str], steps: int = 24) -> dict:
    """``model_name`` + IaCN through the real CLI on a small planted-interest dataset: train a few
    steps, export, score the test split written as raw-id TSV. Checked against references computed
    here, not by the library's export / score code:

    * the written scores are the eager ``CTRWithIaCN.predict`` of a model built with ``build_model``
      from the flags given and loaded from the run's checkpoint file (rows in file order, labels and
      ids echoed), to the 6 written decimals;
    * the AUC that ``iacn score`` prints (4 decimals) and :func:`score_file` returns is the rank AUC
      (ties count half) of the written scores against the written labels.

    Returns a few figures for the caller's model-specific checks."""
    import re

    import numpy as np
    from helpers import prepare_planted
    from test_serving import _write_tsv

    from iacn_torchrec.cli import main
    from iacn_torchrec.data.loader import BatchLoader, PreparedDataset
    from iacn_torchrec.data.negatives import UniformNegatives
    from iacn_torchrec.serving.score import score_file

    _, data = prepare_planted(tmp_path / "planted", num_users=60, seed=1)
    run, art = tmp_path / "run", tmp_path / "model"
    seed, num_negatives = 3, 4
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--model", model_name, "--iacn", *dims,
                 "--num-negatives", str(num_negatives), "--batch-size", "32", "--lr", "0.01",
                 "--max-steps", str(steps), "--seed", str(seed), "--threads", "1", "--eval-threads", "1",
                 "--no-progress", "--no-resume", "--out", str(run)]) == 0
    assert f"{model_name}+IaCN: test AUC" in capsys.readouterr().out
    assert main(["export", "--run", str(run), "--out", str(art), "--check-samples", "0",
                 "--threads", "1"]) == 0
    assert f"exported {model_name} (IaCN-trained, step {steps})" in capsys.readouterr().out
    ds = PreparedDataset.open(data)
    _write_tsv(ds, tmp_path / "in.tsv")
    assert main(["score", "--model", str(art), "--input", str(tmp_path / "in.tsv"), "--out",
                 str(tmp_path / "out.tsv"), "--batch-size", "16", "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = [ln.split("\t") for ln in (tmp_path / "out.tsv").read_text().splitlines()]
    assert rows[0] == ["user_id", "item_id", "score", "label"]
    written = np.array([float(r[2]) for r in rows[1:]])
    labels = np.array([int(r[3]) for r in rows[1:]])
    s = ds.split("test")
    np.testing.assert_array_equal(labels, np.asarray(s.label))
    assert [r[:2] for r in rows[1:]] == [[ds.vocab("uid")[u - 1], ds.vocab("item")[i - 1]]
                                         for u, i in zip(s.uid, s.item)]

    # the reference: the trained model from the checkpoint file, eager, batches of an odd size
    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts[-1].name == f"step_{steps:08d}"
    state = torch.load(ckpts[-1] / "rank0.pt", weights_only=False)["model"]
    emb_dim, aux_dim = (int(dims[dims.index(f) + 1]) for f in ("--emb-dim", "--aux-dim"))
    iacn = IaCNConfig(enabled=True, aux_dim=aux_dim, num_negatives=num_negatives)
    torch.manual_seed(seed)
    model = build_model(model_name, ds.num_users, ds.num_items, ds.num_cates, ds.max_len, iacn,
                        emb_dim=emb_dim, user_dim=18)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # strict: the run's model is exactly this one, IaCN included
    model.eval()
    # IaCN was on in training: its own parameters (reached by L_IaCN only) and E_aux moved
    assert model.iacn is not None
    assert any(not torch.equal(init[k], v) for k, v in state.items() if k.startswith("iacn."))
    assert not torch.equal(init["embeddings.aux.embeddings.item_aux.weight"],
                           state["embeddings.aux.embeddings.item_aux.weight"])
    loader = BatchLoader(ds, "test", batch_size=7, placeholder_features=True,
                         iacn_negatives=UniformNegatives(ds.num_items, num_negatives))
    with torch.no_grad():
        eager = np.concatenate([model.predict(b).numpy() for b in loader])
    assert eager.shape == written.shape == (len(s),)
    np.testing.assert_allclose(written, eager, rtol=0, atol=1e-6)  # written with 6 decimals
    assert float(eager.std()) > 1e-3  # the scores do depend on the row

    # the AUC: P(score of a positive > score of a negative), ties half, over all pairs
    d = written[labels == 1][:, None] - written[labels == 0][None, :]
    want_auc = float(((d > 0) + 0.5 * (d == 0)).mean())
    # pairs closer than the written 6 decimals may be ordered otherwise in the unrounded scores
    tol = 0.5 * float((np.abs(d) <= 1.5e-6).mean()) + 1e-12
    m = re.search(r"AUC (\d\.\d{4})", printed)
    assert m and abs(float(m.group(1)) - want_auc) <= 5e-5 + tol, (printed, want_auc)
    summary = score_file(art, tmp_path / "in.tsv", tmp_path / "again.tsv", progress=False)
    assert summary["auc"] == pytest.approx(want_auc, abs=tol)
    assert abs(want_auc - 0.5) > 0.05, want_auc  # 1 - AUC (reversed scores) could not pass
    # and the training run's own final evaluation of the same model agrees
    assert json.loads((run / "metrics.json").read_text())["test"]["auc"] == pytest.approx(want_auc, abs=tol)
    return {"auc": want_auc, "model": model, "eager": eager}


def test_cli_dlrm_trains_exports_and_scores(tmp_path, capsys):
    """`iacn train --model dlrm --iacn` → `iacn export` → `iacn score` (orig 12 + aux 6 = the user
    dim 18: DLRM's features need no user projection, the plug-in's setting)."""
    out = cli_train_export_score("dlrm", tmp_path, capsys, ["--emb-dim", "12", "--aux-dim", "6"])
    assert isinstance(out["model"].main_model, DLRMMain) and out["model"].main_model.user_proj is None
