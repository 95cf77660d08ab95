"""Contracts of the export, scoring, explanations, planning and reproduce's tables that a mutation
review found unpinned: each test fails under the change ("mutant") its docstring names, which the
rest of the suite let pass."""

from __future__ import annotations

import collections
import json
import math
import shutil
import statistics
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import prepare_planted

from iacn_torchrec.data.loader import PreparedDataset
from iacn_torchrec.serving.artifact import ServingArtifact, file_sha256
from iacn_torchrec.serving.export import export_run, load_run
from iacn_torchrec.train.config import TrainConfig
from iacn_torchrec.train.loop import train


# ------------------------------------------------------------------------------------ fixtures
def _train(data: Path, out: Path, model: str, iacn: bool, emb_dim: int = 18, steps: int = 20,
           **extra) -> Path:
    cfg = {
        "data": {"path": str(data), "batch_size": 32},
        "model": {"name": model, "emb_dim": emb_dim, "user_dim": 18},
        "iacn": {"enabled": iacn},
        "max_steps": steps, "out": str(out), "progress": False, "resume": False, "threads": 2, "seed": 3,
    }
    for k, v in extra.items():
        cfg[k] = v
    train(TrainConfig.from_dict(cfg))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A DIN+IaCN run and a plain DIN run of the same width on planted data, both exported."""
    root = tmp_path_factory.mktemp("gaps3")
    planted, data = prepare_planted(root, num_users=200, seed=1)
    runs = {"din": _train(data, root / "din", "din", True, steps=40),
            "plain": _train(data, root / "plain", "din", False, emb_dim=36, steps=5)}
    models = {}
    for name, run_dir in runs.items():
        export_run(run_dir, root / f"model-{name}", check_samples=None)
        models[name] = root / f"model-{name}"
    return types.SimpleNamespace(root=root, planted=planted, data=data, runs=runs, models=models)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(d: Path, rel: str) -> None:
    """Record ``rel``'s current sha256 in the manifest: a consistent artefact with wrong content."""
    m = json.loads((d / "manifest.json").read_text())
    m["files"][rel] = file_sha256(d / rel)
    (d / "manifest.json").write_text(json.dumps(m))


# ------------------------------------------------------------------------------- export / artefact
def test_export_refuses_scores_that_differ_from_the_eager_model(served, tmp_path, monkeypatch):
    """Mutant export.py:433 (the exported-vs-eager check dropped, or written ``max_diff > ATOL`` so
    that a NaN passes): an export whose scores are not the eager model's must not be written."""
    from iacn_torchrec.serving import export

    real = export.eager_scores
    for shift in (lambda p: p + 1e-4, lambda p: p * np.nan):
        monkeypatch.setattr(export, "eager_scores", lambda run, limit=None, f=shift: (
            f(real(run, limit)[0]), real(run, limit)[1]))
        with pytest.raises(export.ExportError, match="differ from the eager model's"):
            export_run(served.runs["din"], tmp_path / "m", check_samples=64)
        assert not (tmp_path / "m").exists()


def test_a_plain_export_says_its_tables_are_the_orig_tables_only(served):
    """Mutant export.py:498 (``merged_from`` always ``[X_orig, X_aux]``): a plain model has no aux
    table, and its manifest must not claim one."""
    m = json.loads((served.models["plain"] / "manifest.json").read_text())
    assert m["dims"]["aux_dim"] == 0 and not m["iacn_trained"]
    assert m["tables"]["item"]["merged_from"] == ["item_orig"]
    assert m["tables"]["cate"]["merged_from"] == ["cate_orig"]
    m = json.loads((served.models["din"] / "manifest.json").read_text())
    assert m["tables"]["cate"]["merged_from"] == ["cate_orig", "cate_aux"]


def test_an_item2cate_naming_the_row_past_the_category_table_is_refused(served, tmp_path):
    """Mutant artifact.py:263 (``max() <= rows`` instead of ``< rows``): a category index equal to
    the category table's row count is past its last row (0..rows-1); the load must refuse it, not
    the first batch that reads it."""
    art = ServingArtifact.load(served.models["din"])
    rows_cate = art.table_rows["cate"]
    bad = _copy_model(served.models["din"], tmp_path / "bad")
    i2c = np.load(bad / "item2cate.npy")
    i2c[1] = rows_cate
    np.save(bad / "item2cate.npy", i2c)
    _rehash(bad, "item2cate.npy")
    with pytest.raises(ValueError, match=rf"item2cate\.npy: categories .*{rows_cate} outside"):
        ServingArtifact.load(bad)


def _rewrite_vocab_index(d: Path, kind: str, line_no: int, index: int) -> None:
    p = d / "vocab" / f"{kind}.tsv"
    lines = p.read_text().split("\n")
    raw, _, _ = lines[line_no].rpartition("\t")
    lines[line_no] = f"{raw}\t{index}"
    p.write_text("\n".join(lines))
    _rehash(d, f"vocab/{kind}.tsv")


def test_a_vocabulary_index_equal_to_the_table_rows_is_refused(served, tmp_path):
    """Mutant artifact.py:280 (``top > rows`` instead of ``top >= rows``): with one entry's index
    moved to ``rows`` (the count of entries unchanged, every index distinct and >= 1), the raw id
    would address a row the table does not have; the load must name it."""
    rows = ServingArtifact.load(served.models["din"]).table_rows["item"]
    bad = _copy_model(served.models["din"], tmp_path / "bad")
    last = len([ln for ln in (bad / "vocab" / "item.tsv").read_text().split("\n") if ln]) - 1
    _rewrite_vocab_index(bad, "item", last, rows)
    with pytest.raises(ValueError, match=rf"vocab/item\.tsv: index {rows} past the model's item table"):
        ServingArtifact.load(bad)


