"""CTRWithIaCN / build_model: IaCN off is the plain model, the δ/λ gradient split on the real EC
tables, logQ wiring, prediction, pipeline tracing, and every model training with IaCN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Batch, planted_batch, positives_only_negatives
from torchrec.distributed.train_pipeline.tracing import Tracer

from iacn_torchrec.models.dien import DIEN, DIENConfig
from iacn_torchrec.models.din import DIN, DINConfig
from iacn_torchrec.models.dlrm_plugin import DLRMMain
from iacn_torchrec.models.framework import MODEL_NAMES, CTRWithIaCN, build_model
from iacn_torchrec.models.wide_deep import WideDeep
from iacn_torchrec.modules.embeddings import InterestAwareEmbeddings
from iacn_torchrec.modules.iacn import IaCNConfig

NU, NI, NC, L, S = 20, 60, 6, 8, 5


def make_batch(B: int, seed: int, S: int = 0, neg_hist: bool = False) -> Batch:
    return planted_batch(B, seed, NU, NI, NC, L, num_negatives=S, neg_hist=neg_hist)


def table(model: CTRWithIaCN, name: str) -> torch.Tensor:
    for ec in model.embeddings.collections().values():
        if name in ec.embeddings:
            return ec.embeddings[name].weight
    raise KeyError(name)


def _plain_main_model(name: str) -> torch.nn.Module:
    """The main model as a user would build it without this framework (user 4, item 8 = 2·4)."""
    if name == "din":
        return DIN(4, 8, L)
    if name == "dien":
        return DIEN(4, 8, L, DIENConfig(hidden_size=8))  # build_model's default: the plain item width
    if name == "wide_deep":
        return WideDeep(4, 8, L)
    return DLRMMain(4, 8, L)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_iacn_off_is_the_plain_model(name):
    """Same seed, built by hand: identical parameters, logits, loss (with DIEN's own auxiliary
    loss) and gradients."""
    torch.manual_seed(0)
    model = build_model(name, NU, NI, NC, L, IaCNConfig(enabled=False), emb_dim=4)
    assert model.iacn is None and model.embeddings.aux is None
    batch = make_batch(16, seed=1, neg_hist=name == "dien")
    torch.manual_seed(0)
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=0, user_dim=4,
                                  with_neg_hist=name == "dien")
    main = _plain_main_model(name)
    plain = [*emb.parameters(), *main.parameters()]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain)
    for p, q in zip(model.parameters(), plain, strict=True):
        assert torch.equal(p, q)
    logits_ref, model_aux = main(emb(batch.sparse_features))
    assert (model_aux is not None) == (name == "dien")
    loss_ref = F.binary_cross_entropy_with_logits(logits_ref, batch.labels)
    if model_aux is not None:
        loss_ref = loss_ref + model_aux
    loss_ref.backward()
    loss, (logits, main_loss, iacn_loss) = model(batch)
    loss.backward()
    torch.testing.assert_close(logits, logits_ref.detach())
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(main_loss, loss_ref.detach())
    assert iacn_loss.item() == 0.0 and not iacn_loss.requires_grad
    for p, q in zip(model.parameters(), plain, strict=True):
        assert q.grad is not None and q.grad.any()
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("keep_width", [False, True])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seed_paired_arms_share_the_main_model_init(name, keep_width):
    """DESIGN.md, "Measuring": the same seed gives the plain and the IaCN arm the same main-model
    initialisation wherever a parameter's shape allows, and the RNG runs on as it would without
    that (the IaCN module, and so the λ = 0 / δ = 1 control, draw what they drew before)."""
    on = IaCNConfig(enabled=True, aux_dim=2, keep_width=keep_width)
    torch.manual_seed(5)
    plain = build_model(name, NU, NI, NC, L, None, emb_dim=4)
    torch.manual_seed(5)
    arm = build_model(name, NU, NI, NC, L, on, emb_dim=4)
    after = torch.get_rng_state()
    ours = dict(arm.main_model.named_parameters())
    theirs = dict(plain.main_model.named_parameters())
    shared = [n for n in theirs if ours[n].shape == theirs[n].shape]
    for n in shared:
        assert torch.equal(ours[n], theirs[n]), n
    if keep_width:  # the main model is exactly the plain model's
        assert len(shared) == len(theirs)
    else:  # the layers reading E_orig ⊕ E_aux are wider; everything after them is shared
        assert 0 < len(shared) < len(theirs)
        assert torch.equal(table(arm, "item_orig"), table(plain, "item_orig"))
    assert torch.equal(table(arm, "uid"), table(plain, "uid"))

    # built by hand in the same order without the sharing: the RNG ends where build_model's does
    torch.manual_seed(5)
    orig = 4 - 2 if keep_width else 4
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=orig, aux_dim=2, user_dim=4,
                                  with_neg_hist=name == "dien", with_iacn_negatives=True)
    main = type(plain.main_model)(4, emb.item_dim, L, plain.main_model.config)
    task = type(arm.iacn)(on, item_dim=emb.aux_item_dim, max_len=L, user_dim=4)
    assert torch.equal(torch.get_rng_state(), after)
    for p, q in zip(arm.iacn.parameters(), task.parameters(), strict=True):
        assert torch.equal(p, q)
    # the wider layers keep the draws they had before (the plain twin leaves them alone)
    for n, q in main.named_parameters():
        if n not in shared:
            assert torch.equal(ours[n], q), n
    # a λ = 0 / δ = 1 control shares every draw with its IaCN arm
    torch.manual_seed(5)
    control = build_model(name, NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=2, keep_width=keep_width,
                                                          lam=0.0, delta=1.0), emb_dim=4)
    for p, q in zip(control.parameters(), arm.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("keep_width, built", [(False, 1), (True, 2)])
def test_pairing_draws_no_second_set_of_tables_at_the_paper_width(monkeypatch, keep_width, built):
    """At the paper's width the plain arm's RNG state after its tables is recorded while the IaCN
    arm's own (identical) E_orig and user tables are drawn, so no twin table is allocated: tables
    can be most of a model's memory. Keep-width tables are narrower, so there they are replayed."""
    import iacn_torchrec.models.framework as framework

    sizes = []

    class Counting(InterestAwareEmbeddings):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sizes.append(self.orig_dim)

    monkeypatch.setattr(framework, "InterestAwareEmbeddings", Counting)
    torch.manual_seed(0)
    build_model("din", NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=2, keep_width=keep_width), emb_dim=4)
    assert len(sizes) == built
    assert sizes[1:] == [4] * (built - 1)  # the replay draws the plain arm's 4-wide tables


