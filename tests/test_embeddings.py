"""InterestAwareEmbeddings: table layout, dense views against hand-gathered rows, gradient scaling
through the real TorchRec EmbeddingCollection tables, input validation."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from iacn_torchrec.modules.embeddings import EmbeddedBatch, InterestAwareEmbeddings

NU, NI, NC, L = 7, 30, 5, 6


def make_kjt(B: int, seed: int, S: int = 0, neg_hist: bool = False, max_len: int = L,
             min_len: int = 0, neg_rows: torch.Tensor | None = None,
             ) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
    """A hand-built batch KJT in the loader's key order, plus its raw ids and lengths; ``neg_rows``
    ``[B]`` bool: the rows with S sampled negatives (default: all)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (B,), generator=g)
    N = int(lengths.sum())
    i2c = torch.randint(1, NC + 1, (NI + 1,), generator=g)
    ones = torch.ones(B, dtype=torch.long)
    raw = {"uid": torch.randint(1, NU + 1, (B,), generator=g),
           "item": torch.randint(1, NI + 1, (B,), generator=g)}
    raw["cate"] = i2c[raw["item"]]
    raw["hist_item"] = torch.randint(1, NI + 1, (N,), generator=g)
    raw["hist_cate"] = i2c[raw["hist_item"]]
    lens = {"uid": ones, "item": ones, "cate": ones, "hist_item": lengths, "hist_cate": lengths}
    if neg_hist:
        raw["neg_hist_item"] = torch.randint(1, NI + 1, (N,), generator=g)
        raw["neg_hist_cate"] = i2c[raw["neg_hist_item"]]
        lens.update(neg_hist_item=lengths, neg_hist_cate=lengths)
    if S:
        has = ones if neg_rows is None else neg_rows.long()
        raw["iacn_neg_item"] = torch.randint(1, NI + 1, (int(has.sum()) * S,), generator=g)
        raw["iacn_neg_cate"] = i2c[raw["iacn_neg_item"]]
        lens.update(iacn_neg_item=has * S, iacn_neg_cate=has * S)
    keys = list(raw)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat([raw[k] for k in keys]),
                                              torch.cat([lens[k] for k in keys]))
    raw["lengths"] = lengths
    return kjt, raw


def W(emb: InterestAwareEmbeddings, table: str) -> torch.Tensor:
    for ec in emb.collections().values():
        if table in ec.embeddings:
            return ec.embeddings[table].weight
    raise KeyError(table)