def test_a_vocabulary_mapping_a_raw_id_to_the_padding_row_is_refused(served, tmp_path):
    """Mutant artifact.py:287 (``min < 0`` instead of ``min < 1``): an entry with index 0 maps a known
    raw id to the padding/unknown row (and leaves a table row without an id): a damaged vocabulary."""
    bad = _copy_model(served.models["din"], tmp_path / "bad")
    _rewrite_vocab_index(bad, "item", 0, 0)
    with pytest.raises(ValueError, match=r"vocab/item\.tsv: the indices are not 1\.\."):
        ServingArtifact.load(bad)


def _score_input(served, path: Path, hist_lengths: list[int], users=None) -> tuple[list[str], list[str]]:
    ds = PreparedDataset.open(served.data)
    U, Id = ds.vocab("uid"), ds.vocab("item")
    users = users or [U[k % len(U)] for k in range(len(hist_lengths))]
    items = [Id[(3 * k + 1) % len(Id)] for k in range(len(hist_lengths))]
    with open(path, "w") as f:
        f.write("user_id\titem_id\thistory\n")
        for u, i, n in zip(users, items, hist_lengths, strict=True):
            f.write(f"{u}\t{i}\t{'|'.join(Id[(k * 7) % len(Id)] for k in range(n))}\n")
    return users, items


def test_a_history_of_exactly_L_items_is_not_counted_as_truncated(served, tmp_path):
    """Mutant artifact.py:342 (``hist_len >= L``): only histories longer than L lose items."""
    from iacn_torchrec.serving.score import score_file

    L = ServingArtifact.load(served.models["din"]).max_len
    _score_input(served, tmp_path / "in.tsv", [L, L + 1, L - 1, 0])
    s = score_file(served.models["din"], tmp_path / "in.tsv", tmp_path / "out.tsv", progress=False)
    assert s["histories_truncated"] == 1
    assert s["history_ids"] == L + L + (L - 1)