@pytest.mark.parametrize("delta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_split_through_real_tables(delta, lam, name):
    """Every table's gradient from the full model equals the δ-free references: aux tables
    ``(1-δ)·λ·g_IaCN + δ·g_main``, orig and user tables ``g_main`` (IaCN never reaches them)."""
    torch.manual_seed(0)
    cfg = IaCNConfig(enabled=True, lam=lam, delta=delta, aux_dim=3, num_negatives=S)
    model = build_model(name, NU, NI, NC, L, cfg, emb_dim=4)
    batch = make_batch(16, seed=2, S=S, neg_hist=name == "dien")
    kjt, labels = batch.sparse_features, batch.labels
    aux_names, main_names = ["item_aux", "cate_aux"], ["item_orig", "cate_orig", "uid"]
    aux_tables = [table(model, t) for t in aux_names]
    main_tables = [table(model, t) for t in main_names]

    # references from δ-free graphs: δ = 1 leaves the main path unscaled, δ = 0 the IaCN path
    emb = model.embeddings(kjt, 1.0, aux_views=False)
    logits, aux = model.main_model(emb)
    l_main = F.binary_cross_entropy_with_logits(logits, labels) + (aux if aux is not None else 0.0)
    g_main = torch.autograd.grad(l_main, aux_tables + main_tables)
    emb = model.embeddings(kjt, 0.0, aux_views=True)
    torch.manual_seed(7)  # IaCN's training-mode routing logits
    l_iacn = model.iacn_loss(emb, labels)
    g_iacn = torch.autograd.grad(l_iacn, aux_tables + main_tables, allow_unused=True)
    for n, g_m, g_i in zip(aux_names, g_main, g_iacn):
        assert g_i.abs().sum() > 0 and g_m.abs().sum() > 0, n
    assert all(g is None or not g.any() for g in g_iacn[2:])  # IaCN reads no E_orig/user row

    torch.manual_seed(7)
    loss, (_, main_loss, iacn_loss) = model(batch)
    loss.backward()
    for n, t, g_m, g_i in zip(aux_names, aux_tables, g_main, g_iacn):
        torch.testing.assert_close(t.grad, (1 - delta) * lam * g_i + delta * g_m, msg=n)
    for n, t, g_m in zip(main_names, main_tables, g_main[2:]):
        torch.testing.assert_close(t.grad, g_m, msg=n)  # L_IaCN never reaches E_orig
    torch.testing.assert_close(loss.detach(), main_loss + lam * iacn_loss)
    if lam:
        torch.testing.assert_close(iacn_loss, l_iacn.detach())


def test_orig_gradient_is_the_same_for_any_lambda_dien():
    grads = []
    for lam in (0.0, 2.0):
        torch.manual_seed(0)
        model = build_model("dien", NU, NI, NC, L, IaCNConfig(enabled=True, lam=lam, delta=0.3, aux_dim=3,
                                                               num_negatives=S), emb_dim=4)
        torch.manual_seed(1)
        loss, _ = model(make_batch(16, seed=3, S=S, neg_hist=True))
        loss.backward()
        grads.append((table(model, "item_orig").grad.clone(), table(model, "cate_orig").grad.clone(),
                      table(model, "uid").grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_log_q_and_ids_reach_iacn():
    torch.manual_seed(0)
    log_q = torch.log_softmax(3 * torch.randn(NI + 1), 0)  # far from uniform: the correction matters
    cfg = IaCNConfig(enabled=True, lam=1.0, aux_dim=3, sampler="log_uniform", num_negatives=S)
    with pytest.raises(ValueError, match="item_log_q"):
        build_model("din", NU, NI, NC, L, cfg, emb_dim=4)
    model = build_model("din", NU, NI, NC, L, cfg, emb_dim=4, item_log_q=log_q)
    batch = make_batch(16, seed=4, S=S)
    torch.manual_seed(3)
    _, (_, _, iacn_loss) = model(batch)
    emb = model.embeddings(batch.sparse_features, model.delta)
    ids = batch.sparse_features["iacn_neg_item"].values().view(16, S)
    torch.manual_seed(3)
    ref = model.iacn(emb.aux_hist, emb.hist_lengths, emb.aux_target, batch.labels, user=emb.user.detach(),
                     aux_negatives=emb.aux_negatives, neg_log_q=log_q[ids],
                     target_log_q=log_q[batch.sparse_features["item"].values()],
                     target_ids=batch.sparse_features["item"].values(), negative_ids=ids)
    torch.testing.assert_close(iacn_loss, ref.detach())
    torch.manual_seed(3)
    # the same call with a constant log Q (a shift of every logit, i.e. no correction)
    without_q = model.iacn(emb.aux_hist, emb.hist_lengths, emb.aux_target, batch.labels,
                           user=emb.user.detach(), aux_negatives=emb.aux_negatives,
                           neg_log_q=torch.zeros(16, S),
                           target_log_q=torch.zeros(16), target_ids=batch.sparse_features["item"].values(),
                           negative_ids=ids)
    assert (iacn_loss - without_q.detach()).abs() > 1e-3  # the correction is applied
    with pytest.raises(ValueError, match="item_log_q"):
        CTRWithIaCN(model.embeddings, model.main_model, model.iacn, item_log_q=torch.zeros(3))


def test_sampler_needs_matching_embeddings():
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=3, user_dim=4)
    torch.manual_seed(0)
    model = build_model("din", NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=3), emb_dim=4)
    with pytest.raises(ValueError, match="with_iacn_negatives"):
        CTRWithIaCN(emb, model.main_model, model.iacn)
    with pytest.raises(ValueError, match="model_name"):
        build_model("dlrm9", NU, NI, NC, L)


def test_lam_and_delta_come_from_the_task_config():
    cfg = IaCNConfig(enabled=True, aux_dim=3, lam=0.4, delta=0.8, sampler="in_batch")
    torch.manual_seed(0)
    model = build_model("din", NU, NI, NC, L, cfg, emb_dim=4)
    again = CTRWithIaCN(model.embeddings, model.main_model, model.iacn)
    assert (model.lam, model.delta) == (again.lam, again.delta) == (0.4, 0.8)
    assert CTRWithIaCN(model.embeddings, model.main_model, model.iacn, lam=0.4, delta=0.8).lam == 0.4
    for kw in (dict(lam=1.0), dict(delta=0.3)):
        with pytest.raises(ValueError, match=rf"{next(iter(kw))}=.* differs from the IaCN task's config"):
            CTRWithIaCN(model.embeddings, model.main_model, model.iacn, **kw)


def test_predict_skips_iacn_and_matches_forward():
    torch.manual_seed(0)
    model = build_model("dien", NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=3, sampler="in_batch"),
                        emb_dim=4)
    batch = make_batch(16, seed=5, neg_hist=True)
    model(batch)[0].backward()  # one step's BN statistics
    model.eval()
    calls = []
    model.iacn.register_forward_hook(lambda *a: calls.append(1))
    probs = model.predict(batch)
    assert not calls and probs.shape == (16,) and ((probs > 0) & (probs < 1)).all()
    _, (logits, _, _) = model(batch)
    torch.testing.assert_close(probs, torch.sigmoid(logits))