def padded_rows(table: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reference [B, L, d] by a per-sample loop."""
    out = torch.zeros(len(lengths), L, table.shape[1])
    start = 0
    for b, n in enumerate(lengths.tolist()):
        out[b, :n] = table[ids[start:start + n]]
        start += n
    return out


def test_tables_and_features():
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=3, user_dim=4, with_neg_hist=True,
                                  with_iacn_negatives=True)
    assert isinstance(emb.orig, EmbeddingCollection) and isinstance(emb.aux, EmbeddingCollection)
    assert emb.table_names() == ["uid", "item_orig", "cate_orig", "item_aux", "cate_aux"]
    cfg = {c.name: c for c in emb.table_configs()}
    assert cfg["item_orig"].feature_names == ["item", "hist_item", "neg_hist_item"]
    assert cfg["item_aux"].feature_names == ["item", "hist_item", "neg_hist_item", "iacn_neg_item"]
    assert cfg["cate_aux"].feature_names == ["cate", "hist_cate", "neg_hist_cate", "iacn_neg_cate"]
    assert cfg["item_aux"].num_embeddings == NI + 1 and cfg["cate_orig"].num_embeddings == NC + 1
    assert (emb.item_dim, emb.aux_item_dim) == (14, 6)

    plain = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=0, user_dim=4)
    assert plain.aux is None and plain.table_names() == ["uid", "item_orig", "cate_orig"]
    assert {c.name: c.feature_names for c in plain.table_configs()}["item_orig"] == ["item", "hist_item"]
    # a user table of another width moves to its own collection (TorchRec: one dim per EC)
    wide_user = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=3, user_dim=5)
    assert wide_user.user is not None and wide_user.table_names()[0] == "uid"


def test_init_is_seeded_and_orig_tables_do_not_depend_on_aux():
    torch.manual_seed(3)
    a = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=3, user_dim=4)
    torch.manual_seed(3)
    b = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=3, user_dim=4)
    torch.manual_seed(3)
    plain = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=0, user_dim=4)
    for t in a.table_names():
        assert torch.equal(W(a, t), W(b, t))
    for t in plain.table_names():
        assert torch.equal(W(a, t), W(plain, t))
    # TorchRec's default U(-sqrt(1/N), sqrt(1/N)) unless init_bound is given: inside the bound and
    # spread over it (a uniform's max near the bound, its SD bound/sqrt(3))
    def uniform(w: torch.Tensor, bound: float) -> None:
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert abs(w.std().item() - bound / 3**0.5) < 0.15 * bound / 3**0.5

    uniform(W(a, "item_orig"), (1 / (NI + 1)) ** 0.5)
    c = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=3, user_dim=4, init_bound=0.01)
    for t in c.table_names():
        uniform(W(c, t), 0.01)


@pytest.mark.parametrize("aux_dim", [0, 3])
def test_views_match_hand_gathered_rows(aux_dim):
    torch.manual_seed(0)
    B, S = 5, 4
    with_neg = aux_dim > 0
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=aux_dim, user_dim=4,
                                  with_neg_hist=True, with_iacn_negatives=with_neg)
    kjt, raw = make_kjt(B, seed=1, S=S if with_neg else 0, neg_hist=True)
    out = emb(kjt, delta=0.3)
    assert isinstance(out, EmbeddedBatch)
    n = raw["lengths"]

    def full(prefix: str) -> tuple[torch.Tensor, ...]:
        parts = (W(emb, "item_orig"), *([W(emb, "item_aux")] if aux_dim else []))
        cparts = (W(emb, "cate_orig"), *([W(emb, "cate_aux")] if aux_dim else []))
        return torch.cat(parts, 1), torch.cat(cparts, 1)

    item_t, cate_t = full("")
    D = 2 * (4 + aux_dim)
    assert out.target.shape == (B, D) and out.hist.shape == (B, L, D) and out.neg_hist.shape == (B, L, D)
    torch.testing.assert_close(out.user, W(emb, "uid")[raw["uid"]])
    torch.testing.assert_close(out.target, torch.cat([item_t[raw["item"]], cate_t[raw["cate"]]], 1))
    ref_hist = torch.cat([padded_rows(item_t, raw["hist_item"], n),
                          padded_rows(cate_t, raw["hist_cate"], n)], 2)
    torch.testing.assert_close(out.hist, ref_hist)
    ref_neg = torch.cat([padded_rows(item_t, raw["neg_hist_item"], n),
                         padded_rows(cate_t, raw["neg_hist_cate"], n)], 2)
    torch.testing.assert_close(out.neg_hist, ref_neg)
    torch.testing.assert_close(out.hist_lengths, n)
    assert out.hist_lengths.dtype == torch.int64
    assert torch.equal(out.target_ids, raw["item"])
    if aux_dim == 0:
        assert out.aux_target is None and out.aux_hist is None and out.aux_negatives is None
        return
    ia, ca = W(emb, "item_aux"), W(emb, "cate_aux")
    torch.testing.assert_close(out.aux_target, torch.cat([ia[raw["item"]], ca[raw["cate"]]], 1))
    torch.testing.assert_close(out.aux_hist, torch.cat([padded_rows(ia, raw["hist_item"], n),
                                                        padded_rows(ca, raw["hist_cate"], n)], 2))
    ref_negs = torch.cat([ia[raw["iacn_neg_item"]], ca[raw["iacn_neg_cate"]]], 1).view(B, S, 2 * aux_dim)
    torch.testing.assert_close(out.aux_negatives, ref_negs)
    assert torch.equal(out.negative_ids, raw["iacn_neg_item"].view(B, S))
    # eval / no-IaCN path skips the aux views
    lean = emb(kjt, delta=0.3, aux_views=False)
    assert lean.aux_hist is None and lean.aux_target is None
    torch.testing.assert_close(lean.hist, out.hist)


@pytest.mark.parametrize("delta", [0.0, 0.3, 1.0])
def test_gradient_split_on_tables(delta):
    """grad(E_aux) = δ·(grad through the main views) + (1-δ)·(grad through the aux views), for the
    item and the category tables and DIEN's negative behaviours; grad(E_orig) and the user table
    untouched by the aux views."""
    torch.manual_seed(0)
    B, S, o, a = 6, 3, 4, 3
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=o, aux_dim=a, user_dim=o, with_neg_hist=True,
                                  with_iacn_negatives=True)
    kjt, raw = make_kjt(B, seed=2, S=S, neg_hist=True)
    g = torch.Generator().manual_seed(5)
    D = 2 * (o + a)
    w_u, w_t = torch.randn(B, o, generator=g), torch.randn(B, D, generator=g)
    w_h, w_nh = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    v_t, v_h, v_n = torch.randn(B, 2 * a, generator=g), torch.randn(B, L, 2 * a, generator=g), \
        torch.randn(B, S, 2 * a, generator=g)
    out = emb(kjt, delta=delta)
    loss = (out.user * w_u).sum() + (out.target * w_t).sum() + (out.hist * w_h).sum() \
        + (out.neg_hist * w_nh).sum() + (out.aux_target * v_t).sum() + (out.aux_hist * v_h).sum() \
        + (out.aux_negatives * v_n).sum()
    loss.backward()

    # reference: scatter the upstream weights onto table rows by hand. The main views are
    # [item_orig (o) | item_aux (a) | cate_orig (o) | cate_aux (a)], the aux views [item_aux | cate_aux].
    mask = torch.arange(L).unsqueeze(0) < raw["lengths"].unsqueeze(1)
    main = {"": w_t, "hist_": w_h[mask], "neg_hist_": w_nh[mask]}  # id prefix -> upstream [rows, D]
    aux = {"": v_t, "hist_": v_h[mask], "iacn_neg_": v_n.reshape(B * S, 2 * a)}
    for f, (start, size) in (("item", (0, NI)), ("cate", (o + a, NC))):
        ref_orig, ref_aux = torch.zeros(size + 1, o), torch.zeros(size + 1, a)
        for prefix, w in main.items():
            ref_orig.index_add_(0, raw[prefix + f], w[:, start:start + o])
            ref_aux.index_add_(0, raw[prefix + f], delta * w[:, start + o:start + o + a])
        for prefix, v in aux.items():
            col = 0 if f == "item" else a
            ref_aux.index_add_(0, raw[prefix + f], (1 - delta) * v[:, col:col + a])
        torch.testing.assert_close(W(emb, f"{f}_orig").grad, ref_orig)
        torch.testing.assert_close(W(emb, f"{f}_aux").grad, ref_aux)
    ref_user = torch.zeros(NU + 1, o).index_add_(0, raw["uid"], w_u)
    torch.testing.assert_close(W(emb, "uid").grad, ref_user)


@pytest.mark.parametrize("neg_rows", ["all", "some"])
def test_detached_aux_views_are_the_graph_views_outside_the_graph(neg_rows):
    """What the IaCN worker reads: the forward's aux views (values), as leaves outside every graph;
    the row gradients, added to the tables by id, are the gradient the aux views' lookup backward
    gives (δ = 0: IaCN's whole share). Without aux views the negatives are not looked up."""
    torch.manual_seed(0)
    B, S, a = 6, 3, 3
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=a, user_dim=4, with_neg_hist=True,
                                  with_iacn_negatives=True)
    # "some": the loader's layout, negatives for the label-1 rows only
    some = torch.tensor([True, False, True, True, False, False]) if neg_rows == "some" else None
    kjt, _ = make_kjt(B, seed=2, S=S, neg_hist=True, neg_rows=some)
    assert emb.reads_aux_tables_directly()
    out = emb(kjt, delta=0.0)
    views = emb.detached_aux_views(kjt)
    torch.testing.assert_close(views.target, out.aux_target, rtol=0, atol=0)
    torch.testing.assert_close(views.hist_values, out.aux_hist_values, rtol=0, atol=0)
    torch.testing.assert_close(views.negatives, out.aux_negatives, rtol=0, atol=0)
    assert torch.equal(views.negative_ids, out.negative_ids) and torch.equal(views.target_ids, out.target_ids)
    assert (views.negative_rows is None) == (out.negative_rows is None)
    if views.negative_rows is not None:
        assert torch.equal(views.negative_rows, out.negative_rows)
    assert all(r.is_leaf and r.requires_grad and r.grad_fn is None for r in views.rows)
    assert views.target.grad_fn is not None  # a graph of the leaves only
    g = torch.Generator().manual_seed(5)
    v_t, v_h, v_n = (torch.randn(x.shape, generator=g)
                     for x in (views.target, views.hist_values, views.negatives))
    graph_loss = ((out.aux_target * v_t).sum() + (out.aux_hist_values * v_h).sum()
                  + (out.aux_negatives * v_n).sum())
    graph_loss.backward()
    row_loss = (views.target * v_t).sum() + (views.hist_values * v_h).sum() + (views.negatives * v_n).sum()
    row_grads = torch.autograd.grad(row_loss, views.rows)
    for table, ids, grad in zip(views.tables, views.ids, row_grads, strict=True):
        torch.testing.assert_close(torch.zeros_like(table).index_add_(0, ids, grad), table.grad)
    lean = emb(kjt, delta=0.3, aux_views=False)
    assert lean.negative_ids is None and lean.aux_negatives is None


def test_bad_input_errors():
    emb = InterestAwareEmbeddings(NU, NI, NC, 3, orig_dim=4, aux_dim=3, user_dim=4, with_neg_hist=True)
    kjt, _ = make_kjt(4, seed=0, max_len=3, neg_hist=False)
    with pytest.raises(KeyError, match="neg_hist_item"):
        emb(kjt)
    emb = InterestAwareEmbeddings(NU, NI, NC, 3, orig_dim=4, aux_dim=3, user_dim=4)
    long_kjt, _ = make_kjt(4, seed=0, max_len=6, min_len=5)
    with pytest.raises(ValueError, match="max_len=3"):
        emb(long_kjt)
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=3, user_dim=4, with_iacn_negatives=True)
    ones = torch.ones(2, dtype=torch.long)
    bad = KeyedJaggedTensor.from_lengths_sync(
        ["uid", "item", "cate", "hist_item", "hist_cate", "iacn_neg_item", "iacn_neg_cate"],
        torch.ones(2 * 3 + 2 * 2 + 2 * 4, dtype=torch.long),
        torch.cat([ones, ones, ones, ones, ones, torch.tensor([1, 3]), torch.tensor([1, 3])]),
    )
    with pytest.raises(ValueError, match="same length S"):
        emb(bad)
    # the loader's layout: S ids for some rows (its label-1 rows), none for the others
    def negatives(item_lengths, cate_lengths):
        n = int(sum(item_lengths) + sum(cate_lengths))
        return KeyedJaggedTensor.from_lengths_sync(
            ["uid", "item", "cate", "hist_item", "hist_cate", "iacn_neg_item", "iacn_neg_cate"],
            torch.arange(1, 2 * 5 + n + 1, dtype=torch.long) % 5 + 1,
            torch.cat([ones, ones, ones, ones, ones, torch.tensor(item_lengths), torch.tensor(cate_lengths)]),
        )
    out = emb(negatives([0, 3], [0, 3]))
    assert out.negative_ids.shape == (1, 3) and out.aux_negatives.shape == (1, 3, 6)
    assert torch.equal(out.negative_rows, torch.tensor([1]))
    assert emb(negatives([3, 3], [3, 3])).negative_rows is None  # every row: no row index needed
    with pytest.raises(ValueError, match="lengths of 'iacn_neg_item'"):
        emb(negatives([0, 3], [3, 0]))
    with pytest.raises(ValueError, match="with_iacn_negatives"):
        InterestAwareEmbeddings(NU, NI, NC, L, aux_dim=0, with_iacn_negatives=True)


