"""The ``concat_lookup`` kernel (csrc/concat_lookup.cpp): the main model's item-side views from one
call, against InterestAwareEmbeddings' ATen path (per-table lookups, δ's lerp, a cat per view) for
values and table gradients; gradcheck; bad ids; which path runs when. Its ``accumulate_rows`` (IaCN's
row gradients into the tables, ``accumulate_row_grads``) against ``index_add_``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import count_calls
from test_embeddings import NC, NI, NU, L, W, make_kjt

import iacn_torchrec.modules.embeddings as embeddings_module
from iacn_torchrec.kernels import load_kernel
from iacn_torchrec.modules.embeddings import InterestAwareEmbeddings, _ConcatLookup

pytestmark = pytest.mark.skipif(load_kernel("concat_lookup") is None, reason="the kernel could not be built")

TABLES = ("uid", "item_orig", "cate_orig", "item_aux", "cate_aux")


def _embeddings(aux_dim: int, dtype: torch.dtype, neg_hist: bool = False, user_dim: int = 4):
    torch.manual_seed(0)
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=aux_dim, user_dim=user_dim,
                                  with_neg_hist=neg_hist)
    return emb.to(dtype)


def _run(emb, kjt, delta, weights=None):
    """Forward without aux views, a weighted sum of every main view backward; (views, grads)."""
    emb.zero_grad(set_to_none=True)
    out = emb(kjt, delta, aux_views=False)
    views = [out.user, out.target, out.hist_values] + ([out.neg_hist_values] if emb.with_neg_hist else [])
    if weights is None:
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(v.shape, generator=g, dtype=v.dtype) for v in views]
    sum((v * w).sum() for v, w in zip(views, weights)).backward()
    grads = {t: W(emb, t).grad for t in TABLES if t in emb.table_names()}
    return [v.detach() for v in views], grads, weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aux_dim, delta, neg_hist, user_dim", [
    (0, 1.0, False, 4),  # the plain model
    (3, 0.3, False, 4),
    (3, 0.0, True, 4),  # DIEN's negative history; δ = 0: no main-model gradient into E_aux
    (2, 1.0, False, 6),  # uid in its own collection
])
def test_kernel_equals_the_aten_path(monkeypatch, dtype, aux_dim, delta, neg_hist, user_dim):
    emb = _embeddings(aux_dim, dtype, neg_hist, user_dim)
    kjt, _ = make_kjt(9, seed=3, neg_hist=neg_hist)  # repeated ids: rows accumulate
    calls = count_calls(monkeypatch, _ConcatLookup)
    views, grads, weights = _run(emb, kjt, delta)
    assert len(calls) == 1
    monkeypatch.setattr(embeddings_module, "load_kernel", lambda name: None)
    ref_views, ref_grads, _ = _run(emb, kjt, delta, weights)
    assert len(calls) == 1  # the ATen path
    for v, r in zip(views, ref_views, strict=True):
        assert torch.equal(v, r)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for name, g in ref_grads.items():
        if name.endswith("_aux") and delta == 0.0:
            assert not g.any() and not grads[name].any()
        else:
            assert g.abs().sum() > 0
        torch.testing.assert_close(grads[name], g, **tol)


def test_a_non_contiguous_table_takes_the_aten_path_with_the_same_values(monkeypatch):
    """A table whose weight is strided (same values, column-major storage: a tied or assigned
    parameter) is not read by the kernel's row copies, which assume [rows, d] storage: the ATen path
    runs and gives the values and gradients of the contiguous table."""
    emb = _embeddings(3, torch.float64)
    kjt, _ = make_kjt(9, seed=3)
    views, grads, weights = _run(emb, kjt, 0.5)
    table = emb.orig.embeddings["item_orig"]
    table.weight = torch.nn.Parameter(table.weight.detach().t().contiguous().t())
    assert not table.weight.is_contiguous()
    calls = count_calls(monkeypatch, _ConcatLookup)
    strided_views, strided_grads, _ = _run(emb, kjt, 0.5, weights)
    assert len(calls) == 0
    for v, r in zip(strided_views, views, strict=True):
        torch.testing.assert_close(v, r, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(strided_grads[name], g, rtol=1e-12, atol=1e-12)


def test_the_kernel_refuses_strided_tables_and_ids():
    ext = load_kernel("concat_lookup")
    table = torch.randn(6, 3, dtype=torch.float64)
    ids = [torch.tensor([1, 2]), torch.tensor([0, 3])]
    with pytest.raises(RuntimeError, match="contiguous"):
        _ConcatLookup.apply(ext, [table.t().contiguous().t()], ids, [1.0], [0])
    with pytest.raises(RuntimeError, match="int64"):
        _ConcatLookup.apply(ext, [table], [torch.tensor([1, 2, 3, 4])[::2], ids[1]], [1.0], [0])


def test_kernel_gradcheck_with_repeated_ids():
    ext = load_kernel("concat_lookup")
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(6, d, dtype=torch.float64, generator=g, requires_grad=True) for d in (2, 3, 1)]
    ids = [torch.tensor([1, 1, 5, 0]), torch.tensor([2, 3, 3, 0]), torch.tensor([4, 4]), torch.tensor([0, 5])]

    def f(*ts):
        return tuple(_ConcatLookup.apply(ext, list(ts), ids, [1.0, 1.0, 1.0], [0, 0, 1]))

    assert torch.autograd.gradcheck(f, tuple(tables))
    # the per-table factors scale the table's gradient only
    out = _ConcatLookup.apply(ext, tables, ids, [1.0, 0.25, 1.0], [0, 0, 1])
    ref = _ConcatLookup.apply(ext, tables, ids, [1.0, 1.0, 1.0], [0, 0, 1])
    scaled = torch.autograd.grad(sum(o.sum() for o in out), tables)
    plain = torch.autograd.grad(sum(o.sum() for o in ref), tables)
    torch.testing.assert_close(scaled[1], 0.25 * plain[1])
    torch.testing.assert_close(scaled[0], plain[0])
    assert torch.equal(out[0], torch.cat([tables[0][ids[0]], tables[1][ids[0]], tables[2][ids[1]]], 1))


def test_out_of_range_ids_and_mismatched_views_are_refused():
    ext = load_kernel("concat_lookup")
    t = [torch.zeros(4, 2), torch.zeros(3, 2)]
    with pytest.raises(IndexError, match=r"id 3 is out of range for a table of 3 rows \(view 0, table 1\)"):
        _ConcatLookup.apply(ext, t, [torch.tensor([0, 1]), torch.tensor([2, 3])], [1.0, 1.0], [0, 1])
    with pytest.raises(IndexError, match="id -1 is out of range"):
        _ConcatLookup.apply(ext, t, [torch.tensor([-1]), torch.tensor([0])], [1.0, 1.0], [0, 1])
    with pytest.raises(RuntimeError, match="view 0 has 2 item ids and 1 category ids"):
        _ConcatLookup.apply(ext, t, [torch.tensor([0, 1]), torch.tensor([2])], [1.0, 1.0], [0, 1])


def test_which_path_runs(monkeypatch):
    """The kernel builds the main views whenever no aux views are asked for (the plain model, the
    IaCN worker's main thread, evaluation); the serial IaCN path and IACN_FUSED_KERNEL=0 take the
    ATen ops. Evaluation without autograd gives the same values; a frozen table gets no gradient."""
    emb = _embeddings(3, torch.float32)
    kjt, _ = make_kjt(6, seed=4, S=2)
    calls = count_calls(monkeypatch, _ConcatLookup)
    emb(kjt, 0.3, aux_views=True)
    assert not calls
    with_grad = emb(kjt, 0.3, aux_views=False)
    assert len(calls) == 1 and with_grad.target.requires_grad
    with torch.no_grad():
        assert torch.equal(emb(kjt, 0.3, aux_views=False).hist_values, with_grad.hist_values)
    W(emb, "cate_orig").requires_grad_(False)
    emb.zero_grad(set_to_none=True)
    emb(kjt, 0.3, aux_views=False).target.sum().backward()
    assert W(emb, "cate_orig").grad is None and W(emb, "item_aux").grad is not None
    monkeypatch.setenv("IACN_FUSED_KERNEL", "0")
    n = len(calls)
    emb(kjt, 0.3, aux_views=False)
    assert len(calls) == n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, -0.25])
def test_accumulate_row_grads_equals_index_add(monkeypatch, dtype, scale):
    """IaCN's row gradients into the tables' ``.grad``: the kernel against ``index_add_`` (repeated
    ids accumulate; a table without ``.grad`` gets one; a missing kernel takes the ATen path)."""
    g = torch.Generator().manual_seed(5)
    tables = [torch.zeros(13, 3, dtype=dtype, requires_grad=True), torch.zeros(7, 2, dtype=dtype,
                                                                                requires_grad=True)]
    tables[0].grad = torch.randn(13, 3, generator=g, dtype=dtype)
    ids = [torch.tensor([0, 4, 4, 12, 4, 1]), torch.tensor([6, 6, 0])]
    rows = [torch.randn(6, 3, generator=g, dtype=dtype), torch.randn(3, 2, generator=g, dtype=dtype)]
    want = [tables[0].grad.clone().index_add_(0, ids[0], rows[0] * scale),
            torch.zeros(7, 2, dtype=dtype).index_add_(0, ids[1], rows[1] * scale)]
    ext, calls = load_kernel("concat_lookup"), []
    counting = SimpleNamespace(accumulate_rows=lambda *a: calls.append(1) or ext.accumulate_rows(*a))
    monkeypatch.setattr(embeddings_module, "load_kernel", lambda name: counting)
    embeddings_module.accumulate_row_grads(tables, ids, rows, scale)
    assert calls == [1]  # one call for both tables
    for t, w in zip(tables, want):
        torch.testing.assert_close(t.grad, w, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    # the ATen path (no kernel) gives the same
    monkeypatch.setattr(embeddings_module, "load_kernel", lambda name: None)
    for t in tables:
        t.grad = None
    embeddings_module.accumulate_row_grads(tables, ids, rows, scale)
    for t, i, r in zip(tables, ids, rows):
        torch.testing.assert_close(t.grad, torch.zeros_like(t).index_add_(0, i, r * scale))


def test_accumulate_row_grads_refuses_bad_ids():
    t = torch.zeros(4, 2, requires_grad=True)
    with pytest.raises(IndexError, match="out of range for a table of 4 rows"):
        embeddings_module.accumulate_row_grads([t], [torch.tensor([1, 4])], [torch.ones(2, 2)])
    with pytest.raises(RuntimeError, match="accumulate_rows: table 0"):
        load_kernel("concat_lookup").accumulate_rows([t.grad], [torch.tensor([1])], [torch.ones(2, 2)], 1.0)