def test_score_output_rows_carry_their_own_user_and_item_ids(served, tmp_path):
    """Mutant score.py:231 (user and item columns swapped): each written row names its input row's
    ``user_id`` and ``item_id`` under those headers, in input order."""
    from iacn_torchrec.serving.score import score_file

    users, items = _score_input(served, tmp_path / "in.tsv", [3, 0, 5, 1])
    score_file(served.models["din"], tmp_path / "in.tsv", tmp_path / "out.tsv", progress=False)
    lines = (tmp_path / "out.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:2] == ["user_id", "item_id"]
    assert [ln.split("\t")[:2] for ln in lines[1:]] == [[u, i] for u, i in zip(users, items, strict=True)]


def test_score_warns_when_most_rows_have_unknown_users(served, tmp_path, capsys):
    """Mutant score.py:326 (``worst > rows`` instead of ``> rows / 2``): more than half the rows with
    unknown user (or item) ids draws the warning that the input may be another dataset's; a few do
    not."""
    from iacn_torchrec.cli import main

    ds = PreparedDataset.open(served.data)
    U = ds.vocab("uid")
    for unknown, warned in ((3, True), (1, False)):
        users = [f"NO-SUCH-{k}" for k in range(unknown)] + U[: 4 - unknown]
        _score_input(served, tmp_path / "in.tsv", [2, 2, 2, 2], users=users)
        assert main(["score", "--model", str(served.models["din"]), "--input", str(tmp_path / "in.tsv"),
                     "--out", str(tmp_path / "out.tsv"), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert ("warning: 3 of 4 rows have user or item ids this model has never seen" in err) == warned, err


# ------------------------------------------------------------------------------------------ explain
def _label1_rows(ds):
    s = ds.split("test")
    keep = np.flatnonzero(np.asarray(s.label) == 1)
    off = np.asarray(s.hist_offsets)
    hi = np.concatenate([s.hist_item[off[r]: off[r + 1]] for r in keep])
    hc = np.concatenate([s.hist_cate[off[r]: off[r + 1]] for r in keep])
    return s, keep, hi, hc, np.diff(off)[keep]


def _by_hand(exs) -> dict:
    """The summary's statistics from per-user explanations (the documented definitions)."""
    groups = []  # (size, entropy) of every capsule that wins at least one item
    for ex in exs:
        for j in range(ex.num_interests):
            cats = ex.hist_cate[ex.assignment == j].tolist()
            if cats:
                p = np.array(list(collections.Counter(cats).values()), float) / len(cats)
                groups.append((len(cats), float(-(p * np.log2(p)).sum())))
    size = np.array([g[0] for g in groups])
    ent = np.array([g[1] for g in groups])
    multi = size >= 2
    buckets = {2: (2, 3), 3: (3, 4), 4: (4, 5), 5: (5, 6), 6: (6, 8), 8: (8, 10), 10: (10, 10**9)}
    by_size = {}
    for s, (lo, hi) in buckets.items():
        sel = (size >= lo) & (size < hi)
        if sel.any():
            by_size[s] = (int(sel.sum()), float(ent[sel].mean()))
    return {
        "users": len(exs),
        "history_length_mean": float(np.mean([len(ex.hist_item) for ex in exs])),
        "k_u": dict(collections.Counter(ex.num_interests for ex in exs)),
        "effective_interests": dict(collections.Counter(len(set(ex.assignment.tolist())) for ex in exs)),
        "routing_max_weight_mean": float(np.concatenate([ex.routing.max(0) for ex in exs]).mean()),
        "routing_uniform_max_weight_mean": float(np.mean([u for ex in exs for u in
                                                          [1.0 / ex.num_interests] * len(ex.hist_item)])),
        "distinct_categories_mean": float(np.mean([len(set(ex.hist_cate.tolist())) for ex in exs])),
        "coherence": {
            "capsules_with_items": int(size.size),
            "capsules_with_2plus_items": int(multi.sum()),
            "mean_entropy_bits_2plus": float(ent[multi].mean()),
            "item_weighted_entropy_bits": float((ent * size).sum() / size.sum()),
            "pure_fraction_2plus": float((ent[multi] < 1e-9).mean()),
            "by_size": by_size,
        },
    }


def _check_coherence(got: dict, want: dict) -> None:
    for k in ("capsules_with_items", "capsules_with_2plus_items"):
        assert got[k] == want[k], k
    for k in ("mean_entropy_bits_2plus", "item_weighted_entropy_bits", "pure_fraction_2plus"):
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    assert {int(s): (v["capsules"], v["entropy_bits"]) for s, v in got["by_size"].items()} == {
        s: (n, pytest.approx(e, abs=1e-9)) for s, (n, e) in want["by_size"].items()}


def test_interest_summary_statistics_by_hand(served):
    """Mutants explain.py:392-403 (``size >= 1`` as "2 or more items", the size buckets' bounds, the
    item weighting, the purity threshold), 443 (a padding position counted as a history item), 447
    (the mean routing weight as the largest), 478 (every item as an effective interest), 480 (items
    as distinct categories), 497 (the uniform weight per user, not per item), 508 (the untrained
    control given the trained capsules): every figure of ``interest_summary`` recomputed from the
    per-user explanations of the label-1 test rows, for the trained model and for the same
    architecture at its initial weights."""
    from iacn_torchrec.distributed.setup import build_model_from_config
    from iacn_torchrec.serving.explain import explain_samples, interest_summary

    run = load_run(served.runs["din"])
    s, keep, hi, hc, lens = _label1_rows(run.ds)
    summary = interest_summary(run, seed=0)
    torch.manual_seed(run.config.seed)
    fresh = build_model_from_config(run.config, run.ds,
                                    item_log_q=getattr(run.model, "item_log_q", None)).eval()
    for model, name in ((run.model, "trained"), (fresh, "untrained")):
        exs = explain_samples(model, np.asarray(s.uid)[keep], hi, hc, lens)
        want = _by_hand(exs)
        _check_coherence(summary["coherence"][name], want["coherence"])
        if name == "untrained":
            assert summary["effective_interests_untrained_mean"] == pytest.approx(
                np.mean([len(set(ex.assignment.tolist())) for ex in exs]))
            assert summary["routing_max_weight_untrained_mean"] == pytest.approx(
                want["routing_max_weight_mean"], abs=1e-6)
            continue
        assert summary["users"] == want["users"] == keep.size
        assert summary["history_length_mean"] == pytest.approx(want["history_length_mean"])
        assert summary["k_u"] == want["k_u"]
        assert summary["effective_interests"] == want["effective_interests"]
        assert summary["effective_interests_mean"] == pytest.approx(
            sum(k * v for k, v in want["effective_interests"].items()) / keep.size)
        assert summary["routing_max_weight_mean"] == pytest.approx(want["routing_max_weight_mean"], abs=1e-6)
        assert summary["routing_uniform_max_weight_mean"] == pytest.approx(
            want["routing_uniform_max_weight_mean"])
        assert summary["distinct_categories_mean"] == pytest.approx(want["distinct_categories_mean"])
    # the untrained control is another model: its capsules differ from the trained ones
    assert summary["coherence"]["untrained"] != summary["coherence"]["trained"]


def test_coherence_of_given_assignments():
    """Mutant explain.py:439 (a capsule counted as category-pure below 0.5 bits, not 0): the purity,
    size buckets and entropies of hand-made groupings. User 0: a capsule of 10 items with one off
    category (0.469 bits: impure), a pure pair; user 1: 3 items of 3 categories, one single item."""
    from iacn_torchrec.serving.explain import _coherence

    rows = [0] * 12 + [1] * 4
    caps = [0] * 10 + [1] * 2 + [0] * 3 + [1]
    cats = [5] * 9 + [6] + [7, 7] + [1, 2, 3] + [4]
    a = {"row": np.array(rows), "capsule": np.array(caps), "cate": np.array(cats)}
    got = _coherence(a, a["capsule"], k_max=4)
    h10 = -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))
    assert got["capsules_with_items"] == 4 and got["capsules_with_2plus_items"] == 3
    assert got["pure_fraction_2plus"] == pytest.approx(1 / 3)
    assert got["mean_entropy_bits_2plus"] == pytest.approx((h10 + 0 + math.log2(3)) / 3)
    assert got["item_weighted_entropy_bits"] == pytest.approx((10 * h10 + 3 * math.log2(3)) / 16)
    assert {k: v["capsules"] for k, v in got["by_size"].items()} == {2: 1, 3: 1, 10: 1}
    assert got["by_size"][10]["entropy_bits"] == pytest.approx(h10)


def test_random_grouping_spread_is_the_sample_sd_over_five_seeds(served):
    """Mutants explain.py:473 (every control seed the first one: an SD of 0) and 505 (the population
    SD): ``mean_entropy_bits_2plus_over_5_seeds`` is [mean, sample SD] of the random-grouping
    control's mean entropy at seeds seed..seed+4, each of which is that seed's own control."""
    from iacn_torchrec.serving.explain import interest_summary

    run = load_run(served.runs["din"])
    per_seed = [interest_summary(run, seed=s)["coherence"]["random_grouping"]["mean_entropy_bits_2plus"]
                for s in range(5)]
    assert len(set(per_seed)) > 1  # the seeds do regroup differently
    grouping = interest_summary(run, seed=0)["coherence"]["random_grouping"]
    got = grouping["mean_entropy_bits_2plus_over_5_seeds"]
    assert got[0] == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
    assert got[1] == pytest.approx(statistics.stdev(per_seed), abs=1e-12)


def test_capsule_norms_are_the_routed_capsules_lengths(served):
    """Mutant explain.py:176 (``|u_j|²`` for ``|u_j|``): the norms the report prints are the lengths
    of the user's live capsules as the routing computes them."""
    from iacn_torchrec.serving.explain import explain_samples

    run = load_run(served.runs["din"])
    s, keep, hi, hc, lens = _label1_rows(run.ds)
    r = int(np.flatnonzero(lens >= 5)[0])
    off = np.r_[0, np.cumsum(lens)]
    h, c, n = hi[off[r]: off[r + 1]], hc[off[r]: off[r + 1]], int(lens[r])
    ex = explain_samples(run.model, np.asarray(s.uid)[keep][[r]], h, c, np.array([n]))[0]
    model = run.model.eval()
    tables = {name: t.weight.detach() for ec in model.embeddings.collections().values()
              for name, t in ec.embeddings.items()}
    L = run.ds.max_len
    aux_hist = torch.zeros(1, L, tables["item_aux"].shape[1] + tables["cate_aux"].shape[1])
    aux_hist[0, :n] = torch.cat([tables["item_aux"][h], tables["cate_aux"][c]], 1)
    uid = int(np.asarray(s.uid)[keep][r])
    with torch.no_grad():
        routed = model.iacn.routing.route(aux_hist, torch.tensor([n]), user=tables["uid"][[uid]])
    caps = routed.capsules[0, routed.capsule_mask[0]]
    assert ex.num_interests == caps.shape[0] >= 2
    np.testing.assert_allclose(ex.capsule_norms, caps.norm(dim=-1).numpy(), rtol=0, atol=1e-5)


def test_a_user_without_a_test_sample_is_explained_from_the_latest_training_positive(tmp_path):
    """Mutant explain.py:240 (the user's first label-1 row instead of the last): DIEN's own files
    (``local_train`` / ``local_test``, as DIEN's preprocessing writes them) hold several training
    samples per user, one per prefix of the history; a user with no test sample is explained from
    the latest (longest) history, not the earliest."""
    from iacn_torchrec.data.prepare import prepare_dataset
    from iacn_torchrec.distributed.setup import build_model_from_config
    from iacn_torchrec.serving.explain import explain_user

    raw = tmp_path / "dien-raw"
    raw.mkdir()
    x = chr(2)
    items = [f"i{k}" for k in range(1, 9)]
    cates = {i: f"c{int(i[1:]) % 3}" for i in items}

    def row(label, user, target, hist):
        return (f"{label}\tuser_{user}\t{target}\t{cates[target]}\t{x.join(hist)}\t"
                f"{x.join(cates[h] for h in hist)}\n")

    # user A: training samples only, at each prefix (pos/neg pairs); user B: the test user
    (raw / "local_train").write_text(
        row(1, "A", "i3", ["i1", "i2"]) + row(0, "A", "i7", ["i1", "i2"])
        + row(1, "A", "i4", ["i1", "i2", "i3"]) + row(0, "A", "i8", ["i1", "i2", "i3"])
        + row(1, "A", "i5", ["i1", "i2", "i3", "i4"]) + row(0, "A", "i6", ["i1", "i2", "i3", "i4"]))
    (raw / "local_test").write_text(row(1, "B", "i6", ["i5", "i2"]) + row(0, "B", "i1", ["i5", "i2"]))
    ds = PreparedDataset.open(prepare_dataset("dien", path=raw, max_len=8, seed=0, out=tmp_path / "ds",
                                              progress=False))
    cfg = TrainConfig.from_dict({"data": {"path": str(ds.path)}, "model": {"name": "din"},
                                 "iacn": {"enabled": True}, "out": str(tmp_path / "run")})
    torch.manual_seed(0)
    model = build_model_from_config(cfg, ds).eval()
    ex = explain_user(types.SimpleNamespace(ds=ds, model=model), "user_A")
    assert [ex.name("item", int(i)) for i in ex.hist_item] == ["i1", "i2", "i3", "i4"]


def test_score_auto_detects_a_six_column_tsv_with_a_header(tmp_path):
    """Mutant score.py:78 (any 6-field first line taken for DIEN rows): a TSV whose header has six
    columns is a TSV (its first field is no 0/1 label), not DIEN's local_test rows."""
    from iacn_torchrec.serving.score import read_samples

    (tmp_path / "six.tsv").write_text("user_id\titem_id\thistory\tlabel\tnote\tsource\n"
                                      "u1\ti1\ta|b\t1\tx\ty\nu2\ti2\t\t0\tx\ty\n")
    s = read_samples(tmp_path / "six.tsv")
    assert s.format == "tsv" and s.user == ["u1", "u2"] and s.hist_len.tolist() == [2, 0]
    assert s.label.tolist() == [1, 0]


def test_manifest_counts_served_state_without_the_position_buffer(served):
    """Mutant export.py:518 (the ``positions`` index buffer counted as served state): a plain model
    serves exactly the state it trained (its orig tables are the served tables, nothing is dropped)."""
    m = json.loads((served.models["plain"] / "manifest.json").read_text())
    assert m["parameters"]["served"] == m["parameters"]["trained_model"]


def test_int8_mean_score_difference_is_the_mean(served, tmp_path):
    """Mutant export.py:455 (the largest difference recorded as the mean): the manifest's
    ``mean_abs_score_diff`` is the mean |float - int8| score difference over the test split."""
    from iacn_torchrec.serving.export import split_inputs

    export_run(served.runs["din"], tmp_path / "q", check_samples=64, int8=True)
    q = json.loads((tmp_path / "q" / "manifest.json").read_text())["checks"]["int8"]
    inputs, _ = split_inputs(load_run(served.runs["din"]).ds)
    with torch.no_grad():
        p_f = ServingArtifact.load(tmp_path / "q").model(*inputs).numpy()
        p_q = ServingArtifact.load(tmp_path / "q", int8=True).model(*inputs).numpy()
    d = np.abs(p_f - p_q)
    assert d.max() > 2 * d.mean()  # so the max and the mean are told apart
    assert q["mean_abs_score_diff"] == pytest.approx(float(d.mean()), abs=1e-7)
    assert q["test_samples"] == len(d)


# ------------------------------------------------------------------------------------------ planning
def _plan_result(rank_perf):
    from iacn_torchrec.distributed.planning import PlanResult

    return PlanResult(model="m", with_iacn=True, aux_dim=8, topology={}, batch_size=8, optimizer="sgd",
                      mode="uvm_caching", fits=True, planner_seconds=0.0, rank_perf=rank_perf,
                      rank_hbm=[0] * len(rank_perf), rank_ddr=[0] * len(rank_perf))


def test_step_estimate_is_the_slowest_ranks_total_prefetch_included():
    """Mutants planning.py:238 (prefetch left out of a rank's total), 243 (the fastest rank as the
    step) and 248 (the fastest rank as critical): the step estimate is the max over ranks of the
    summed fwd/bwd compute, comms and prefetch of the rank's shards."""
    perf = [dict(fwd_compute=1.0, fwd_comms=0.5, bwd_compute=2.0, bwd_comms=0.5, prefetch_compute=0.0),
            dict(fwd_compute=1.0, fwd_comms=0.5, bwd_compute=1.0, bwd_comms=0.5, prefetch_compute=3.0),
            dict(fwd_compute=0.5, fwd_comms=0.5, bwd_compute=0.5, bwd_comms=0.5, prefetch_compute=0.0)]
    r = _plan_result(perf)
    assert r.rank_total == [4.0, 6.0, 2.0]
    assert r.step_estimate_ms == 6.0 and r.critical_rank == 1
    assert r.summary()["critical_rank_perf"]["prefetch_compute"] == 3.0


def test_iacn_deltas_are_the_aux_tables_per_rank_and_step_changes():
    """Mutants planning.py:594-604 (per-rank HBM delta against the baseline's DDR, the DDR delta not a
    difference, the step delta's sign, the step ratio inverted, every table's storage counted as the
    aux tables'): on a CPU topology with table-wise tables (one shard per table), every delta is
    recomputed from the two plans' tables."""
    from iacn_torchrec.distributed.planning import ModelSpec, PlanOptions, TopologySpec, compare_iacn

    spec = ModelSpec("small", num_users=1000, num_items=5000, num_cates=50, orig_dim=16, aux_dim=8,
                     user_dim=16, hist_len=4)
    topo = TopologySpec(world_size=2, local_world_size=2, compute_device="cpu", ddr_gib=4)
    c = compare_iacn(spec, topo, PlanOptions(batch_size=16, sharding_types=("table_wise",)))
    base, iacn, delta = c["baseline"], c["iacn"], c["delta"]

    def per_rank(res, what):
        out = [0.0, 0.0]
        for t in res.tables:
            (rank,) = t.ranks
            out[rank] += what(t)
        return out

    def ddr(res):
        return per_rank(res, lambda t: t.ddr_bytes)

    def step(res):
        return max(per_rank(res, lambda t: sum(t.perf.values())))

    assert delta["max_rank_hbm"] == 0  # nothing in HBM on a CPU topology
    assert delta["max_rank_ddr"] == max(ddr(iacn)) - max(ddr(base)) != 0
    assert delta["total_ddr"] == sum(ddr(iacn)) - sum(ddr(base))
    assert delta["step_estimate_ms"] == pytest.approx(step(iacn) - step(base), rel=1e-9)
    assert delta["step_estimate_ms"] > 0  # more tables, more work
    assert delta["step_ratio"] == pytest.approx(step(iacn) / step(base), rel=1e-9)
    # the aux tables are all IaCN adds: their storage is the whole DDR delta
    assert delta["aux_storage_bytes"] == delta["total_ddr"]


def test_a_total_shortfall_is_what_the_ranks_lack_together():
    """Mutant planning.py:468 (the total shortfall against one rank's capacity, not W ranks'): with
    the shortfall's bytes less a margin added to the ranks, the tables still miss by that margin."""
    from iacn_torchrec.distributed.plan_specs import GIB
    from iacn_torchrec.distributed.planning import (
        ModelSpec,
        PlanDoesNotFitError,
        PlanOptions,
        TopologySpec,
        plan_tables,
    )

    spec = ModelSpec("tot", 1000, 2_000_000, 100, orig_dim=64, aux_dim=64, user_dim=64, hist_len=2)
    opts = PlanOptions(batch_size=8, reserve_fraction=0.0, offload="never")
    W, hbm = 2, 0.4

    def shortfall(hbm_gib: float) -> int:
        topo = TopologySpec(world_size=W, local_world_size=W, compute_device="cuda", hbm_gib=hbm_gib)
        with pytest.raises(PlanDoesNotFitError) as e:
            plan_tables(spec, topo, opts, with_iacn=True)
        assert not any(k in e.value.shortfall for k in ("item_aux", "item_orig")), e.value.shortfall
        return e.value.shortfall["total_hbm"]

    s = shortfall(hbm)
    margin = 2**20
    assert s > 4 * margin
    left = shortfall(hbm + (s - margin) / W / GIB)
    assert abs(left - margin) <= W * 8, (s, left)


def test_sharding_types_offered_by_table_size_and_world_size():
    """Mutants planning.py:154 (small and large tables swapped), 157 (table-wise refused at exactly
    ``table_wise_max_world`` ranks), 161 (column-wise offered to small tables instead of large ones)
    and 178 (data-parallel without its dense kernel): what ``PlanOptions`` documents."""
    from iacn_torchrec.distributed.plan_specs import GIB, PlanOptions, TableSpec, TopologySpec
    from iacn_torchrec.distributed.planning import ModelSpec, build_constraints, sharding_types_for

    small = TableSpec("cate_orig", "orig", 101, 16, ("cate",), (1.0,))
    big = TableSpec("item_orig", "orig", GIB // 64 + 1, 16, ("item",), (1.0,))  # just over 1 GiB
    opts = PlanOptions()
    at = {w: TopologySpec(world_size=w, local_world_size=8) for w in (8, 256, 257)}
    assert sharding_types_for(small, at[8], opts, False) == ["data_parallel", "table_wise", "row_wise"]
    assert sharding_types_for(big, at[8], opts, False) == ["table_wise", "row_wise", "column_wise"]
    assert "table_wise" in sharding_types_for(big, at[256], opts, False)
    assert "column_wise" in sharding_types_for(big, at[256], opts, False)
    assert sharding_types_for(big, at[257], opts, False) == ["row_wise"]
    cpu = TopologySpec(world_size=8, local_world_size=8, compute_device="cpu")
    assert sharding_types_for(small, cpu, opts, False) == ["table_wise", "row_wise"]
    spec = ModelSpec("s", num_users=100, num_items=1000, num_cates=10)
    cons = build_constraints(spec, True, at[8], opts, offload=False)
    assert "data_parallel" in cons["cate_aux"].sharding_types and "dense" in cons["cate_aux"].compute_kernels


def test_dien_negative_behaviours_are_looked_up_in_the_aux_tables_too():
    """Mutants plan_specs.py:156 (a neg-history category counted as one id) and 167 (the aux tables
    without DIEN's negative behaviours): E = E_orig ⊕ E_aux for every item-side feature the main model
    reads, DIEN's ``neg_hist_*`` (L ids per sample) included."""
    from iacn_torchrec.distributed.plan_specs import ModelSpec

    spec = ModelSpec("d", num_users=10, num_items=20, num_cates=3, hist_len=7.5, neg_hist=True,
                     iacn_negatives=2.5)
    t = {x.name: x for x in spec.tables(True)}
    assert t["item_orig"].feature_names == ("item", "hist_item", "neg_hist_item")
    assert t["cate_orig"].pooling_factors == (1.0, 7.5, 7.5)
    assert t["item_aux"].feature_names == ("item", "hist_item", "neg_hist_item", "iacn_neg_item")
    assert t["cate_aux"].pooling_factors == (1.0, 7.5, 7.5, 2.5)


def test_a_topology_of_fewer_ranks_than_a_host_is_one_host_of_them():
    """Mutant plan_specs.py:301 (``local_world_size`` above ``world_size``): 2 ranks with the default
    8 per host are one host of 2."""
    from iacn_torchrec.distributed.plan_specs import TopologySpec

    assert TopologySpec(world_size=2).build().local_world_size == 2
    assert TopologySpec(world_size=16).build().local_world_size == 8


def test_each_rank_is_planned_the_state_of_its_own_shards():
    """Mutant planning.py:740 (every rank's plan counted as each rank's): with table-wise tables on 2
    ranks, the shards ``_rank_shards`` gives a rank are the tables the plan put there, and the ranks'
    planned state adds up to the whole."""
    from iacn_torchrec.distributed import planning
    from iacn_torchrec.distributed.planning import ModelSpec, PlanOptions, TopologySpec, plan_tables

    spec = ModelSpec("small", num_users=1000, num_items=5000, num_cates=50, orig_dim=16, aux_dim=8,
                     user_dim=16, hist_len=4)
    topo = TopologySpec(world_size=2, local_world_size=2, compute_device="cpu", ddr_gib=4)
    res, plan = plan_tables(spec, topo, PlanOptions(batch_size=16, sharding_types=("table_wise",)), True)
    for rank in (0, 1):
        want = sorted([t.rows, t.dim] for t in res.tables if t.ranks == [rank])
        assert sorted(planning._rank_shards(plan, rank)) == want
    assert sum(len(planning._rank_shards(plan, r)) for r in (0, 1)) == len(res.tables)


def _meta(tmp_path) -> Path:
    d = tmp_path / "meta"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"counts": {"users": 10, "items": 20, "categories": 3},
                                             "max_len": 5}))
    return d