def test_forward_traces_for_torchrec_pipelines():
    """TorchRec's sparse-dist pipeline fx-traces the model (sharded modules as leaves) and needs the
    collections' input to be ``batch.sparse_features`` unchanged."""
    torch.manual_seed(0)
    cfg = IaCNConfig(enabled=True, aux_dim=3, num_negatives=S)
    model = build_model("dien", NU, NI, NC, L, cfg, emb_dim=4)
    graph = Tracer(leaf_modules=["embeddings.orig", "embeddings.aux", "main_model", "iacn"]).trace(model)
    ec_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target.startswith("embeddings.")]
    assert sorted(n.target for n in ec_nodes) == ["embeddings.aux", "embeddings.orig"]
    for n in ec_nodes:
        (arg,) = n.args
        assert arg.op == "call_function" and arg.args[1] == "sparse_features"
        assert arg.args[0].op == "placeholder"


@pytest.mark.parametrize("name,sampler", [("din", "uniform"), ("dien", "in_batch"), ("wide_deep", "uniform")])
def test_each_model_with_iacn_trains(name, sampler):
    torch.manual_seed(0)
    cfg = IaCNConfig(enabled=True, lam=1.0, delta=0.3, aux_dim=4, sampler=sampler, num_negatives=S)
    model = build_model(name, NU, NI, NC, L, cfg, emb_dim=4)
    s = S if sampler != "in_batch" else 0
    batches = [make_batch(32, seed=10 + i, S=s, neg_hist=name == "dien") for i in range(3)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist = []
    for step in range(30):
        loss, (_, main_loss, iacn_loss) = model(batches[step % 3])
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append((loss.item(), main_loss.item(), iacn_loss.item()))
    first = torch.tensor(hist[:3]).mean(0)
    last = torch.tensor(hist[-3:]).mean(0)
    assert torch.isfinite(torch.tensor(hist)).all()
    assert last[0] < 0.8 * first[0], (first, last)
    assert last[1] < first[1] and last[2] < first[2], (first, last)


@pytest.mark.parametrize(
    "name,sampler,dropout",
    [("din", "uniform", 0.0), ("dien", "in_batch", 0.0), ("wide_deep", "log_uniform", 0.0),
     ("din", "in_batch", 0.3)],
)
def test_iacn_on_worker_thread_equals_serial(name, sampler, dropout):
    """IaCN's forward+backward on the worker thread: the same losses, gradients and trained
    parameters as the serial graph (up to float summation order), step after step. With dropout the
    main model draws from the global RNG too: the worker starts after the main forward, so the
    draws come in the serial order."""
    cfg = IaCNConfig(enabled=True, lam=1.5, delta=0.3, aux_dim=4, sampler=sampler, num_negatives=S)
    log_q = torch.log_softmax(torch.randn(NI + 1, generator=torch.Generator().manual_seed(3)), 0)
    main_cfg = DINConfig(dropout=dropout) if dropout else None
    models = []
    for worker in (False, True):
        torch.manual_seed(0)
        m = build_model(name, NU, NI, NC, L, cfg, emb_dim=4, item_log_q=log_q, model_config=main_cfg)
        models.append(m.run_iacn_on_worker(worker))
    serial, threaded = models
    assert threaded.iacn_on_worker and not serial.iacn_on_worker
    # SGD, not Adam: the worker sums E_aux's gradient in another order (float noise ~1e-8), and
    # Adam turns the noise on a parameter whose true gradient is 0 (the attention's output bias:
    # the softmax ignores a shift) into lr-sized steps
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    s = S if sampler != "in_batch" else 0
    batches = [make_batch(32, seed=20 + i, S=s, neg_hist=name == "dien") for i in range(3)]
    for step in range(6):
        outs = []
        for m, opt in zip(models, opts):
            torch.manual_seed(100 + step)  # the training-mode routing logits: the same draws
            opt.zero_grad(set_to_none=True)  # before the forward: the worker writes IaCN's grads after it
            loss, (_, main_loss, iacn_loss) = m(batches[step % 3])
            loss.backward()
            outs.append((loss.detach(), main_loss, iacn_loss))
            grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
            opt.step()
            m.last_grads = grads
        (l0, m0, i0), (l1, m1, i1) = outs
        assert i0 > 0
        torch.testing.assert_close(i1, i0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m1, m0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)  # λ·L_IaCN included once backward ran
        assert serial.last_grads.keys() == threaded.last_grads.keys()
        assert any(k.startswith("iacn.") for k in threaded.last_grads)  # IaCN's params got gradients
        for k, g in serial.last_grads.items():
            torch.testing.assert_close(threaded.last_grads[k], g, rtol=1e-5, atol=1e-6, msg=k)
    for (k, p0), (_, p1) in zip(serial.named_parameters(), threaded.named_parameters()):
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6, msg=k)
    # evaluation never uses the worker, and the two models still agree
    for m in models:
        m.eval()
    torch.testing.assert_close(threaded.predict(batches[0]), serial.predict(batches[0]), rtol=1e-5, atol=1e-6)


