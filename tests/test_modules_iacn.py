"""IaCNTask: config checks, finite-difference gradients, positives only, learning planted interests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from iacn_torchrec.modules.attention import label_aware_attention
from iacn_torchrec.modules.capsule import InterestCapsuleRouting
from iacn_torchrec.modules.iacn import IaCNConfig, IaCNTask
from iacn_torchrec.modules.sampled_softmax import sampled_softmax_loss

F64 = torch.float64


@pytest.mark.parametrize(
    "field, value",
    [
        ("delta", 1.5),
        ("delta", -0.1),
        ("lam", -1.0),
        ("lam", math.inf),
        ("pow_p", 0.0),
        ("k_max", 0),
        ("routing_iters", 0),
        ("aux_dim", 0),
        ("sampler", "popularity"),
        ("num_negatives", 0),
        ("enabled", "yes"),
        ("seed", 1.5),
    ],
)
def test_config_validation(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"IaCNConfig.{field}"):
        IaCNConfig(**{field: value})


def test_config_defaults_and_k_max() -> None:
    # the design's defaults (DESIGN.md: MIND's p = 2 and r = 3, the H-layer on, uniform negatives)
    d = IaCNConfig()
    assert (d.pow_p, d.routing_iters, d.user_profile_layer, d.sampler, d.delta, d.lam) == (
        2.0, 3, True, "uniform", 0.3, 1.0)
    cfg = IaCNConfig(pow_p=math.inf, delta=1, lam=0)
    assert cfg.delta == 1.0 and isinstance(cfg.delta, float) and cfg.lam == 0.0
    assert IaCNTask(IaCNConfig(), item_dim=36, max_len=20).k_max == 5
    assert IaCNTask(IaCNConfig(k_max=3), item_dim=36, max_len=20).k_max == 3
    with pytest.raises(TypeError, match="IaCNConfig"):
        IaCNTask({"lam": 1.0}, item_dim=4, max_len=4)  # type: ignore[arg-type]


def _batch(B=6, L=5, h=4, S=3, Du=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return dict(
        aux_hist=torch.randn(B, L, h, generator=g, dtype=dtype),
        hist_lengths=torch.tensor([1, 2, 3, 5, 4, 0][:B]),
        aux_target=torch.randn(B, h, generator=g, dtype=dtype),
        labels=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0][:B]),
        user=torch.randn(B, Du, generator=g, dtype=dtype),
        aux_negatives=torch.randn(B, S, h, generator=g, dtype=dtype),
    )


def test_forward_composes_routing_attention_softmax() -> None:
    torch.manual_seed(0)
    task = IaCNTask(IaCNConfig(pow_p=3.0), item_dim=4, max_len=5, user_dim=3).double().eval()
    b = _batch()
    loss = task(**b)
    caps, mask = task.routing(b["aux_hist"], b["hist_lengths"], user=b["user"])
    v, a = label_aware_attention(caps, mask, b["aux_target"], 3.0)
    ref = sampled_softmax_loss(v, b["aux_target"], b["aux_negatives"], b["labels"])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)  # forward routes the positive rows only
    out = task.interests(b["aux_hist"], b["hist_lengths"], b["aux_target"], user=b["user"])
    assert out.capsules.shape == (6, 3, 4) and out.routing_weights.shape == (6, 3, 5)
    assert torch.equal(out.attention_weights, a) and torch.equal(out.user_vec, v)
    assert torch.allclose(out.attention_weights.sum(1), torch.ones(6, dtype=F64))
    assert torch.all(out.attention_weights[~out.capsule_mask] == 0)


@pytest.mark.parametrize("sampler", ["uniform", "in_batch"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])  # float64: padded without fbgemm's kernel
def test_forward_routes_only_positive_rows(sampler: str, dtype: torch.dtype) -> None:
    """forward() routes the label-1 rows alone: the loss and every gradient (inputs, parameters) equal
    those of routing the whole batch and masking label-0 rows in the loss, in training mode with
    a jagged history and ids / log Q for the collision masking and the correction."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    torch.manual_seed(0)
    task = IaCNTask(IaCNConfig(sampler=sampler), item_dim=4, max_len=5, user_dim=3).to(dtype).train()
    b = _batch(dtype=dtype)
    if sampler == "in_batch":
        b.pop("aux_negatives")
    lengths = b.pop("hist_lengths")
    real = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    values = b.pop("aux_hist")[real].requires_grad_(True)
    leaves = {k: b[k].requires_grad_(True) for k in ("aux_target", "user", "aux_negatives") if k in b}
    ids = dict(target_ids=torch.tensor([3, 4, 3, 5, 6, 7]),
               target_log_q=torch.linspace(-3, -1, 6, dtype=dtype))
    if sampler == "uniform":
        ids.update(negative_ids=torch.tensor([[3, 1, 2]] * 6),
                   neg_log_q=torch.full((6, 3), -2.0, dtype=dtype))
    logits = task.routing.training_logits(torch.zeros(6, 5, 4, dtype=dtype))  # [B, K, L]: as the framework

    def grads(loss):
        return torch.autograd.grad(loss, [values, *leaves.values(), *task.parameters()])

    hist = JaggedTensor(values=values, lengths=lengths)
    loss = task(hist, None, labels=b["labels"], init_logits=logits, **ids, **{k: b[k] for k in leaves})
    out = task.interests(hist, None, b["aux_target"], user=b["user"], init_logits=logits)
    ref = sampled_softmax_loss(out.user_vec, b["aux_target"], b.get("aux_negatives"), b["labels"],
                               in_batch=sampler == "in_batch", **ids)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads(loss), grads(ref), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    task.eval()  # no label-1 row: the loss is 0 (the jagged float64 history once failed in fbgemm here)
    none = task(hist, None, labels=torch.zeros(6, dtype=dtype), **ids, **{k: b[k] for k in leaves})
    assert float(none) == 0
    task.train()
    # without init_logits the draw still covers every row (the RNG stream does not depend on labels)
    torch.manual_seed(7)
    a = task(hist, None, labels=b["labels"], **ids, **{k: b[k] for k in leaves})
    torch.manual_seed(7)
    drawn = task.routing.training_logits(hist)
    c = task(hist, None, labels=b["labels"], init_logits=drawn, **ids, **{k: b[k] for k in leaves})
    assert torch.equal(a, c)