def test_plan_orig_dim_sets_the_user_dim_and_the_default_aux_dim(tmp_path, capsys):
    """Mutants plan_cli.py:378 (``--orig-dim`` leaving the user table at 18) and 386 (the default aux
    dim not the orig dim with ``--meta``): ``--aux-dim``'s help says "default: orig dim"."""
    from iacn_torchrec.cli import main

    out = tmp_path / "o"
    assert main(["plan", "--meta", str(_meta(tmp_path)), "--orig-dim", "8", "--compute-device", "cpu",
                 "--out", str(out)]) == 0
    data = json.loads((out / "plan.json").read_text())
    assert data["model"]["orig_dim"] == 8 and data["model"]["user_dim"] == 8
    assert [(r["variant"], r["aux_dim"]) for r in data["rows"]] == [("baseline", 0), ("iacn", 8)]
    dims = {t["name"]: t["dim"] for t in data["rows"][1]["result"]["tables"]}
    assert dims == {"uid": 8, "item_orig": 8, "cate_orig": 8, "item_aux": 8, "cate_aux": 8}


def test_plan_exits_1_when_a_plan_does_not_fit_and_shows_deltas_as_hbm_then_ddr(tmp_path, capsys):
    """Mutants plan_cli.py:447 (exit status 0 although a plan does not fit: the module doc promises
    1) and 249 (the markdown's Δ HBM / DDR cell written DDR / HBM)."""
    from iacn_torchrec.cli import main
    from iacn_torchrec.distributed.plan_cli import _signed_gib

    meta = _meta(tmp_path)
    out = tmp_path / "o"
    assert main(["plan", "--meta", str(meta), "--compute-device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "plan.json").read_text())
    d = data["rows"][1]["delta"]
    assert d["max_rank_hbm"] == 0 and d["max_rank_ddr"] > 0
    row = next(ln for ln in (out / "plan.md").read_text().splitlines() if "IaCN aux=" in ln)
    assert f"| 0 / {_signed_gib(d['max_rank_ddr'])} |" in row
    spec = tmp_path / "big.yaml"
    spec.write_text("name: big\nmodel: {num_users: 1000, num_items: 2000000, num_cates: 100, orig_dim: 64, "
                    "user_dim: 64, aux_dim: 256, hist_len: 2}\nworld_sizes: [2]\n"
                    "topology: {local_world_size: 2, hbm_gib: 0.3}\nplan: {batch_size: 8, offload: never}\n")
    assert main(["plan", "--spec", str(spec), "--out", str(tmp_path / "o2")]) == 1
    rows = json.loads((tmp_path / "o2" / "plan.json").read_text())["rows"]
    assert [r["result"]["fits"] for r in rows] == [True, False]


# ------------------------------------------------------------------------------------------ sharding
def test_a_pinned_column_wise_table_is_split_into_narrow_shards():
    """Mutant sharding.py:212 (no ``min_partition``, or the whole dim): TorchRec's default column-wise
    shard is 128 columns, which leaves an 18- or 16-wide table whole; the constraint carries the
    narrowest width that splits the dim over the ranks."""
    from iacn_torchrec.distributed.sharding import planner_constraints
    from iacn_torchrec.train.config import TrainConfig

    pinned = TrainConfig().override(['distributed.sharding_types={"item_orig": "column_wise"}'])
    c = planner_constraints(pinned, {"item_orig": "sgd", "cate_orig": "sgd"},
                            {"item_orig": 16, "cate_orig": 24}, world_size=2)
    assert c["item_orig"].min_partition == 8 and c["cate_orig"].min_partition == 12
    c = planner_constraints(pinned, {"item_orig": "sgd"}, {"item_orig": 16}, world_size=4)
    assert c["item_orig"].min_partition == 4


def test_sharding_types_naming_an_unknown_table_are_refused():
    """Mutant sharding.py:185 (the unknown-table check dropped): a pin of a table the model does not
    have (an aux table of a plain model, a typo) is a ConfigError, not silently ignored."""
    from iacn_torchrec.distributed.sharding import planner_constraints
    from iacn_torchrec.train.config import ConfigError, TrainConfig

    pinned = TrainConfig().override(['distributed.sharding_types={"item_aux": "row_wise"}'])
    with pytest.raises(ConfigError, match=r"names unknown table\(s\) \['item_aux'\]"):
        planner_constraints(pinned, {"uid": "sgd", "item_orig": "sgd", "cate_orig": "sgd"})


# ----------------------------------------------------------------------------------------- reproduce
_ARM_OFF = {"base": 0.0, "iacn-d0.3-l1": 0.02, "iacn-d1-l0": 0.004, "iacn-d0.6-l1": 0.011}
_MODEL_AUC = {"din": 0.70, "wide_deep": 0.65, "dien": 0.72}


def _given_auc(model: str, L: int, arm: str, seed: int) -> float:
    """A distinct AUC per run: model + arm + length offsets and a seed noise that differs by arm."""
    noise = [0.0, 0.0031, 0.0012, 0.0047][seed] * {"base": 1.0, "iacn-d0.3-l1": 2.0, "iacn-d1-l0": 3.5,
                                                      "iacn-d0.6-l1": -1.0}[arm]
    return round(_MODEL_AUC[model] + _ARM_OFF[arm] + 0.0005 * L + noise, 6)


def _t(diffs: list[float]) -> float:
    return statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs)))


