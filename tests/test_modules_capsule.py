"""MIND B2I routing vs a per-user, per-item reference written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from iacn_torchrec.modules.capsule import InterestCapsuleRouting, squash

H = 4
L = 8  # K_max = ceil(log2 8) = 3
LENGTHS = [1, 2, 3, 5, 8, 0]  # K_u = 1, 1, 2, 3, 3, 1


def ref_squash(z: torch.Tensor) -> torch.Tensor:
    n2 = (z * z).sum()
    if float(n2) == 0.0:
        return z * 0.0
    return n2 / (1.0 + n2) * z / torch.sqrt(n2)


def ref_k(n: int, k_max: int) -> int:
    return min(max(math.ceil(math.log2(n)) if n > 0 else 1, 1), k_max)


def ref_route(hist, lengths, S, init_logits, k_max, iters, user=None, mlp=None, detach=True):
    """Plain loops over users, items and capsules; returns (capsules [B, K_max, h], weights [B, K_max, L])."""
    B, Lx, h = hist.shape
    caps_out, w_out = [], []
    for b in range(B):
        n = int(lengths[b])
        K = ref_k(n, k_max)
        sc = [S @ hist[b, i] for i in range(n)]  # S c_i
        logit = [[init_logits[b, j, i] for i in range(n)] for j in range(K)]
        for it in range(iters):
            w = [[None] * n for _ in range(K)]
            for i in range(n):
                denom = sum(torch.exp(logit[jj][i]) for jj in range(K))
                for j in range(K):
                    w[j][i] = torch.exp(logit[j][i]) / denom
            u = []
            for j in range(K):
                z = hist.new_zeros(h)
                for i in range(n):
                    z = z + w[j][i] * sc[i]
                u.append(ref_squash(z))
            if it + 1 < iters:
                for j in range(K):
                    for i in range(n):
                        delta = torch.dot(u[j], sc[i])
                        logit[j][i] = logit[j][i] + (delta.detach() if detach else delta)
        if mlp is not None:
            lin1, lin2 = mlp
            u = [
                lin2.weight @ torch.relu(lin1.weight @ torch.cat([uj, user[b]]) + lin1.bias) + lin2.bias
                for uj in u
            ]
        caps = torch.stack(u + [hist.new_zeros(h)] * (k_max - K))
        wt = hist.new_zeros(k_max, Lx)
        for j in range(K):
            for i in range(n):
                wt[j, i] = w[j][i]
        caps_out.append(caps)
        w_out.append(wt)
    return torch.stack(caps_out), torch.stack(w_out)


def _inputs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(len(LENGTHS), L, H, generator=g, dtype=dtype)
    lengths = torch.tensor(LENGTHS)
    return hist, lengths


def _module(user_dim=None, k_max=None, iters=3) -> InterestCapsuleRouting:
    torch.manual_seed(0)
    m = InterestCapsuleRouting(
        item_dim=H, max_len=L, k_max=k_max, routing_iters=iters, user_dim=user_dim, seed=3
    )
    with torch.no_grad():  # a larger S than the default init, so that routing moves the logits a lot
        m.bilinear.mul_(3.0)
    return m.double().eval()


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("k_max", [None, 2])
def test_routing_matches_reference(iters: int, k_max: int | None) -> None:
    m = _module(k_max=k_max, iters=iters)
    hist, lengths = _inputs()
    out = m.route(hist, lengths)
    init = m.eval_logits.expand(len(LENGTHS), -1, -1)
    ref_caps, ref_w = ref_route(hist, lengths, m.bilinear, init, m.k_max, iters)
    assert m.k_max == (k_max or 3)
    assert torch.allclose(out.capsules, ref_caps, atol=1e-10)
    assert torch.allclose(out.routing_weights, ref_w, atol=1e-12)
    ks = [ref_k(n, m.k_max) for n in LENGTHS]
    assert out.capsule_mask.tolist() == [[j < k for j in range(m.k_max)] for k in ks]
    # Dead capsules: no weight, zero vectors; real items' weights over live capsules sum to 1.
    assert torch.all(out.routing_weights[~out.capsule_mask] == 0)
    assert torch.all(out.capsules[~out.capsule_mask] == 0)
    item_mask = torch.arange(L) < lengths[:, None]
    sums = out.routing_weights.sum(1)
    assert torch.allclose(sums[item_mask], torch.ones(int(item_mask.sum()), dtype=sums.dtype))
    assert torch.all(sums[~item_mask] == 0)
    # The capsules of a multi-interest user differ (the eval logits are not all equal).
    assert not torch.allclose(out.capsules[3, 0], out.capsules[3, 1])


def test_routing_with_user_profile_layer_matches_reference() -> None:
    m = _module(user_dim=3)
    hist, lengths = _inputs()
    user = torch.randn(len(LENGTHS), 3, dtype=torch.float64)
    caps, mask = m(hist, lengths, user=user)
    init = m.eval_logits.expand(len(LENGTHS), -1, -1)
    ref_caps, _ = ref_route(
        hist, lengths, m.bilinear, init, m.k_max, 3, user=user, mlp=(m.user_profile[0], m.user_profile[2])
    )
    assert torch.allclose(caps, ref_caps, atol=1e-10)
    assert torch.all(caps[~mask] == 0)
    with pytest.raises(ValueError, match="user"):
        m(hist, lengths)


def test_random_init_in_training_matches_reference() -> None:
    m = _module().train()
    hist, lengths = _inputs()
    out1 = m.route(hist, lengths, generator=torch.Generator().manual_seed(7))
    out2 = m.route(hist, lengths, generator=torch.Generator().manual_seed(7))
    out3 = m.route(hist, lengths, generator=torch.Generator().manual_seed(8))
    assert torch.equal(out1.capsules, out2.capsules)  # seeded → reproducible
    assert not torch.allclose(out1.capsules, out3.capsules)  # and really random
    init = torch.randn(
        len(LENGTHS), m.k_max, L, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    ref_caps, _ = ref_route(hist, lengths, m.bilinear, init, m.k_max, 3)
    assert torch.allclose(out1.capsules, ref_caps, atol=1e-10)
    # training_logits is that draw, for a caller that fixes when it happens (padded: L; jagged: L_max)
    drawn = m.training_logits(hist, generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, init)
    assert torch.equal(m.route(hist, lengths, init_logits=drawn).capsules, out1.capsules)
    values = torch.cat([hist[b, : int(n)] for b, n in enumerate(lengths)]).float()
    jagged = m.float().training_logits(JaggedTensor(values=values, lengths=lengths))
    assert jagged.shape == (len(LENGTHS), m.k_max, m.max_len) and jagged.dtype == torch.float32


def test_eval_is_deterministic_and_uses_the_seeded_buffer() -> None:
    m = _module()
    hist, lengths = _inputs()
    a = m.route(hist, lengths)
    torch.manual_seed(123)  # the global RNG must not matter in eval
    b = m.route(hist, lengths)
    assert torch.equal(a.capsules, b.capsules)
    other = InterestCapsuleRouting(item_dim=H, max_len=L, seed=3)
    assert torch.equal(other.eval_logits, m.eval_logits.float())  # a pure function of the seed
    c = m.route(hist, lengths, init_logits=m.eval_logits)
    assert torch.equal(a.capsules, c.capsules)


def test_padding_has_no_effect() -> None:
    m = _module(user_dim=2)
    hist, lengths = _inputs()
    user = torch.randn(len(LENGTHS), 2, dtype=torch.float64)
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    garbage = hist.clone()
    garbage[pad] = torch.randn(int(pad.sum()), H, dtype=torch.float64) * 1e3
    garbage[0, 5] = 1e300  # any finite value
    outs, grads = [], []
    for x in (hist, garbage):
        x = x.clone().requires_grad_(True)
        out = m.route(x, lengths, user=user)
        out.capsules.pow(2).sum().backward()
        outs.append(out)
        grads.append(x.grad)
    assert torch.equal(outs[0].capsules, outs[1].capsules)
    assert torch.equal(outs[0].routing_weights, outs[1].routing_weights)
    assert torch.all(grads[1][pad] == 0) and torch.all(grads[0][pad] == 0)
    assert torch.isfinite(grads[1]).all()
    assert torch.equal(grads[0], grads[1])
    # A shorter padded tensor (L < L_max) is accepted and gives the same capsules.
    short = m.route(hist[:, :5], lengths.clamp(max=5), user=user)
    assert short.capsules.shape == (len(LENGTHS), 3, H)
    fits = lengths <= 5  # rows the slice did not cut: the same routing on the same items
    assert fits.any() and not fits.all()
    torch.testing.assert_close(short.capsules[fits], outs[0].capsules[fits], rtol=0, atol=1e-12)


def test_stop_gradient_matches_detached_reference() -> None:
    m = _module()
    hist, lengths = _inputs()
    probe = torch.randn(len(LENGTHS), m.k_max, H, dtype=torch.float64)
    init = m.eval_logits.expand(len(LENGTHS), -1, -1)

    def grads(fn):
        x = hist.clone().requires_grad_(True)
        s = m.bilinear.detach().clone().requires_grad_(True)
        (fn(x, s) * probe).sum().backward()
        return x.grad, s.grad

    def ours(x, s):  # the module with its bilinear map replaced by the leaf s
        return torch.func.functional_call(m, {"bilinear": s}, (x, lengths))[0]

    g_ours = grads(ours)
    g_detached = grads(lambda x, s: ref_route(x, lengths, s, init, m.k_max, 3, detach=True)[0])
    g_full = grads(lambda x, s: ref_route(x, lengths, s, init, m.k_max, 3, detach=False)[0])
    for a, b, c in zip(g_ours, g_detached, g_full):
        assert torch.allclose(a, b, atol=1e-10)
        assert not torch.allclose(a, c, atol=1e-4)  # the stop-gradient really changes the gradient


def test_jagged_input_equals_padded() -> None:
    m = _module().float()  # fbgemm's jagged_to_padded_dense has no float64 CPU kernel
    hist, lengths = _inputs(dtype=torch.float32)
    values = torch.cat([hist[b, : int(n)] for b, n in enumerate(lengths)])
    jt = JaggedTensor(values=values, lengths=lengths)
    a = m(hist, lengths)
    b = m(jt)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.equal(a[1], b[1])
    # training mode, the same drawn logits: equal capsules and gradients (values and S)
    m.train()
    init = m.training_logits(jt, torch.Generator().manual_seed(4))
    assert init.shape == (len(LENGTHS), m.k_max, L)
    real = torch.arange(L) < lengths.unsqueeze(1)  # [B, L] the real positions of the padded form

    def run(jagged: bool):
        x = (values if jagged else hist).clone().requires_grad_()
        out = m.route(JaggedTensor(values=x, lengths=lengths), None, init_logits=init) if jagged \
            else m.route(x, lengths, init_logits=init)
        m.zero_grad()
        (out.capsules * torch.linspace(-1, 1, out.capsules.numel()).view_as(out.capsules)).sum().backward()
        return out.capsules.detach(), x.grad if jagged else x.grad[real], m.bilinear.grad.clone()

    for p, j in zip(run(False), run(True)):
        torch.testing.assert_close(p, j, atol=1e-5, rtol=1e-5)
    ca = run(False)[0]
    assert not torch.allclose(ca, a[0], atol=1e-3)  # the drawn logits were used, not the eval ones
    too_long = JaggedTensor(values=torch.zeros(L + 1, H), lengths=torch.tensor([L + 1]))
    with pytest.raises(ValueError, match=f"a history of length {L + 1} exceeds max_len={L}"):
        m(too_long)


def test_num_interests() -> None:
    m = InterestCapsuleRouting(item_dim=2, max_len=20)
    assert m.k_max == 5
    n = torch.arange(0, 41)
    expected = [ref_k(int(x), 5) for x in n]
    assert m.num_interests(n).tolist() == expected
    assert InterestCapsuleRouting(item_dim=2, max_len=16).k_max == 4
    assert InterestCapsuleRouting(item_dim=2, max_len=1).k_max == 1


def test_bad_inputs() -> None:
    m = InterestCapsuleRouting(item_dim=H, max_len=L)
    with pytest.raises(ValueError, match="exceeds max_len"):
        m(torch.zeros(2, L + 1, H), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"hist must be \[B, L, 4\]"):
        m(torch.zeros(2, L, H + 1), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.zeros(2, L, H), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="k_max"):
        InterestCapsuleRouting(item_dim=H, max_len=L, k_max=0)


def test_squash() -> None:
    z = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
    out = squash(z)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    s = (
        torch.randn(4, 6, dtype=torch.float64)
        * torch.tensor([1e-3, 0.5, 3.0, 100.0], dtype=torch.float64)[:, None]
    )
    out = squash(s)
    for row, ref in zip(out, s):
        assert torch.allclose(row, ref_squash(ref), rtol=1e-6)
    assert torch.all(out.norm(dim=-1) < 1)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(squash, (x,))


def test_squash_in_half_precision_keeps_large_capsules() -> None:
    """|s|² overflows float16 from |s| ≈ 256: squash then gave 0 (norm² inf) or NaN (norm inf); it
    computes in float32 for half inputs and returns their dtype."""
    for dtype in (torch.float16, torch.bfloat16):
        for value in (200.0, 3e4):
            s = torch.full((2, 4), value, dtype=dtype)
            out = squash(s)
            assert out.dtype == dtype
            ref = ref_squash(s[0].double())
            assert torch.allclose(out[0].double(), ref, rtol=1e-2), (dtype, value, out[0])


def test_lengths_beyond_the_padded_width_count_as_the_width():
    """Lengths are clamped to [0, L] (the padded width), for K_u too: n = 8 over a width of 2 is
    K_u = ceil(log2 2) = 1 capsule, not ceil(log2 8) = 3."""
    torch.manual_seed(0)
    m = InterestCapsuleRouting(item_dim=4, max_len=8, seed=3).double().eval()
    hist = torch.randn(3, 2, 4, dtype=torch.float64)
    over, clamped = m.route(hist, torch.tensor([8, 5, 2])), m.route(hist, torch.tensor([2, 2, 2]))
    assert clamped.capsule_mask.sum(1).tolist() == [1, 1, 1]
    assert torch.equal(over.capsule_mask, clamped.capsule_mask)
    assert torch.equal(over.capsules, clamped.capsules)
    assert torch.equal(over.routing_weights, clamped.routing_weights)