def test_iacn_worker_error_reaches_the_caller():
    """An error inside IaCN on the worker is raised to the caller (by backward, where the branch
    joins), and the worker thread is free for the next step."""
    torch.manual_seed(0)
    cfg = IaCNConfig(enabled=True, aux_dim=4, num_negatives=S)
    model = build_model("din", NU, NI, NC, L, cfg, emb_dim=4).run_iacn_on_worker()
    batch = make_batch(16, seed=1, S=S)
    model.iacn.config.pow_p = -1.0  # label-aware attention rejects it
    loss, _ = model(batch)
    with pytest.raises(ValueError, match="p must be a positive float"):
        loss.backward()
    model.iacn.config.pow_p = 2.0
    model.zero_grad(set_to_none=True)
    loss, (_, main_loss, iacn_loss) = model(batch)
    loss.backward()
    assert iacn_loss > 0 and model.iacn.routing.bilinear.grad is not None
    torch.testing.assert_close(loss.detach(), main_loss + iacn_loss)


def test_main_model_error_with_the_worker_on():
    """An error in the main model's forward reaches the caller at once, leaves no IaCN work behind
    (the worker starts only once the loss exists), and the next step trains normally."""
    torch.manual_seed(0)
    cfg = IaCNConfig(enabled=True, aux_dim=4, num_negatives=S)
    model = build_model("din", NU, NI, NC, L, cfg, emb_dim=4).run_iacn_on_worker()
    batch = make_batch(16, seed=1, S=S)
    forward = model.main_model.forward

    def broken(emb):
        raise RuntimeError("main model failed")

    model.main_model.forward = broken
    with pytest.raises(RuntimeError, match="main model failed"):
        model(batch)
    model.main_model.forward = forward
    assert model.iacn.routing.bilinear.grad is None  # IaCN never ran for the failed step
    loss, (_, main_loss, iacn_loss) = model(batch)
    loss.backward()
    assert iacn_loss > 0 and model.iacn.routing.bilinear.grad is not None
    torch.testing.assert_close(loss.detach(), main_loss + iacn_loss)