def test_empty_history_rows_are_zero():
    torch.manual_seed(0)
    emb = InterestAwareEmbeddings(NU, NI, NC, L, orig_dim=4, aux_dim=3, user_dim=4)
    kjt, raw = make_kjt(8, seed=4, min_len=0)
    out = emb(kjt, delta=0.5)
    empty = raw["lengths"] == 0
    assert empty.any()  # the seed gives at least one empty history
    assert out.hist[empty].abs().sum() == 0 and out.aux_hist[empty].abs().sum() == 0



@pytest.mark.parametrize("lengths", [[0, 3, 1, 7], [0, 0]])
def test_pad_jagged_float64_equals_fbgemm_and_stays_in_the_graph(lengths):
    """float64, which fbgemm's jagged_to_padded_dense lacks, pads by a gather: the same values (a row
    past max_len truncated), and a graph even with no values at all (a zero gradient, not None)."""
    from iacn_torchrec.modules.embeddings import pad_jagged

    lengths = torch.tensor(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values = torch.randn(int(lengths.sum()), 3, dtype=torch.float64, requires_grad=True)
    padded = pad_jagged(values, offsets, 5)
    want = torch.ops.fbgemm.jagged_to_padded_dense(values.detach().float(), [offsets], [5], 0.0)
    assert padded.dtype == torch.float64 and torch.equal(padded.float(), want)
    (padded * torch.arange(1.0, 6.0, dtype=torch.float64).view(1, 5, 1)).sum().backward()
    position = torch.cat([torch.arange(1.0, n + 1) for n in lengths.tolist()] + [torch.zeros(0)])
    weight = torch.where(position <= 5, position, 0.0).double()  # a truncated row gets no gradient
    assert torch.equal(values.grad, weight.unsqueeze(1).expand(-1, 3))