def _cells(md: str, first: str) -> list[str]:
    row = next(ln for ln in md.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_reproduce_tables_are_the_given_runs_aggregated(tmp_path):
    """Mutants reproduce.py:100 (δ = 1 not the λ = 0 control run), 149/154/158 (``--table2-seeds`` /
    ``--delta-seeds`` ignored), 332 (every IaCN arm trained with λ = 1, the control included), 990 (the
    base length's dataset left out when ``--lengths`` does not name it), 1024 (the runs' JSON AUC),
    and the markdown cells (columns, means ± sample SDs, paired lifts, t): ``iacn reproduce
    --no-train`` over finished runs whose AUCs are given, every figure recomputed by hand."""
    from iacn_torchrec.experiments import reproduce as rp

    _, data = prepare_planted(tmp_path / "d", num_users=60, seed=0)
    out, res = tmp_path / "runs", tmp_path / "res"
    argv = ["--data", str(data), "--name", "t", "--seeds", "3", "--table2-seeds", "4", "--delta-seeds", "2",
            "--lengths", "8,12", "--deltas", "0.3,0.6,1.0", "--models", "din,wide_deep",
            "--out", str(out), "--results", str(res), "--no-train"]
    p = __import__("argparse").ArgumentParser()
    rp.add_arguments(p)
    args = p.parse_args(argv)
    args.command_line = "iacn reproduce " + " ".join(argv)
    datasets = {L: rp.dataset_at_length(data, L) for L in (8, 12)} | {16: data}
    arms = {"base": rp.BASE, "iacn-d0.3-l1": rp.IACN, "iacn-d1-l0": rp.CONTROL,
            "iacn-d0.6-l1": rp.Arm("iacn-d0.6-l1", "δ=0.6", 0.6, 1.0)}
    want_runs = set()
    want_runs |= {("din", 16, a, s) for a in ("base", "iacn-d0.3-l1", "iacn-d1-l0") for s in range(3)}
    want_runs |= {("wide_deep", 16, a, s) for a in ("base", "iacn-d0.3-l1", "iacn-d1-l0") for s in range(3)}
    want_runs |= {("dien", L, a, s) for L in (8, 12) for a in ("base", "iacn-d0.3-l1", "iacn-d1-l0")
                  for s in range(4)}
    want_runs |= {("dien", 16, a, s) for a in ("base", "iacn-d0.3-l1", "iacn-d0.6-l1", "iacn-d1-l0")
                  for s in range(2)}
    for model, L, arm, seed in want_runs:
        rid = f"{model}-L{L}-{arm}-s{seed}"
        cfg = rp.make_config(args, rp.Run(rid, model, L, arms[arm], seed, datasets[L]), out).to_dict()
        (out / rid).mkdir(parents=True)
        auc = _given_auc(model, L, arm, seed)
        (out / rid / "metrics.json").write_text(json.dumps({
            "config": cfg, "test": {"auc": auc, "gauc": auc - 0.1, "logloss": 0.5, "samples": 10},
            "train_samples_per_s": 1000.0, "dataset": {"content_hash": None}, "versions": {}, "steps": 1}))
    # the arms' IaCN settings (the control is λ = 0, δ = 1: no IaCN gradient at all)
    arms = (("iacn-d0.3-l1", (0.3, 1.0)), ("iacn-d1-l0", (1.0, 0.0)), ("iacn-d0.6-l1", (0.6, 1.0)))
    for arm, (delta, lam) in arms:
        cfg = rp.make_config(args, rp.Run("x", "dien", 16, rp.delta_arm(delta), 0, data), out)
        assert (cfg.iacn.enabled, cfg.iacn.delta, cfg.iacn.lam) == (True, delta, lam), arm
    assert rp.delta_arm(1.0) is rp.CONTROL

    assert rp.run(args) == 0

    def aucs(model, L, arm, seeds):
        return {s: _given_auc(model, L, arm, s) for s in seeds}

    def lift_cell(a, b):
        common = sorted(set(a) & set(b))
        d = [a[s] - b[s] for s in common]
        sd = statistics.stdev(d)
        unpaired = statistics.fmean(a.values()) - statistics.fmean(b.values())
        return f"{statistics.fmean(d):+.4f} ± {sd:.4f} (unpaired {unpaired:+.4f})", _t(d)

    def cell(a):
        v = list(a.values())
        return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v):.4f} (n={len(v)})"

    def check_verdict(text, t, df_crit):
        m = __import__("re").fullmatch(
            r"(yes, above|yes, below|no) \(t = ([+-]\d+\.\d\d); 95 % needs ±(\d+\.\d\d)\)",
                                       text)
        assert m, text
        assert float(m.group(2)) == pytest.approx(t, abs=0.006) and float(m.group(3)) == df_crit
        want = "no" if abs(t) <= df_crit else ("yes, above" if t > 0 else "yes, below")
        assert m.group(1) == want, (text, t)

    t1 = (res / "table1.md").read_text()
    for model, label in (("din", "DIN"), ("wide_deep", "Wide&Deep")):
        base, iacn, ctrl = (aucs(model, 16, a, range(3)) for a in ("base", "iacn-d0.3-l1", "iacn-d1-l0"))
        c = _cells(t1, label)
        assert c[1:4] == [cell(base), cell(iacn), cell(ctrl)], c
        (lift, t), (lift_c, t_c) = lift_cell(iacn, base), lift_cell(iacn, ctrl)
        assert c[4] == lift and c[6] == lift_c, c
        check_verdict(c[5], t, 4.30)
        check_verdict(c[7], t_c, 4.30)
    t2 = (res / "table2.md").read_text()
    for L in (8, 12):
        base, iacn, ctrl = (aucs("dien", L, a, range(4)) for a in ("base", "iacn-d0.3-l1", "iacn-d1-l0"))
        c = _cells(t2, str(L))
        assert c[1:4] == [cell(base), cell(iacn), cell(ctrl)], c
        (lift, t), (lift_c, t_c) = lift_cell(iacn, base), lift_cell(iacn, ctrl)
        assert c[4] == lift and c[6] == lift_c, c
        check_verdict(c[5], t, 3.18)
        check_verdict(c[7], t_c, 3.18)
    assert not any(ln.startswith("| 16 |") for ln in t2.splitlines())  # the lengths asked for only
    dm = (res / "delta.md").read_text()
    base = aucs("dien", 16, "base", range(2))
    deltas = (("0.3", "iacn-d0.3-l1"), ("0.6", "iacn-d0.6-l1"), ("1 (control run: λ = 0)", "iacn-d1-l0"))
    for d, arm in deltas:
        a = aucs("dien", 16, arm, range(2))
        c = _cells(dm, d)
        lift, t = lift_cell(a, base)
        assert c[1:3] == [cell(a), lift], c
        check_verdict(c[3], t, 12.71)
    doc = json.loads((res / "delta.json").read_text())
    for rid, r in doc["runs"].items():
        assert r["test_auc"] == _given_auc(r["model"], r["max_len"], r["arm"], r["seed"]), rid
        assert r["config"]["iacn"]["lam"] == (0.0 if r["arm"] == "iacn-d1-l0" else 1.0 if r["arm"] != "base"
                                              else r["config"]["iacn"]["lam"])
    assert set(doc["runs"]) == {f"dien-16-{a}-s{s}".replace("-16-", "-L16-")
                                for a in ("base", "iacn-d0.3-l1", "iacn-d0.6-l1", "iacn-d1-l0")
                                for s in range(2)}
    t2doc = json.loads((res / "table2.json").read_text())
    assert {k: v["lift"]["n"] for k, v in t2doc["summary"].items()} == {"8": 4, "12": 4}


def test_an_exported_model_reads_at_most_l_history_positions(tmp_path):
    """The served model's contract: each row's history is its first min(hist_lengths, L) positions.
    A length past L must score as L (DLRM's plug-in divides its history sum by the length it gets)."""
    from iacn_torchrec.serving.export import ServingModel, trace_serving_model

    _, data = prepare_planted(tmp_path, num_users=60, seed=1)
    for name in ("dlrm", "wide_deep", "din"):
        out = _train(data, tmp_path / name, name, True, emb_dim=16, steps=3)
        traced = trace_serving_model(ServingModel.from_model(load_run(out).model))
        s = ServingModel.from_model(load_run(out).model)
        g, B, L = torch.Generator().manual_seed(0), 4, s.max_len
        x = [torch.randint(1, t.num_embeddings, shape, generator=g)
             for t, shape in ((s.user_table, (B,)), (s.item_table, (B,)), (s.cate_table, (B,)),
                              (s.item_table, (B, L)), (s.cate_table, (B, L)))]
        with torch.no_grad():
            at_l, past_l = traced(*x, torch.full((B,), L)), traced(*x, torch.full((B,), L + 5))
        assert torch.equal(at_l, past_l), name