def test_gradcheck_whole_task() -> None:
    """Finite differences vs autograd on the full loss, parameters included. With r = 1 the routing
    weights are the (constant) initial logits' softmax, so the loss is an ordinary differentiable
    function; for r > 1 the stop-gradient makes the analytic gradient differ from finite differences
    on purpose (checked against a detached reference in test_modules_capsule.py)."""
    torch.manual_seed(0)
    task = IaCNTask(IaCNConfig(routing_iters=1), item_dim=4, max_len=5, user_dim=3).double().eval()
    b = _batch()
    names = [n for n, _ in task.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in task.parameters()]
    inputs = [b[k].clone().requires_grad_(True) for k in ("aux_hist", "aux_target", "user", "aux_negatives")]

    def fn(hist, target, user, negs, *ps):
        return torch.func.functional_call(
            task, dict(zip(names, ps)), (hist, b["hist_lengths"], target, b["labels"], user, negs)
        )

    assert torch.autograd.gradcheck(fn, (*inputs, *params))


@pytest.mark.parametrize("sampler", ["uniform", "log_uniform", "in_batch"])
def test_label_zero_rows_do_not_matter(sampler: str) -> None:
    torch.manual_seed(0)
    task = IaCNTask(IaCNConfig(sampler=sampler), item_dim=4, max_len=5, user_dim=3).double()
    b = _batch()
    extra = {}
    if sampler == "in_batch":
        b.pop("aux_negatives")
    if sampler == "log_uniform":
        extra["neg_log_q"] = torch.full((6, 3), -2.0, dtype=F64)
    b2 = {k: v.clone() for k, v in b.items()}
    zero = b["labels"] == 0
    for key in ("aux_hist", "aux_target", "user", "aux_negatives"):
        if key in b2:
            b2[key][zero] = torch.randn_like(b2[key][zero]) * 5
    b2["hist_lengths"][zero] = 5
    for mode in ("eval", "train"):
        getattr(task, mode)()
        a = task(**b, **extra, generator=torch.Generator().manual_seed(1))
        c = task(**b2, **extra, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, c), mode


def test_no_positive_row_needs_no_negatives() -> None:
    """A batch without label-1 rows gets no negatives from the loader: the loss is a zero with zero
    gradients, as with negatives."""
    task = IaCNTask(IaCNConfig(), 4, 5, 3).double()
    b = {**_batch(), "labels": torch.zeros(6, dtype=F64)}
    b["aux_target"].requires_grad_(True)
    with_negatives = task(**b)
    without = task(**{**b, "aux_negatives": None})
    assert with_negatives.item() == 0.0 and without.item() == 0.0
    without.backward()
    assert torch.equal(b["aux_target"].grad, torch.zeros_like(b["aux_target"]))
    assert all(p.grad is not None and not p.grad.any() for p in task.parameters())