def test_the_worker_starts_when_the_backward_begins():
    """IaCN is submitted to the worker by the backward's first node, not by the forward (whose end
    met the step loop's Python, both threads then waiting for the GIL): after the forward nothing has
    run; the backward runs it once, on another thread, and a second backward (retain_graph) reuses its
    result."""
    import threading

    from iacn_torchrec.models.framework import _iacn_worker

    torch.manual_seed(0)
    cfg = IaCNConfig(enabled=True, aux_dim=4, num_negatives=S)
    model = build_model("din", NU, NI, NC, L, cfg, emb_dim=4).run_iacn_on_worker()
    calls: list[str] = []  # the thread of every IaCN forward
    model.iacn.register_forward_pre_hook(lambda *_: calls.append(threading.current_thread().name))
    loss, (_, main_loss, iacn_loss) = model(make_batch(16, seed=1, S=S))
    _iacn_worker().submit(lambda: None).result()  # one FIFO thread: work submitted so far has run
    assert calls == [] and iacn_loss == 0 and model.iacn.routing.bilinear.grad is None
    torch.testing.assert_close(loss.detach(), main_loss)  # λ·L_IaCN not added yet
    loss.backward(retain_graph=True)
    assert iacn_loss > 0
    assert len(calls) == 1 and calls[0] != threading.current_thread().name
    first = model.iacn.routing.bilinear.grad.clone()
    torch.testing.assert_close(loss.detach(), main_loss + iacn_loss)
    loss.backward()
    assert len(calls) == 1  # the retained graph reuses the worker's result
    torch.testing.assert_close(model.iacn.routing.bilinear.grad, 2 * first)
    torch.testing.assert_close(loss.detach(), main_loss + iacn_loss)  # added once


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_iacn_worker_grads_follow_the_backward(scale):
    """IaCN's parameter gradients reach ``.grad`` inside the main backward, scaled by what it
    brings: ``(c·loss).backward()`` equals the serial graph's for every parameter, gradients
    cleared between forward and backward do not matter, and further backwards (another forward's,
    or the same retained graph's) accumulate."""
    cfg = IaCNConfig(enabled=True, aux_dim=4, num_negatives=S)
    models = []
    for worker in (False, True):
        torch.manual_seed(0)
        models.append(build_model("din", NU, NI, NC, L, cfg, emb_dim=4).run_iacn_on_worker(worker))
    batch = make_batch(16, seed=1, S=S)
    grads = []
    for m in models:
        torch.manual_seed(5)
        loss, _ = m(batch)
        m.zero_grad(set_to_none=True)  # after the forward: nothing of IaCN's is lost
        (scale * loss).backward()
        torch.manual_seed(5)
        loss2, _ = m(batch)
        loss2.backward(retain_graph=True)  # accumulates onto the first step's gradients
        loss2.backward()  # and a second backward through the retained graph, again
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    serial, threaded = grads
    assert serial.keys() == threaded.keys() and any(k.startswith("iacn.") for k in threaded)
    for k, g in serial.items():
        torch.testing.assert_close(threaded[k], g, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("name", ["din", "dien"])
@pytest.mark.parametrize("worker", [False, True])
def test_negatives_of_positive_rows_only_give_the_same_step(name, worker):
    """The loader samples IaCN's negatives for label-1 rows only (the loss reads no other): the
    loss and every gradient equal, bit for bit, those of the same batch with negatives on every row."""
    log_q = torch.log(torch.linspace(1.0, 2.0, NI + 1) / 100)
    full = make_batch(16, seed=6, S=S, neg_hist=name == "dien")
    assert 0 < full.labels.sum() < 16
    lean = positives_only_negatives(full)
    assert lean.sparse_features["iacn_neg_item"].values().numel() == int(full.labels.sum()) * S
    results = []
    for batch in (full, lean):
        torch.manual_seed(0)
        cfg = IaCNConfig(enabled=True, lam=1.0, aux_dim=3, sampler="log_uniform", num_negatives=S)
        model = build_model(name, NU, NI, NC, L, cfg, emb_dim=4, item_log_q=log_q).run_iacn_on_worker(worker)
        torch.manual_seed(1)
        loss, (_, _, iacn_loss) = model(batch)
        loss.backward()
        results.append((loss.detach(), iacn_loss, {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}))
    (loss_a, iacn_a, grads_a), (loss_b, iacn_b, grads_b) = results
    assert iacn_a > 0 and torch.equal(loss_a, loss_b) and torch.equal(iacn_a, iacn_b)
    assert grads_a.keys() == grads_b.keys() and any(".aux." in n for n in grads_a)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n


def test_negatives_of_other_rows_are_refused():
    torch.manual_seed(0)
    model = build_model("din", NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=3, num_negatives=S), emb_dim=4)
    full = make_batch(16, seed=6, S=S)
    wrong = positives_only_negatives(full, rows=torch.nonzero(full.labels < 0.5).squeeze(1))
    with pytest.raises(ValueError, match="the label-1 rows"):
        model(wrong)


