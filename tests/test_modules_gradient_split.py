"""The δ gradient split: identity forward, scaled backward, on lookup outputs (and a fused optimizer)."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iacn_torchrec.modules.gradient_split import scale_grad, scaled_backward


def _toy_losses(e_orig: torch.Tensor, e_aux_main: torch.Tensor, e_aux_iacn: torch.Tensor, w: torch.Tensor):
    """A toy main loss on E_orig ⊕ E_aux and a toy IaCN loss on E_aux (both non-linear)."""
    main = torch.tanh(torch.cat([e_orig, e_aux_main], dim=-1) @ w).pow(2).sum()
    iacn = torch.logsumexp(e_aux_iacn @ e_aux_iacn.t(), dim=1).sum()
    return main, iacn


@pytest.mark.parametrize("delta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("lam", [0.0, 1.0, 2.0])
def test_split_matches_separate_backward_passes(delta: float, lam: float) -> None:
    g = torch.Generator().manual_seed(0)
    table_orig = torch.randn(7, 3, generator=g, dtype=torch.float64)
    table_aux = torch.randn(7, 4, generator=g, dtype=torch.float64)
    w = torch.randn(7, 2, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 3, 3, 6, 1])  # a repeated id: its gradients must accumulate

    def run(d_main: float, d_iacn: float, lam_: float) -> tuple[torch.Tensor, torch.Tensor]:
        e_orig = table_orig.clone().requires_grad_(True)
        e_aux = table_aux.clone().requires_grad_(True)
        aux_out = e_aux[ids]  # the lookup output is what gets scaled, never the table
        main, iacn = _toy_losses(e_orig[ids], scale_grad(aux_out, d_main), scale_grad(aux_out, d_iacn), w)
        (main + lam_ * iacn).backward()
        return e_orig.grad, e_aux.grad

    _, g_main = run(1.0, 0.0, 0.0)  # ∂L_main/∂E_aux alone
    _, g_iacn = run(0.0, 1.0, 1.0)  # ∂L_IaCN/∂E_aux alone
    _, g_aux = run(delta, 1.0 - delta, lam)
    assert torch.allclose(g_aux, (1 - delta) * lam * g_iacn + delta * g_main, atol=1e-12)
    assert g_main.abs().sum() > 0 and g_iacn.abs().sum() > 0  # the toy losses really reach E_aux


def test_split_with_torchrec_fused_optimizer() -> None:
    """With the SGD update applied inside backward (TorchRec's fused optimizer hooks), the aux table
    moves by -lr · ((1-δ)·λ·g_IaCN + δ·g_main): the split needs nothing from the optimizer."""
    delta, lam, lr = 0.3, 2.0, 0.5
    torch.manual_seed(0)

    def make() -> EmbeddingBagCollection:
        torch.manual_seed(0)
        cfg = EmbeddingBagConfig(name="item_aux", embedding_dim=4, num_embeddings=10, feature_names=["item"])
        return EmbeddingBagCollection(tables=[cfg])

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["item"], values=torch.tensor([1, 4, 4, 7, 2]), lengths=torch.tensor([2, 1, 2])
    )
    w = torch.randn(4, 2)

    def losses(aux_main: torch.Tensor, aux_iacn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(aux_main @ w).pow(2).sum(), torch.logsumexp(aux_iacn @ aux_iacn.t(), 1).sum()

    # Reference gradients from separate passes on an ordinary module.
    grads = []
    for d_main, d_iacn, lam_ in ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)):
        ebc = make()
        out = ebc(kjt)["item"]
        main, iacn = losses(scale_grad(out, d_main), scale_grad(out, d_iacn))
        (main + lam_ * iacn).backward()
        grads.append(ebc.embedding_bags["item_aux"].weight.grad.clone())
    g_main, g_iacn = grads

    ebc = make()
    before = ebc.embedding_bags["item_aux"].weight.detach().clone()
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": lr})
    out = ebc(kjt)["item"]
    main, iacn = losses(scale_grad(out, delta), scale_grad(out, 1 - delta))
    (main + lam * iacn).backward()
    after = ebc.embedding_bags["item_aux"].weight.detach()
    expected = before - lr * ((1 - delta) * lam * g_iacn + delta * g_main)
    assert torch.allclose(after, expected, atol=1e-6)
    assert not torch.allclose(after, before)


def test_gradient_split_gradcheck() -> None:
    # Only scale 1 is a true derivative (the forward is the identity whatever the scale); the op
    # itself, not the scale_grad fast path, is checked, inside a non-linear function.
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.sin(scaled_backward(t, 1.0)) * t, (x,))
    assert torch.autograd.gradgradcheck(lambda t: torch.sin(scaled_backward(t, 1.0)) * t, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.3, -1.5, 0.0, 2.0, 0.7])
def test_backward_is_scaled(scale: float, dtype: torch.dtype) -> None:
    x = torch.randn(3, 4, dtype=dtype) * 100
    x[0, 0] = -0.0
    x.requires_grad_(True)
    y = scale_grad(x, scale)
    assert torch.equal(y, x)  # identity forward, to the bit (x - x.detach() is 0)
    g = torch.randn(3, 4, dtype=dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g * scale)  # exactly the incoming gradient times the scale
    # and through a non-linear use
    (gx,) = torch.autograd.grad((y * y.detach()).sum(), x)
    assert torch.allclose(gx, scale * x.detach())


def test_scale_zero_gives_zero_gradient_not_none() -> None:
    x = torch.randn(5, requires_grad=True)
    scale_grad(x, 0.0).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros(5))


def test_scale_one_is_a_no_op() -> None:
    x = torch.randn(5, requires_grad=True)
    assert scale_grad(x, 1.0) is x
    assert scale_grad(x, 0.5) is not x


@pytest.mark.parametrize("bad", [torch.tensor(0.5), float("nan"), float("inf"), "0.5"])
def test_bad_scale_is_rejected(bad) -> None:
    with pytest.raises((TypeError, ValueError), match="scale"):
        scale_grad(torch.randn(2), bad)
