"""Explaining interests: on synthetic users with two planted, disjoint interest groups, a briefly
trained DIN+IaCN's capsules separate the groups (and the untrained model's do much less)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import prepare_planted

from iacn_torchrec.data.synthetic import item_group_of, make_planted_interests
from iacn_torchrec.distributed.setup import build_model_from_config
from iacn_torchrec.errors import UserError
from iacn_torchrec.serving import explain
from iacn_torchrec.serving.explain import capsule_entropy, explain_samples, explain_user, interest_summary
from iacn_torchrec.serving.export import load_run
from iacn_torchrec.train.config import TrainConfig
from iacn_torchrec.train.loop import train


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-explain")
    p, prep = prepare_planted(root, num_users=400, seed=0, num_groups=4, cates_per_group=2)
    cfg = TrainConfig.from_dict(
        {
            "data": {"path": str(prep), "batch_size": 64},
            "model": {"name": "din"},
            "iacn": {"enabled": True},
            "optim": {"lr": 3e-3},
            "epochs": 2,
            "out": str(root / "run"),
            "progress": False,
            "resume": False,
            "threads": 2,
            "seed": 0,
        }
    )
    train(cfg)
    return p, load_run(root / "run")


def _separation(model, run) -> dict[str, float]:
    """Group purity of capsules, P(same capsule | same / different group) over item pairs, and how
    often the target's attention picks the capsule whose majority group is the target's group."""
    ds = run.ds
    s = ds.split("test")
    keep = np.flatnonzero(np.asarray(s.label) == 1)
    grp = np.array([-1] + [item_group_of(x) for x in ds.vocab("item")])
    off = np.asarray(s.hist_offsets)
    hi = np.concatenate([s.hist_item[off[r] : off[r + 1]] for r in keep])
    hc = np.concatenate([s.hist_cate[off[r] : off[r + 1]] for r in keep])
    exs = explain_samples(
        model,
        np.asarray(s.uid)[keep],
        hi,
        hc,
        np.diff(off)[keep],
        np.asarray(s.item)[keep],
        np.asarray(s.cate)[keep],
    )
    pure = total = 0
    same = np.zeros(2)
    diff = np.zeros(2)
    match = np.zeros(2)
    for ex in exs:
        g = grp[ex.hist_item]
        a = ex.assignment
        for j in range(ex.num_interests):
            members = g[a == j]
            if members.size:
                pure += np.bincount(members).max()
                total += members.size
        iu = np.triu_indices(len(a), 1)
        sg = (g[:, None] == g[None])[iu]
        sc = (a[:, None] == a[None])[iu]
        same += [sc[sg].sum(), sg.sum()]
        diff += [sc[~sg].sum(), (~sg).sum()]
        members = g[a == ex.matched]
        if ex.num_interests > 1 and members.size:
            match += [np.bincount(members).argmax() == grp[ex.target], 1]
    return {
        "purity": pure / total,
        "same": same[0] / same[1],
        "diff": diff[0] / diff[1],
        "matched": match[0] / match[1],
    }


def test_explanation_numbers_follow_the_model(planted):
    """For test users: each history item's routing weights sum to 1 over K_u = clamp(ceil(log2 n),
    1, K_max) capsules, the attention over them to 1, and the score is the model's own prediction on
    the user's held-out test row."""
    import math

    from iacn_torchrec.data.loader import BatchLoader

    _, run = planted
    ds, s = run.ds, run.ds.split("test")
    tl = run.test_loader
    loader = BatchLoader(ds, "test", batch_size=len(s.label), with_neg_hist=tl.with_neg_hist,
                         iacn_negatives=tl.iacn_negatives)
    with torch.no_grad():
        probs = torch.cat([run.model.predict(b) for b in loader]).numpy()
    k_max = run.model.iacn.routing.k_max
    users = ds.vocab("uid")
    rows = [r for r in range(len(s.label)) if s.label[r] == 1][:12]
    for r in rows:
        ex = explain_user(run, users[int(s.uid[r]) - 1], target="heldout")
        n = int(s.hist_offsets[r + 1] - s.hist_offsets[r])
        assert ex.num_interests == min(max(math.ceil(math.log2(n)) if n > 0 else 1, 1), k_max), (r, n)
        np.testing.assert_allclose(ex.routing.sum(0), np.ones(n), atol=1e-5)
        assert ex.attention is not None and abs(float(ex.attention.sum()) - 1) < 1e-5
        assert ex.score == pytest.approx(float(probs[r]), abs=1e-5)