@pytest.mark.parametrize("worker", [False, True])
def test_lam_zero_never_runs_iacn(worker):
    """λ = 0 (the capacity-matched control): IaCN's forward is never called, on either path, and
    the reported iacn_loss is 0."""
    cfg = IaCNConfig(enabled=True, aux_dim=3, lam=0.0, delta=1.0, sampler="in_batch")
    torch.manual_seed(0)
    model = build_model("din", NU, NI, NC, L, cfg, emb_dim=4).run_iacn_on_worker(worker)
    calls = []
    model.iacn.register_forward_hook(lambda *a: calls.append(1))
    loss, (_, main_loss, iacn_loss) = model(make_batch(16, seed=2))
    loss.backward()
    assert calls == [] and iacn_loss == 0 and torch.equal(loss.detach(), main_loss)
    model.lam = 1.0  # the hook does fire once IaCN runs
    model(make_batch(16, seed=2))[0].backward()
    assert calls == [1]


def test_iacn_worker_uses_the_training_threads(monkeypatch):
    """A thread keeps the intra-op thread count it started with: the worker takes the training
    thread's at every step (else its float sums, and its core use, would differ from the serial run)."""
    import iacn_torchrec.models.framework as fw

    monkeypatch.setattr(fw, "_WORKER", None)  # a worker thread of our own, started below
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert fw._iacn_worker().submit(torch.get_num_threads).result() == 2
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = build_model("din", NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=4, num_negatives=S),
                            emb_dim=4).run_iacn_on_worker()
        model(make_batch(16, seed=1, S=S))[0].backward()
        assert fw._iacn_worker().submit(torch.get_num_threads).result() == 1
    finally:
        fw._iacn_worker().shutdown()
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keep_width_gives_the_main_model_the_plain_width(name):
    """``iacn.keep_width`` splits emb_dim into E_orig (emb_dim - aux_dim) and E_aux: the main model
    gets exactly the plain model's layers (same parameter shapes), and still reads E_orig ⊕ E_aux.
    Without it (the paper's setting) the main model reads the wider emb_dim + aux_dim."""
    plain = build_model(name, NU, NI, NC, L, IaCNConfig(enabled=False), emb_dim=6)
    kept = build_model(name, NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=2, keep_width=True), emb_dim=6)
    wide = build_model(name, NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=2), emb_dim=6)

    def shapes(m):
        return {k: tuple(p.shape) for k, p in m.main_model.named_parameters()}

    assert kept.embeddings.item_dim == plain.embeddings.item_dim == 12
    assert (kept.embeddings.orig_dim, kept.embeddings.aux_dim) == (4, 2)
    assert tuple(table(kept, "item_orig").shape) == (NI + 1, 4)
    assert tuple(table(kept, "item_aux").shape) == (NI + 1, 2)
    assert shapes(kept) == shapes(plain)
    assert wide.embeddings.item_dim == 16 and shapes(wide) != shapes(plain)
    batch = make_batch(16, seed=1, S=S, neg_hist=name == "dien")
    loss, (logits, _, iacn_loss) = kept(batch)
    loss.backward()
    assert logits.shape == (16,) and iacn_loss.item() > 0
    assert table(kept, "item_aux").grad.any()
    with pytest.raises(ValueError, match="aux_dim=6 must be smaller"):
        build_model(name, NU, NI, NC, L, IaCNConfig(enabled=True, aux_dim=6, keep_width=True), emb_dim=6)


def test_the_join_runs_after_the_tables_gradients(monkeypatch):
    """The join (created before the main lookups, its graph input the model's private scalar leaf)
    runs last in the backward: it finds the aux tables' ``.grad`` already holding the main lookups'
    gradient and adds IaCN's rows into it, and the step's gradients equal the serial path's."""
    import iacn_torchrec.models.framework as framework

    seen: list[bool] = []
    backward = framework._JoinBranch.backward

    def recording(ctx, grad):
        rows, _ = ctx.pending.result()
        seen.extend(table.grad is not None for table, _, _ in rows)
        return backward(ctx, grad)

    monkeypatch.setattr(framework._JoinBranch, "backward", staticmethod(recording))
    cfg = IaCNConfig(enabled=True, aux_dim=4, num_negatives=S, delta=0.3)
    grads = []
    for worker in (True, False):
        torch.manual_seed(0)
        model = build_model("din", NU, NI, NC, L, cfg, emb_dim=4).run_iacn_on_worker(worker)
        loss, _ = model(make_batch(16, seed=1, S=S))
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    assert seen and all(seen)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