def test_sampler_arguments_are_checked() -> None:
    b = _batch()
    with pytest.raises(ValueError, match="needs aux_negatives"):
        IaCNTask(IaCNConfig(), 4, 5, 3).double()(**{**b, "aux_negatives": None})
    with pytest.raises(ValueError, match="neg_log_q"):
        IaCNTask(IaCNConfig(sampler="log_uniform"), 4, 5, 3).double()(**b)
    with pytest.raises(ValueError, match="in_batch"):
        IaCNTask(IaCNConfig(sampler="in_batch"), 4, 5, 3).double()(**b)
    no_profile = IaCNTask(IaCNConfig(user_profile_layer=False), 4, 5, user_dim=3)
    assert no_profile.routing.user_profile is None


def test_learns_planted_interests() -> None:
    """Users have two of four planted interest groups; their history mixes both and the target is
    from either. Training item embeddings + IaCN for a few steps must cut the loss well below the
    chance level log(S+1) that it starts from."""
    G, per_group, L, S, h, B = 4, 10, 10, 5, 8, 128
    n_items = G * per_group
    g = torch.Generator().manual_seed(0)

    def sample_batch():
        groups = torch.stack([torch.randperm(G, generator=g)[:2] for _ in range(B)])  # [B, 2]
        pick = torch.randint(0, 2, (B, L), generator=g)
        hist = groups.gather(1, pick) * per_group + torch.randint(0, per_group, (B, L), generator=g)
        lengths = torch.randint(3, L + 1, (B,), generator=g)
        tgt_group = groups[torch.arange(B), torch.randint(0, 2, (B,), generator=g)]
        target = tgt_group * per_group + torch.randint(0, per_group, (B,), generator=g)
        negs = torch.randint(0, n_items, (B, S), generator=g)
        labels = (torch.arange(B) % 4 != 0).float()  # a quarter label-0 rows
        return hist, lengths, target, negs, labels

    torch.manual_seed(0)
    emb = nn.Embedding(n_items, h)
    nn.init.normal_(emb.weight, std=0.1)
    task = IaCNTask(IaCNConfig(routing_iters=3, num_negatives=S), item_dim=h, max_len=L)
    opt = torch.optim.Adam([*emb.parameters(), *task.parameters()], lr=0.05)

    def loss_of(batch):
        hist, lengths, target, negs, labels = batch
        return task(
            emb(hist), lengths, emb(target), labels, None, emb(negs), target_ids=target, negative_ids=negs
        )

    held_out = sample_batch()
    with torch.no_grad():
        task.eval()
        before = loss_of(held_out).item()
    task.train()
    for _ in range(60):
        opt.zero_grad()
        loss_of(sample_batch()).backward()
        opt.step()
    with torch.no_grad():
        task.eval()
        after = loss_of(held_out).item()
    assert before == pytest.approx(math.log(S + 1), abs=0.2)
    # Floor ≈ 0.75: negatives from the target's own group (1 in 4) cannot be told apart from it.
    assert after < 0.55 * before, (before, after)


def test_interest_routing_is_shared_with_capsule_module() -> None:
    """The task's config reaches its routing (K_max, r, seed, the user-profile layer), and its
    interests are those of a standalone routing module with the same weights, followed by
    label-aware attention with the config's p."""
    for profile in (True, False):
        cfg = IaCNConfig(seed=5, k_max=2, routing_iters=1, pow_p=3.0, user_profile_layer=profile)
        task = IaCNTask(cfg, item_dim=4, max_len=5, user_dim=3).double().eval()
        r = task.routing
        assert (r.k_max, r.routing_iters, r.user_dim) == (2, 1, 3 if profile else None)
        alone = InterestCapsuleRouting(4, 5, k_max=2, routing_iters=1, user_dim=3 if profile else None,
                                       seed=5).double().eval()
        assert torch.equal(r.eval_logits, alone.eval_logits)
        alone.load_state_dict(r.state_dict())
        b = _batch()
        got = task.interests(b["aux_hist"], b["hist_lengths"], b["aux_target"], user=b["user"])
        ref = alone.route(b["aux_hist"], b["hist_lengths"], user=b["user"])
        torch.testing.assert_close(got.capsules, ref.capsules)
        assert torch.equal(got.capsule_mask, ref.capsule_mask)
        user_vec, attention = label_aware_attention(ref.capsules, ref.capsule_mask, b["aux_target"], 3.0)
        torch.testing.assert_close(got.user_vec, user_vec)
        torch.testing.assert_close(got.attention_weights, attention)