def test_explanation_separates_planted_interests(planted):
    _, run = planted
    trained = _separation(run.model, run)
    torch.manual_seed(run.config.seed)
    untrained = _separation(build_model_from_config(run.config, run.ds).eval(), run)
    # measured (2 epochs, seed 0): purity 0.89 vs 0.78 untrained; P(same capsule | same group) 0.40 vs
    # 0.11 for different groups; the target attends to the capsule of its own group 95% of the time.
    assert trained["purity"] >= 0.84, trained
    assert trained["purity"] >= untrained["purity"] + 0.05, (trained, untrained)
    assert trained["same"] - trained["diff"] >= 0.2, trained
    assert trained["matched"] >= 0.85, trained
    assert trained["matched"] >= untrained["matched"] + 0.2, (trained, untrained)


def test_explain_user_text_and_figure(planted, tmp_path, capsys):
    p, run = planted
    user = next(u for u in sorted(p.user_groups))
    ex = explain_user(run, user, "heldout")
    n = len(ex.hist_item)
    assert ex.routing.shape == (ex.num_interests, n)
    np.testing.assert_allclose(ex.routing.sum(0), 1.0, atol=1e-5)  # each item's weights over capsules
    np.testing.assert_allclose(ex.attention.sum(), 1.0, atol=1e-5)
    assert ex.num_interests == max(1, min(int(np.ceil(np.log2(n))), run.model.iacn.k_max))
    for cats in ex.capsule_categories:  # shares are a distribution over the history's categories
        assert sum(s for _, s in cats) == pytest.approx(1.0)
        assert {c for c, _ in cats} <= set(ex.hist_cate.tolist())

    args = argparse.Namespace(
        run=str(run.path),
        data=None,
        user=user,
        target="heldout",
        plot=str(tmp_path / "u.png"),
        summary=False,
        md=None,
        example_user=None,
        limit_users=None,
        seed=None,
        threads=2,
    )
    assert explain.run(args) == 0
    out = capsys.readouterr().out
    assert f"user {user}" in out and "interest 1" in out and "matched interest" in out
    first_item = run.ds.vocab("item")[int(ex.hist_item[0]) - 1]
    assert first_item in out and first_item[: first_item.index("i")] in out  # raw item id and its category
    # the history table: a header, then one numbered row per behaviour naming its item and interest
    lines = out.splitlines()
    head = lines.index("history (oldest first):") + 1
    assert lines[head].split() == ["#", "item", "category", "interest"]
    for t in range(n):
        row = lines[head + 1 + t].split()
        assert row[0] == str(t + 1) and row[-1] == str(int(ex.assignment[t]) + 1)
        assert row[1] == run.ds.vocab("item")[int(ex.hist_item[t]) - 1]
    assert (tmp_path / "u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    args.user, args.plot = "nobody", None
    assert explain.run(args) == 2
    assert "unknown user id 'nobody'" in capsys.readouterr().err


def test_an_unwritable_plot_path_is_refused_before_the_work(planted, tmp_path, capsys):
    """--plot into a missing folder (or under a file) fails at once, naming the option, not with a
    temporary file's name after the whole explanation was computed and printed."""
    p, run = planted
    (tmp_path / "afile").write_text("")
    args = argparse.Namespace(run=str(run.path), data=None, user=sorted(p.user_groups)[0], target="heldout",
                              plot=str(tmp_path / "absent" / "u.png"), summary=False, md=None,
                              example_user=None, limit_users=None, seed=None, threads=2)
    for plot, wanted in [(tmp_path / "absent" / "u.png", f"directory {tmp_path / 'absent'} does not exist"),
                         (tmp_path / "afile" / "u.png", f"{tmp_path / 'afile'} is not a directory")]:
        args.plot = str(plot)
        with pytest.raises(UserError, match=rf"^--plot {re.escape(str(plot))}: {re.escape(wanted)}$"):
            explain.run(args)
        assert capsys.readouterr().out == ""  # nothing explained, nothing printed
    args.summary, args.user, args.target, args.plot = True, None, None, None  # (--summary takes no --target)
    args.md = str(tmp_path / "afile" / "r.md")
    with pytest.raises(UserError, match=r"^--md .*r\.md: .*afile is not a directory$"):
        explain.run(args)
    assert capsys.readouterr().out == ""


def test_capsule_entropy_matches_hand_computation():
    groups, ent = capsule_entropy(
        np.array([0, 0, 0, 0, 1, 1, 5, 5, 5]), np.array([1, 1, 2, 2, 3, 3, 1, 2, 4])
    )
    np.testing.assert_array_equal(groups, [0, 1, 5])
    np.testing.assert_allclose(ent, [1.0, 0.0, np.log2(3)])


def test_summary_beats_random_grouping_on_planted_data(planted, tmp_path):
    _, run = planted
    s = interest_summary(run, seed=0)
    c = s["coherence"]
    assert s["users"] == 400 and sum(s["k_u"].values()) == 400
    # the random control keeps every user's capsule sizes
    assert c["random_grouping"]["capsules_with_2plus_items"] == c["trained"]["capsules_with_2plus_items"]
    assert c["trained"]["mean_entropy_bits_2plus"] < c["random_grouping"]["mean_entropy_bits_2plus"] - 0.1
    args = argparse.Namespace(
        run=str(run.path),
        data=None,
        user=None,
        target=None,
        plot=str(tmp_path / "s.png"),
        summary=True,
        md=str(tmp_path / "interests.md"),
        example_user="u00000",
        limit_users=None,
        seed=0,
        threads=2,
    )
    assert explain.run(args) == 0
    md = (tmp_path / "interests.md").read_text()
    assert "| trained IaCN capsules |" in md and "![" in md and "user u00000" in md
    assert str(run.path) in md and "random-grouping seed 0" in md and "torchrec" in md  # provenance
    assert interest_summary(run, seed=0, limit_users=7)["users"] == 7  # exactly N, not a whole batch
    args.example_user, args.md = "no-such-user", str(tmp_path / "x.md")
    assert explain.run(args) == 2 and not (tmp_path / "x.md").exists()  # a clear error, no traceback
    assert (tmp_path / "s.png").is_file()
    # the report names the model, and reaches a figure in another folder from its own
    (tmp_path / "figs").mkdir()
    args.example_user, args.md = None, str(tmp_path / "out" / "r.md")
    args.plot = str(tmp_path / "figs" / "p.png")
    assert explain.run(args) == 0
    md = (tmp_path / "out" / "r.md").read_text()
    assert md.startswith("# What the interest capsules learned (DIN + IaCN)") and "](../figs/p.png)" in md
    args.summary, args.md, args.plot, args.user = False, None, None, "u00000"
    assert explain.run(args) == 2  # --seed is the summary's


def test_plain_run_has_nothing_to_explain(planted, tmp_path, capsys):
    _, run = planted
    cfg = TrainConfig.from_dict(
        {
            "data": {"path": str(run.ds.path)},
            "model": {"name": "din"},
            "max_steps": 2,
            "out": str(tmp_path / "plain"),
            "progress": False,
            "threads": 2,
        }
    )
    train(cfg)
    args = argparse.Namespace(
        run=str(tmp_path / "plain"),
        data=None,
        user="u00000",
        target=None,
        plot=None,
        summary=False,
        md=None,
        example_user=None,
        limit_users=None,
        seed=None,
        threads=2,
    )
    assert explain.run(args) == 2
    assert "without IaCN" in capsys.readouterr().err


def test_synthetic_users_hold_two_disjoint_groups(tmp_path):
    p = make_planted_interests(tmp_path, num_users=50, num_groups=3, seed=4)
    lines = Path(p.interactions).read_text().splitlines()[1:]
    seen: dict[str, set[int]] = {}
    for ln in lines:
        u, it, _ = ln.split("\t")
        seen.setdefault(u, set()).add(item_group_of(it))
    for u, groups in seen.items():
        assert groups <= set(p.user_groups[u]) and p.user_groups[u][0] != p.user_groups[u][1]
    again = make_planted_interests(tmp_path / "again", num_users=50, num_groups=3, seed=4)
    assert Path(again.interactions).read_text() == Path(p.interactions).read_text()  # seeded


def test_heldout_target_needs_a_heldout_sample(planted, tmp_path):
    """On the dien protocol 9 in 10 users are training users: they have no held-out item, and
    --target heldout says so instead of silently explaining a training positive."""
    import types

    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.data.prepare import prepare_dataset

    p, run = planted
    ds = PreparedDataset.open(prepare_dataset("tsv", interactions=p.interactions, items=p.items,
                                              category_column="cate", protocol="dien", max_len=16, seed=0,
                                              out=tmp_path / "dien", progress=False))
    test_users = set(np.asarray(ds.split("test").uid).tolist())
    uid = next(i for i in np.asarray(ds.split("train").uid).tolist() if i not in test_users)
    user = ds.vocab("uid")[uid - 1]
    with pytest.raises(KeyError, match=rf"user {user!r} has no held-out \(label-1 test\) sample"):
        explain_user(types.SimpleNamespace(ds=ds, model=run.model), user, "heldout")


def test_target_item_is_explained_for_that_item(planted, capsys):
    """``iacn explain --target ITEM`` with a raw item id explains that item: its attention over the
    user's capsules and its click probability are what the model computes for a row with that
    target, rebuilt here from the tables (``c = E_aux(item) ⊕ E_aux(cate)``, routed capsules,
    ``softmax(sign(s)·|s|^p)`` with ``s = V_j · c_t``, the main model on the merged tables), and
    another item gets its own, different numbers."""
    from iacn_torchrec.serving.export import ServingModel

    p, run = planted
    ds, model = run.ds, run.model.eval()
    s = ds.split("test")
    off = np.asarray(s.hist_offsets)
    L = ds.max_len
    # a user with at least 2 live capsules (K_u = ceil(log2 n) >= 2: n >= 3), so attention can differ
    r = next(r for r in range(len(s.label)) if s.label[r] == 1 and off[r + 1] - off[r] >= 5)
    uid = int(s.uid[r])
    user = ds.vocab("uid")[uid - 1]
    hist, hist_c = np.asarray(s.hist_item[off[r] : off[r + 1]]), np.asarray(s.hist_cate[off[r] : off[r + 1]])
    n = len(hist)
    assert n <= L
    items = ds.vocab("item")
    g_in, _ = p.user_groups[user]
    # raw ids: one of the user's groups, one of neither; never index 1, nor the held-out item
    idx_a = next(i + 1 for i, x in enumerate(items)
                 if item_group_of(x) == g_in and i + 1 not in (1, int(s.item[r])))
    idx_b = next(i + 1 for i, x in enumerate(items) if item_group_of(x) not in p.user_groups[user] and i > 0)

    tables = {name: t.weight.detach() for ec in model.embeddings.collections().values()
              for name, t in ec.embeddings.items()}
    aux_hist = torch.zeros(1, L, tables["item_aux"].shape[1] + tables["cate_aux"].shape[1])
    aux_hist[0, :n] = torch.cat([tables["item_aux"][hist], tables["cate_aux"][hist_c]], 1)
    with torch.no_grad():
        routed = model.iacn.routing.route(aux_hist, torch.tensor([n]), user=tables["uid"][[uid]])
    caps = routed.capsules[0, routed.capsule_mask[0]].double().numpy()  # [K_u, h] live capsules
    assert caps.shape[0] >= 2
    serving = ServingModel.from_model(model)
    pow_p = model.iacn.config.pow_p

    def reference(t: int) -> tuple[np.ndarray, float]:
        c = int(ds.item2cate[t])
        e = torch.cat([tables["item_aux"][t], tables["cate_aux"][c]]).double().numpy()
        sc = caps @ e
        z = np.sign(sc) * np.abs(sc) ** pow_p
        att = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        h = np.zeros((1, L), np.int64)
        hc = np.zeros((1, L), np.int64)
        h[0, :n], hc[0, :n] = hist, hist_c
        cols = [[uid], [t], [c], h, hc, [n]]
        with torch.no_grad():
            prob = serving(*(torch.tensor(np.asarray(x), dtype=torch.long) for x in cols))
        return att, float(prob[0])

    want_a, want_b = reference(idx_a), reference(idx_b)
    assert np.abs(want_a[0] - want_b[0]).max() > 1e-3 or abs(want_a[1] - want_b[1]) > 1e-3  # items differ
    for idx, (att, prob) in ((idx_a, want_a), (idx_b, want_b)):
        ex = explain_user(run, user, target=items[idx - 1])
        np.testing.assert_array_equal(ex.hist_item, hist)
        np.testing.assert_allclose(ex.attention, att, rtol=0, atol=1e-5)
        assert ex.score == pytest.approx(prob, abs=1e-5)
        assert (ex.target, ex.target_cate) == (idx, int(ds.item2cate[idx]))
        assert ex.matched == int(att.argmax())

    # the command line: the report names the item and prints its numbers
    args = argparse.Namespace(run=str(run.path), data=None, user=user, target=items[idx_a - 1], plot=None,
                              summary=False, md=None, example_user=None, limit_users=None, seed=None,
                              threads=2)
    capsys.readouterr()
    assert explain.run(args) == 0
    out = capsys.readouterr().out
    m = re.search(rf"^target {re.escape(items[idx_a - 1])} \(.*\): label-aware attention \[(.*)\] -> matched "
                  r"interest (\d+); main-model click probability (\d\.\d+)$", out, re.M)
    assert m, out
    printed = [float(x) for x in m.group(1).split(",")]  # 2 decimals
    np.testing.assert_allclose(printed, want_a[0], rtol=0, atol=0.005 + 1e-6)
    assert int(m.group(2)) == int(want_a[0].argmax()) + 1
    assert float(m.group(3)) == pytest.approx(want_a[1], abs=0.0005 + 1e-6)


def test_unexpected_key_errors_are_not_shown_as_a_bare_word(tmp_path, monkeypatch, capsys):
    """explain's own lookups (unknown user or item id) are one-line errors; any other KeyError is a
    bug and keeps its traceback, never printed as ``iacn explain: model``."""
    from iacn_torchrec.serving import export

    def broken_load_run(*a, **k):
        raise KeyError("model")

    monkeypatch.setattr(export, "load_run", broken_load_run)
    args = argparse.Namespace(run=str(tmp_path), data=None, user="u1", target=None, plot=None, summary=False,
                              md=None, example_user=None, limit_users=None, seed=None, threads=2)
    with pytest.raises(KeyError, match="model"):
        explain.run(args)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, shown", [
    (["--summary", "--target", "heldout"],
     "--target goes with --user (one user's explanation), not --summary"),
    (["--summary", "--example-user", "u1"], "--example-user goes with --md (the report shows that user)"),
    (["--summary", "--example-user", "u1", "--target", "i1", "--md", "r.md"],
     "--target goes with --user (one user's explanation), not --summary"),
])
def test_summary_refuses_options_it_would_ignore(tmp_path, monkeypatch, capsys, argv, shown):
    from iacn_torchrec.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["explain", "--run", "run", *argv]) == 2
    assert capsys.readouterr().err == f"iacn explain: {shown}\n"
    assert list(tmp_path.iterdir()) == []
