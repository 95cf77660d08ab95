"""Serving: export (merged E_orig ⊕ E_aux tables, IaCN dropped), scoring raw files, the benchmark.

Runs are trained for a few steps on the planted-interest synthetic data (prepared through the real
``tsv`` pipeline), so every check goes through ``iacn train`` → ``iacn export`` → ``iacn score``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import prepare_planted

from iacn_torchrec.data.loader import BatchLoader, PreparedDataset
from iacn_torchrec.data.sources import DataError
from iacn_torchrec.serving.artifact import ServingArtifact, auc, pad_last
from iacn_torchrec.serving.export import MergedTable, ServingModel, export_run, graph_text, load_run
from iacn_torchrec.serving.score import read_samples, score_file
from iacn_torchrec.train.config import TrainConfig
from iacn_torchrec.train.loop import train

REPO = Path(__file__).resolve().parents[1]
# exported vs eager: the same kernels on the same numbers except the history slice (L vs the
# batch's longest history), which only adds exact zeros; allow float-summation-order noise.
ATOL = 1e-6


def dequantised_rows(packed: torch.Tensor) -> torch.Tensor:
    """The float rows ``q·scale + bias`` that a packed 8-bit table (``MergedTable.weight_packed``,
    ``[N, d + 8]`` uint8: ``d`` bytes, then float32 scale and bias) holds: ``[N, d]``."""
    d = packed.shape[1] - 8
    scale_bias = packed[:, d:].contiguous().view(torch.float32)  # [N, 2]
    return packed[:, :d].float() * scale_bias[:, :1] + scale_bias[:, 1:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_planted(tmp_path_factory.mktemp("planted"), num_users=200, seed=1)[1]


def _train(data_dir: Path, out: Path, model: str, iacn: bool, emb_dim: int = 18, steps: int = 20) -> Path:
    cfg = TrainConfig.from_dict(
        {
            "data": {"path": str(data_dir), "batch_size": 32},
            "model": {"name": model, "emb_dim": emb_dim, "user_dim": 18},
            "iacn": {"enabled": iacn},
            "max_steps": steps,
            "out": str(out),
            "progress": False,
            "resume": False,
            "threads": 2,
            "seed": 3,
        }
    )
    train(cfg)
    return out


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "din": _train(data_dir, root / "din", "din", True, steps=40),
        "dien": _train(data_dir, root / "dien", "dien", True, steps=8),
        "wide_deep": _train(data_dir, root / "wd", "wide_deep", True, steps=8),
        "dlrm": _train(data_dir, root / "dlrm", "dlrm", True, steps=8),
        # plain DIN of the same width as DIN+IaCN (orig 18 + aux 18 = 36)
        "din_plain36": _train(data_dir, root / "plain", "din", False, emb_dim=36, steps=5),
    }


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, run_dir in runs.items():
        export_run(run_dir, root / name, check_samples=None, int8=name == "din")
        out[name] = root / name
    return out


def _eager(run_dir: Path, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eager CTRWithIaCN.predict over the test split in file order, batches of ``batch_size``."""
    r = load_run(run_dir)
    tl = r.test_loader
    loader = BatchLoader(
        r.ds, "test", batch_size=batch_size, with_neg_hist=tl.with_neg_hist, iacn_negatives=tl.iacn_negatives
    )
    with torch.no_grad():
        probs = np.concatenate([r.model.predict(b).numpy() for b in loader])
    return probs, np.asarray(r.ds.split("test").label)


def _write_tsv(ds: PreparedDataset, path: Path, rows: np.ndarray | None = None) -> None:
    """The test split as raw-id TSV (user_id, item_id, history, label)."""
    s = ds.split("test")
    U, Id = ["<pad>"] + ds.vocab("uid"), ["<pad>"] + ds.vocab("item")
    rows = np.arange(len(s)) if rows is None else rows
    with open(path, "w") as f:
        f.write("user_id\titem_id\thistory\tlabel\n")
        for r in rows:
            h = s.hist_item[s.hist_offsets[r] : s.hist_offsets[r + 1]]
            f.write(f"{U[s.uid[r]]}\t{Id[s.item[r]]}\t{'|'.join(Id[i] for i in h)}\t{s.label[r]}\n")


# ------------------------------------------------------------------------------------------ units
def test_pad_last_keeps_the_most_recent_items():
    values = np.array([1, 2, 3, 4, 5, 6, 7])
    padded, kept = pad_last(values, np.array([2, 0, 5]), 3)
    np.testing.assert_array_equal(padded, [[1, 2, 0], [0, 0, 0], [5, 6, 7]])
    np.testing.assert_array_equal(kept, [2, 0, 3])


def test_auc_matches_pairwise_count():
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.4, 0.3, 0.1])
    # positives 0.9, 0.4, 0.3 vs negatives 0.8, 0.4, 0.1: wins 3 + (1 + 0.5) + 1 = 5.5 of 9
    assert auc(labels, scores) == pytest.approx(5.5 / 9)


def test_int8_table_error_is_within_half_a_step():
    """A packed 8-bit table holds per row ``d`` bytes and its float32 scale (max − min) / 255 and
    bias (min); a lookup of any id shape returns those rows dequantised, within half a step of the
    float rows."""
    torch.manual_seed(0)
    w = torch.randn(50, 12)
    q = MergedTable(w, int8=True)
    assert q.weight_packed.dtype == torch.uint8 and q.weight_packed.shape == (50, 12 + 8)
    scale_bias = q.weight_packed[:, 12:].contiguous().view(torch.float32)
    step = (w.max(1).values - w.min(1).values) / 255
    torch.testing.assert_close(scale_bias[:, 0], step)
    torch.testing.assert_close(scale_bias[:, 1], w.min(1).values)
    deq = dequantised_rows(q.weight_packed)
    assert bool(((deq - w).abs() <= step[:, None] / 2 + 1e-6).all())
    ids = torch.randint(0, 50, (7, 5))
    torch.testing.assert_close(q(ids), deq[ids], rtol=0, atol=1e-6)  # a fused multiply-add: rounding
    torch.testing.assert_close(q(torch.arange(50)), deq, rtol=0, atol=1e-6)
    assert q(ids[:0]).shape == (0, 5, 12)


# ------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("name", ["din", "dien", "wide_deep", "dlrm"])
def test_merged_tables_are_orig_concat_aux(runs, name):
    """Every item-side table is exactly ``E_orig ⊕ E_aux`` row by row; the user table is the trained one."""
    r = load_run(runs[name])
    s = ServingModel.from_model(r.model)
    orig = dict(r.model.embeddings.orig.embeddings.items())
    aux = dict(r.model.embeddings.aux.embeddings.items())
    for kind, table in (("item", s.item_table), ("cate", s.cate_table)):
        want = torch.cat([orig[f"{kind}_orig"].weight, aux[f"{kind}_aux"].weight], 1)
        torch.testing.assert_close(table.weight, want, rtol=0, atol=0)
    assert torch.equal(s.user_table.weight, orig["uid"].weight)
    assert not any("iacn" in n for n, _ in s.named_modules())


@pytest.mark.parametrize("name", ["din", "dien", "wide_deep", "dlrm"])
def test_exported_scores_equal_eager_on_test_split(runs, exported, name):
    m = json.loads((exported[name] / "manifest.json").read_text())
    assert m["checks"]["max_abs_diff_vs_eager"] <= ATOL
    # which training produced it: the run's whole configuration, its seed included
    assert m["run"]["config"] == load_run(runs[name]).config.to_dict()
    # odd batch size: the eager model trims each batch to its longest history (< L here), the
    # exported one always runs the full L
    eager, labels = _eager(runs[name], batch_size=7)
    art = ServingArtifact.load(exported[name])
    ds = PreparedDataset.open(load_run(runs[name]).ds.path)
    s = ds.split("test")
    assert int(np.diff(s.hist_offsets).max()) < ds.max_len
    assert m["checks"]["samples"] == len(s)  # check_samples=None: the whole test split
    from iacn_torchrec.serving.export import split_inputs

    inputs, _ = split_inputs(ds)
    with torch.no_grad():
        got = np.concatenate(
            [art.model(*(t[i : i + 5] for t in inputs)).numpy() for i in range(0, len(s), 5)]
        )
    np.testing.assert_allclose(got, eager, rtol=0, atol=ATOL)
    assert m["checks"]["auc_exported"] == pytest.approx(auc(labels, eager), abs=1e-6)


@pytest.mark.parametrize("name", ["din", "dien"])
def test_the_exported_jagged_path_equals_the_padded_model_on_any_batch(runs, exported, name):
    """DIN's and DIEN's exports run on the real behaviours only: a traced packing, and DIEN's two
    recurrences scripted so that the step sizes are read when the artefact runs (a trace would keep
    the example's). Against the main model on the padded history (DIEN: ``nn.GRU`` and the AUGRU
    loop), on batches unlike the trace's example: one row, rows or a whole batch without behaviours,
    full-length histories, lengths above L, a random batch."""
    from iacn_torchrec.modules.embeddings import EmbeddedBatch

    r = load_run(runs[name])
    art = ServingArtifact.load(exported[name]).model
    s = ServingModel.from_model(r.model)
    L = s.max_len
    text = graph_text(art)
    assert "fbgemm" not in text  # plain TorchScript: nothing the artefact's loader lacks
    assert ("prim::Loop" in text) == (name == "dien")  # the recurrences' steps, read at run time
    g = torch.Generator().manual_seed(0)

    def padded_model(uid, item, cate, hist_item, hist_cate, lengths):
        mask = torch.arange(L) < lengths.unsqueeze(1)
        hist = torch.cat([s.item_table(hist_item), s.cate_table(hist_cate)], 2) * mask.unsqueeze(-1)
        target = torch.cat([s.item_table(item), s.cate_table(cate)], 1)
        emb = EmbeddedBatch(s.user_table(uid), target, hist, lengths.clamp(max=L))
        return torch.sigmoid(s.main_model(emb)[0])

    def ids(table, *shape):
        return torch.randint(1, table.num_embeddings, shape, generator=g)

    cases = [[3], [0], [0, 0, 0], [L, L], [L + 5, 2, 0, 7, 1],
             torch.randint(0, L + 1, (50,), generator=g).tolist()]
    for lengths in cases:
        B = len(lengths)
        x = (ids(s.user_table, B), ids(s.item_table, B), ids(s.cate_table, B), ids(s.item_table, B, L),
             ids(s.cate_table, B, L), torch.tensor(lengths))
        with torch.no_grad():
            torch.testing.assert_close(art(*x), padded_model(*x), rtol=0, atol=ATOL, msg=f"lengths {lengths}")
    # what is traced: the item table looks up the targets [B] and the real behaviours [N], never [B, L]
    looked_up = []
    s.item_table.register_forward_hook(lambda m, args, out: looked_up.append(tuple(args[0].shape)))
    with torch.no_grad():
        s(*x)
    n = int(torch.tensor(cases[-1]).clamp(max=L).sum())
    assert r.model.main_model.reads_jagged_history and looked_up == [(50,), (n,)]


def test_a_sharded_run_exports_from_its_assembled_shards(data_dir, tmp_path):
    """A run with a fused table optimizer (TorchRec's DMP, tables as ShardedTensors) exports: the
    tables are assembled from the checkpoint's shards, and the rebuilt unsharded model scores the
    test split exactly as the training run's own final evaluation did."""
    cfg = TrainConfig.from_dict({
        "data": {"path": str(data_dir), "batch_size": 32},
        "model": {"name": "din", "emb_dim": 16, "user_dim": 16},
        "iacn": {"enabled": True, "aux_dim": 16},
        "optim": {"embedding_optimizer": "sgd"},
        "max_steps": 8, "out": str(tmp_path / "run"), "progress": False, "resume": False, "seed": 3,
    })
    trained = train(cfg)
    m = export_run(tmp_path / "run", tmp_path / "model", check_samples=None)
    assert m["checks"]["max_abs_diff_vs_eager"] <= ATOL
    assert m["checks"]["auc_eager"] == pytest.approx(trained["test"]["auc"], abs=1e-6)
    # --force replaces an earlier export, never a folder of something else
    with pytest.raises(FileExistsError, match="pass --force"):
        export_run(tmp_path / "run", tmp_path / "model")
    export_run(tmp_path / "run", tmp_path / "model", check_samples=64, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an exported model"):
        export_run(tmp_path / "run", tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_iacn_model_exports_to_the_same_graph_as_plain_model_of_same_width(exported):
    iacn = json.loads((exported["din"] / "manifest.json").read_text())
    plain = json.loads((exported["din_plain36"] / "manifest.json").read_text())
    dien = json.loads((exported["dien"] / "manifest.json").read_text())
    assert iacn["iacn_trained"] and not plain["iacn_trained"]
    assert iacn["graph_sha256"] == plain["graph_sha256"]
    assert iacn["graph_sha256"] != dien["graph_sha256"]  # the signature does tell graphs apart
    a = torch.jit.load(str(exported["din"] / "model.pt"))
    b = torch.jit.load(str(exported["din_plain36"] / "model.pt"))
    assert graph_text(a) == graph_text(b)
    assert "aten::embedding" in graph_text(a) and "iacn" not in graph_text(a).replace("iacn_torchrec", "")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert iacn["tables"]["item"]["merged_from"] == ["item_orig", "item_aux"]


def test_int8_artefact_reports_auc_change(exported):
    """The int8 artefact really holds 8-bit tables and scores close to, but not exactly as, the
    float one; the manifest's figures are those scores'."""
    from iacn_torchrec.serving.export import split_inputs

    m = json.loads((exported["din"] / "manifest.json").read_text())
    q = m["checks"]["int8"]
    art_q = ServingArtifact.load(exported["din"], int8=True)
    art_f = ServingArtifact.load(exported["din"])
    assert any(t.dtype == torch.uint8 for t in art_q.model.state_dict().values())
    assert not any(t.dtype == torch.uint8 for t in art_f.model.state_dict().values())
    inputs, labels = split_inputs(load_run(m["run"]["path"]).ds)
    with torch.no_grad():
        p_q, p_f = art_q.model(*inputs).numpy(), art_f.model(*inputs).numpy()
    diff = float(np.abs(p_q - p_f).max())
    assert 0 < diff < 0.05 and diff == pytest.approx(q["max_abs_score_diff"], abs=1e-6)
    assert q["auc_int8"] == pytest.approx(auc(labels, p_q), abs=1e-6)
    assert q["auc_change"] == pytest.approx(auc(labels, p_q) - auc(labels, p_f), abs=1e-6)
    assert abs(q["auc_change"]) < 0.01


def test_corrupted_artefact_is_refused(exported, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported["wide_deep"], bad)
    (bad / "vocab" / "item.tsv").write_text("x\t1\n")
    with pytest.raises(ValueError, match="vocab/item.tsv: corrupted"):
        ServingArtifact.load(bad)


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _rehash(d: Path, rel: str) -> None:
    """Record ``rel``'s current sha256 in the manifest (a consistent but wrong artefact)."""
    from iacn_torchrec.serving.artifact import file_sha256

    _edit_manifest(d, lambda m: m["files"].__setitem__(rel, file_sha256(d / rel)))


def test_every_file_the_artefact_reads_must_be_listed_in_the_manifest(exported, tmp_path):
    """A file dropped from the manifest's list could be swapped unnoticed: refused, naming it."""
    for rel in ("item2cate.npy", "vocab/item.tsv", "vocab/cate.tsv", "model.pt"):
        bad = tmp_path / rel.replace("/", "-")
        shutil.copytree(exported["wide_deep"], bad)
        _edit_manifest(bad, lambda m, rel=rel: m["files"].pop(rel))
        if rel == "item2cate.npy":  # the reviewer's case: wrong categories, scored with rc 0
            np.save(bad / rel, np.zeros_like(np.load(bad / rel)))
        with pytest.raises(ValueError, match=rf"{rel}: not listed in manifest.json's files"):
            ServingArtifact.load(bad)
    bad = tmp_path / "int8"  # the int8 model too, when it is the one loaded
    shutil.copytree(exported["din"], bad)
    _edit_manifest(bad, lambda m: m["files"].pop("model_int8.pt"))
    ServingArtifact.load(bad)  # not read: the float model loads
    with pytest.raises(FileNotFoundError, match="no model_int8.pt"):
        ServingArtifact.load(bad, int8=True)


def test_a_malformed_artefact_is_a_one_line_score_error(exported, runs, tmp_path, capsys):
    """A manifest of the wrong shape, or one whose figures disagree with the model's own shapes
    (even with every sha256 right), is reported in one line, exit status 2 — no traceback."""
    from iacn_torchrec.cli import main

    items = load_run(runs["wide_deep"]).ds.vocab("item")
    (tmp_path / "in.tsv").write_text(f"user_id\titem_id\thistory\nu\t{items[2]}\t{items[0]}|{items[1]}\n")

    def short_item2cate(d):
        np.save(d / "item2cate.npy", np.zeros(5, dtype=np.int64))
        _rehash(d, "item2cate.npy")

    def big_vocab_index(d):
        with open(d / "vocab" / "item.tsv", "a") as f:
            f.write("NEW-ITEM\t99999\n")
        _rehash(d, "vocab/item.tsv")

    cases = {
        "nofiles": (lambda d: _edit_manifest(d, lambda m: m.pop("files")),
                    r"manifest.json: field 'files' is"),
        "list": (lambda d: (d / "manifest.json").write_text("[]"), r"manifest.json: expected a JSON object"),
        "maxlen": (lambda d: _edit_manifest(d, lambda m: m["dims"].__setitem__("max_len", 10)),
                   r"manifest.json: dims.max_len is 10 but model.pt was traced for L = 16"),
        "nodims": (lambda d: _edit_manifest(d, lambda m: m.pop("dims")),
                   r"manifest.json: field 'dims.max_len'"),
        "short": (short_item2cate, r"item2cate.npy: int64 \[5\], but model.pt's item table has \d+ rows"),
        "vocab": (big_vocab_index, r"vocab/item.tsv: index 99999 past the model's item table"),
    }
    for name, (edit, error) in cases.items():
        bad = tmp_path / name
        shutil.copytree(exported["wide_deep"], bad)
        edit(bad)
        rc = main(["score", "--model", str(bad), "--input", str(tmp_path / "in.tsv"),
                   "--out", str(tmp_path / f"{name}.out"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"iacn score: {bad}/") and err.count("\n") == 1, (name, err)
        assert re.search(error, err), (name, err)
        assert not (tmp_path / f"{name}.out").exists()


# ------------------------------------------------------------------------------------------- score
@pytest.mark.parametrize("name", ["din", "dien"])
def test_artefact_scores_in_a_fresh_process_without_training_code(runs, exported, tmp_path, name):
    """The artefact, DIEN's scripted recurrences included, scores without the library's training
    code (nor torchrec / fbgemm) loaded, as the eager model scores."""
    ds = load_run(runs[name]).ds
    _write_tsv(ds, tmp_path / "in.tsv")
    code = (
        "import json, sys\n"
        "from iacn_torchrec.cli import main\n"
        f"rc = main(['score', '--model', {str(exported[name])!r}, '--input', {str(tmp_path / 'in.tsv')!r}, "
        f"'--out', {str(tmp_path / 'out.tsv')!r}, '--batch-size', '64'])\n"
        "print(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    banned = (
        "torchrec",
        "fbgemm_gpu",
        "iacn_torchrec.modules",
        "iacn_torchrec.models",
        "iacn_torchrec.train",
        "iacn_torchrec.distributed",
        "iacn_torchrec.serving.export",
        "iacn_torchrec.data.loader",
    )
    loaded = [m for m in res["modules"] if m.startswith(banned)]
    assert loaded == [], loaded
    got = np.loadtxt(tmp_path / "out.tsv", skiprows=1, usecols=2, delimiter="\t")
    eager, _ = _eager(runs[name], batch_size=64)
    np.testing.assert_allclose(got, eager, rtol=0, atol=1e-6)  # written with 6 decimals


def test_unknown_ids_map_to_the_unknown_row_and_are_counted(runs, exported, tmp_path):
    art = ServingArtifact.load(exported["din"])
    r = load_run(runs["din"])
    items = r.ds.vocab("item")
    users = r.ds.vocab("uid")
    long_hist = items[:20]  # longer than L = 16
    (tmp_path / "in.tsv").write_text(
        "user_id\titem_id\thistory\n"
        f"NO-SUCH-USER\t{items[3]}\t{items[0]}|{items[1]}\n"
        f"{users[0]}\tNO-SUCH-ITEM\t{items[0]} NO-SUCH-HIST {items[2]}\n"
        f"{users[1]}\t{items[4]}\t{'|'.join(long_hist)}\n"
        f"{users[2]}\t{items[5]}\t\n"
    )
    s = score_file(exported["din"], tmp_path / "in.tsv", tmp_path / "out.tsv", progress=False)
    assert s["unknown_ids"] == {"uid": 1, "item": 1, "hist_item": 1}
    assert s["histories_truncated"] == 1 and s["rows"] == 4
    got = np.loadtxt(tmp_path / "out.tsv", skiprows=1, usecols=2, delimiter="\t")

    i2c = r.ds.item2cate
    L = r.ds.max_len

    def row(u, it, hist):
        h = np.zeros(L, np.int64)
        h[: len(hist)] = hist
        return [u, it, int(i2c[it]), h, i2c[h] * (np.arange(L) < len(hist)), len(hist)]

    rows = [row(0, 4, [1, 2]), row(1, 0, [1, 0, 3]), row(2, 5, list(range(5, 21))), row(3, 6, [])]
    cols = [torch.tensor(np.array([x[k] for x in rows]), dtype=torch.long) for k in range(6)]
    with torch.no_grad():
        want = art.model(*cols).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # --mark-unknown: each row says which of its ids were unknown (the scores are the same)
    score_file(exported["din"], tmp_path / "in.tsv", tmp_path / "marked.tsv", progress=False,
               mark_unknown=True)
    lines = (tmp_path / "marked.tsv").read_text().splitlines()
    assert lines[0] == "user_id\titem_id\tscore\tunknown"
    assert [ln.split("\t")[3] if ln.count("\t") == 3 else None for ln in lines[1:]] == [
        "user", "item,history:1", "", ""]
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "marked.tsv", skiprows=1, usecols=2, delimiter="\t"),
                                  got)


def test_unknown_history_ids_cut_by_the_truncation_are_not_counted(runs, exported, tmp_path):
    """Only the last L history ids are scored: an unknown id before them is neither counted nor
    marked; one among them is."""
    items = load_run(runs["din"]).ds.vocab("item")
    L = ServingArtifact.load(exported["din"]).max_len
    kept = items[:L]
    (tmp_path / "in.tsv").write_text(
        "user_id\titem_id\thistory\n"
        f"NO-SUCH-USER\t{items[3]}\t{'|'.join(['CUT-UNKNOWN', *kept])}\n"  # L + 1 ids: the unknown is cut
        f"NO-SUCH-USER\t{items[3]}\t{'|'.join(['CUT-UNKNOWN', *kept[1:], 'KEPT-UNKNOWN'])}\n"
    )
    s = score_file(exported["din"], tmp_path / "in.tsv", tmp_path / "out.tsv", progress=False,
                   mark_unknown=True)
    assert s["unknown_ids"] == {"uid": 2, "item": 0, "hist_item": 1}
    assert s["histories_truncated"] == 2 and s["history_ids"] == 2 * L
    marks = [ln.split("\t")[3] for ln in (tmp_path / "out.tsv").read_text().splitlines()[1:]]
    assert marks == ["user", "user,history:1"]


def test_dien_rows_mark_their_unknown_categories(runs, exported, tmp_path):
    """DIEN files carry their categories: --mark-unknown names unknown ones per row (as ``cate``,
    ``hist_cate:K``), and the marks add up to the summary's counts."""
    ds = load_run(runs["din"]).ds
    U, Id, C = ds.vocab("uid"), ds.vocab("item"), ds.vocab("cate")
    x = chr(2)
    (tmp_path / "local_test").write_text(
        f"1\t{U[0]}\t{Id[0]}\tNO-CAT\t{Id[1]}{x}{Id[2]}\t{C[0]}{x}NO-CAT2\n"
        f"0\t{U[1]}\t{Id[3]}\t{C[1]}\t{Id[4]}{x}NO-ITEM\t{C[1]}{x}{C[2]}\n"
        f"0\t{U[1]}\t{Id[3]}\t{C[1]}\t{Id[4]}\t{C[1]}\n"
    )
    s = score_file(exported["din"], tmp_path / "local_test", tmp_path / "out.tsv", progress=False,
                   mark_unknown=True)
    assert s["unknown_ids"] == {"uid": 0, "item": 0, "hist_item": 1, "cate": 1, "hist_cate": 1}
    marks = [ln.split("\t")[4] for ln in (tmp_path / "out.tsv").read_text().splitlines()[1:]]
    assert marks == ["cate,hist_cate:1", "history:1", ""]


def test_dien_local_test_format_is_read(runs, exported, tmp_path):
    r = load_run(runs["din"])
    ds = r.ds
    s = ds.split("test")
    U, Id, C = ["<pad>"] + ds.vocab("uid"), ["<pad>"] + ds.vocab("item"), ["<pad>"] + ds.vocab("cate")
    rows = range(6)
    with open(tmp_path / "local_test", "w") as f:
        for k in rows:
            h = s.hist_item[s.hist_offsets[k] : s.hist_offsets[k + 1]]
            hc = s.hist_cate[s.hist_offsets[k] : s.hist_offsets[k + 1]]
            f.write(
                f"{s.label[k]}\t{U[s.uid[k]]}\t{Id[s.item[k]]}\t{C[s.cate[k]]}\t"
                f"{chr(2).join(Id[i] for i in h)}\t{chr(2).join(C[c] for c in hc)}\r\n"
            )
    raw = read_samples(tmp_path / "local_test")
    assert raw.format == "dien" and raw.cate is not None
    summary = score_file(exported["din"], tmp_path / "local_test", tmp_path / "out.tsv", progress=False)
    assert summary["unknown_ids"] == {"uid": 0, "item": 0, "hist_item": 0, "cate": 0, "hist_cate": 0}
    got = np.loadtxt(tmp_path / "out.tsv", skiprows=1, usecols=2, delimiter="\t")
    eager, _ = _eager(runs["din"], batch_size=6)
    np.testing.assert_allclose(got, eager[:6], rtol=0, atol=1e-6)


def test_bad_score_input_names_file_line_and_field(tmp_path):
    cases = {  # file text -> the error naming file, line and field
        "user_id\titem\thistory\nu\ti\t\n": r"line 1: missing column\(s\) \['item_id'\]",
        "user_id\titem_id\thistory\tlabel\nu\ti\tx\t1\n\nu\ti\tx\tyes\n": r"line 4: field 'label': 'yes'",
        "1\tu\ti\tc\ta\x02b\tc\n": r"line 1: field 'hist_cats' has 1 entries but 'hist_mids' has 2",
        # a row of empty fields is an error, not a blank line; extra fields too
        "user_id\titem_id\thistory\nu1\ti\tx\n\t\t\nu3\ti\tx\n": r"line 3: field 'user_id' is empty",
        "user_id\titem_id\thistory\nu1\ti\tx\textra\n": r"line 2: malformed line: 4 tab-separated fields",
        # too few fields, where the missing one is not a trailing history
        "user_id\titem_id\thistory\tlabel\nu1\ti\n": r"line 2: malformed line: 2 tab-separated fields, the "
                                                   r"header has 4",
        "user_id\titem_id\thistory\nu1\n": r"line 2: malformed line: 1 tab-separated fields",
        "user_id\titem_id\thistory\tlabel\n\n": r"no data lines",  # a header alone: nothing to score
    }
    for k, (text, error) in enumerate(cases.items()):
        (tmp_path / f"{k}.tsv").write_text(text)
        with pytest.raises(DataError, match=rf"{k}\.tsv: {error}"):
            read_samples(tmp_path / f"{k}.tsv")
    # ids are stripped, as the training readers strip them
    (tmp_path / "f.tsv").write_text("user_id\titem_id\thistory\n u1 \t i \tx\n\nu2\tj\t\nu3\tk\n")
    s = read_samples(tmp_path / "f.tsv")  # u3: a trailing empty history without its tab
    assert (s.user, s.item, s.hist_len.tolist()) == (["u1", "u2", "u3"], ["i", "j", "k"], [1, 0, 0])


def test_score_refuses_to_write_over_its_own_input(exported, tmp_path, monkeypatch, capsys):
    """--out naming the --input file (as typed, through a symlink or a hard link) is refused before
    anything is read; the input is left as it was."""
    from iacn_torchrec.cli import main

    monkeypatch.chdir(tmp_path)
    text = "user_id\titem_id\thistory\nu1\ti1\t\n"
    Path("in.tsv").write_text(text)
    Path("sub").mkdir()
    os.symlink("in.tsv", "link.tsv")
    os.link("in.tsv", "hard.tsv")
    for given, out in [("in.tsv", "in.tsv"), ("in.tsv", "sub/../in.tsv"), ("link.tsv", "in.tsv"),
                       ("in.tsv", "link.tsv"), ("hard.tsv", "in.tsv")]:
        assert main(["score", "--model", str(exported["din"]), "--input", given, "--out", out]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"iacn score: --out {out} is the --input file; choose another path\n"
        assert captured.out == "" and Path("in.tsv").read_text() == text
    # a header alone is an error, not an empty result
    Path("header.tsv").write_text("user_id\titem_id\thistory\n")
    assert main(["score", "--model", str(exported["din"]), "--input", "header.tsv"]) == 2
    assert capsys.readouterr().err == "iacn score: header.tsv: no data lines\n"
    assert not Path("header.tsv.scores.tsv").exists()


def test_bench_serve_reports_every_variant_and_batch_size(runs, exported):
    from iacn_torchrec.serving.bench import bench_serve

    res = bench_serve(
        str(runs["din"]), str(exported["din"]), batch_sizes=(1, 8), min_seconds=0.01, max_batches=2
    )
    got = {(r["variant"], r["batch_size"]) for r in res["rows"]}
    assert got == {(v, b) for v in ("eager", "exported", "exported_int8") for b in (1, 8)}
    assert all(r["samples_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in res["rows"])
    # what was timed: the artefact (its graph) and the data it was checked against
    manifest = json.loads((exported["din"] / "manifest.json").read_text())
    assert res["exported_model"] == str(exported["din"])
    assert res["exported_model_graph_sha256"] == manifest["graph_sha256"]
    assert res["data_content_hash"] == manifest["data"]["content_hash"] and res["min_seconds"] == 0.01


def test_bench_serve_prints_how_many_calls_each_latency_rests_on(runs, exported, capsys):
    from iacn_torchrec.cli import main

    assert main(["bench", "serve", "--run", str(runs["din"]), "--model", str(exported["din"]),
                 "--batch-sizes", "2", "--min-seconds", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-1] == "calls"
    assert all(int(ln.split()[-1].replace(",", "")) >= 1 for ln in lines[2:5])


def test_bench_serve_counts_the_rows_really_scored(runs, exported):
    """A batch size beyond the test split times the whole split: samples/s counts its rows, not the
    size asked for."""
    from iacn_torchrec.serving.bench import bench_serve

    n = len(load_run(runs["din"]).ds.split("test"))
    res = bench_serve(str(runs["din"]), str(exported["din"]), batch_sizes=(10 * n,), min_seconds=0.01,
                      max_batches=1)
    for r in res["rows"]:
        assert r["samples_per_s"] == pytest.approx(n / (r["mean_ms"] / 1e3), rel=1e-9)
        assert (r["batch_size"], r["rows_per_batch"]) == (10 * n, n)


def test_bench_serve_refuses_another_runs_or_a_damaged_artefact(runs, exported, tmp_path, capsys):
    """--model must be this run's export (else another model is timed against this eager one), and a
    damaged artefact is a one-line error, as `iacn score` says it."""
    from iacn_torchrec.cli import main

    args = ["bench", "serve", "--run", str(runs["din"]), "--batch-sizes", "1", "--min-seconds", "0.01"]
    assert main([*args, "--model", str(exported["wide_deep"])]) == 2
    assert capsys.readouterr().err == (
        f"iacn bench serve: {exported['wide_deep']}: not an export of {runs['din']}: its model 'wide_deep' "
        "(the run's 'din'); export this run (iacn export --run RUN) or leave out --model\n")
    bad = tmp_path / "bad"
    shutil.copytree(exported["din"], bad)
    with open(bad / "vocab" / "item.tsv", "a") as f:
        f.write("x\t99999\n")
    assert main([*args, "--model", str(bad)]) == 2
    assert capsys.readouterr().err == (f"iacn bench serve: {bad / 'vocab' / 'item.tsv'}: corrupted (sha256 "
                                       "differs from manifest.json)\n")


def test_bench_serve_refuses_batch_sizes_below_one(runs, capsys):
    from iacn_torchrec.cli import main

    for sizes in ("0", "-4", "1,0", ""):
        assert main(["bench", "serve", "--run", str(runs["din"]), f"--batch-sizes={sizes}"]) == 2
        err = capsys.readouterr().err
        assert err == f"iacn bench serve: --batch-sizes {sizes!r}: expected sizes >= 1, e.g. 1,64,1024\n"


def test_export_refuses_a_run_without_a_checkpoint_or_without_a_step(data_dir, tmp_path):
    from iacn_torchrec.serving.export import ExportError

    untrained = tmp_path / "zero"
    train(TrainConfig.from_dict({"data": {"path": str(data_dir), "batch_size": 100_000, "drop_last": True},
                                 "iacn": {"enabled": True}, "out": str(untrained), "progress": False}))
    with pytest.raises(ExportError, match="step 0: the run trained no step"):
        export_run(untrained, tmp_path / "m0")
    with pytest.raises(ExportError, match=r"no complete checkpoint of step 7; the run has \[0\]"):
        export_run(untrained, tmp_path / "m0", step=7)
    shutil.rmtree(untrained / "checkpoints")  # as if stopped before its first checkpoint
    with pytest.raises(ExportError, match=r"no complete checkpoint under .* yet"):
        export_run(untrained, tmp_path / "m1")


def test_export_step_exports_that_older_checkpoint(data_dir, tmp_path, capsys):
    """``iacn export --step N`` of an older, intact checkpoint writes *that* step's weights: every
    table of the artefact is the step-N checkpoint file's ``E_orig ⊕ E_aux`` (and its main model is
    the checkpoint's), not the newest step's, which the default export holds; the two artefacts
    score the test split differently."""
    from iacn_torchrec.cli import main

    cfg = TrainConfig.from_dict({
        "data": {"path": str(data_dir), "batch_size": 32},
        "model": {"name": "din", "emb_dim": 8, "user_dim": 8},
        "iacn": {"enabled": True},
        "max_steps": 6, "checkpoint_every": 3, "out": str(tmp_path / "run"), "progress": False,
        "resume": False, "threads": 2, "seed": 3,
    })
    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000003", "step_00000006"]

    def checkpoint_model(step: int) -> dict[str, torch.Tensor]:
        # read straight from the checkpoint file, not through the export's loader
        return torch.load(ckpts / f"step_{step:08d}" / "rank0.pt", weights_only=False)["model"]

    def want_served(step: int) -> dict[str, torch.Tensor]:
        m = checkpoint_model(step)

        def table(collection: str, name: str) -> torch.Tensor:
            return m[f"embeddings.{collection}.embeddings.{name}.weight"]

        want = {
            "user_table.weight": table("orig", "uid"),
            "item_table.weight": torch.cat([table("orig", "item_orig"), table("aux", "item_aux")], 1),
            "cate_table.weight": torch.cat([table("orig", "cate_orig"), table("aux", "cate_aux")], 1),
        }
        return want | {k: v for k, v in m.items() if k.startswith("main_model.")}

    old, new = want_served(3), want_served(6)
    assert not torch.equal(old["item_table.weight"], new["item_table.weight"])  # the steps do differ

    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m3"), "--step", "3",
                 "--check-samples", "0"]) == 0
    printed = capsys.readouterr().out
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m6"),
                 "--check-samples", "0"]) == 0
    art3, art6 = ServingArtifact.load(tmp_path / "m3"), ServingArtifact.load(tmp_path / "m6")
    for art, want in ((art3, old), (art6, new)):
        got = art.model.state_dict()
        assert set(want) <= set(got), sorted(set(want) - set(got))
        for k, w in want.items():
            torch.testing.assert_close(got[k], w, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    m3 = json.loads((tmp_path / "m3" / "manifest.json").read_text())
    assert m3["run"]["step"] == 3 and m3["run"]["test"] is None  # the final metrics are step 6's
    assert "step 3)" in printed
    from iacn_torchrec.serving.export import split_inputs

    inputs, _ = split_inputs(PreparedDataset.open(data_dir))
    with torch.no_grad():
        p3, p6 = art3.model(*inputs).numpy(), art6.model(*inputs).numpy()
    assert float(np.abs(p3 - p6).max()) > 1e-4


def test_score_int8_uses_the_int8_tables_and_reports_the_auc_of_its_scores(runs, exported, tmp_path, capsys):
    """``iacn score --int8`` scores with the row-wise 8-bit tables: the written scores are those of
    the float model with each table replaced by the rows the packed table holds (``q·scale + bias``,
    ``q`` within one step of ``(w - min) / scale`` by hand, ``scale = (max - min) / 255``), close to
    but not the float artefact's; and the AUC it prints (and returns) on a labelled input is the rank
    AUC of the scores it wrote."""
    from iacn_torchrec.cli import main

    _write_tsv(load_run(runs["din"]).ds, tmp_path / "in.tsv")
    capsys.readouterr()
    assert main(["score", "--model", str(exported["din"]), "--input", str(tmp_path / "in.tsv"),
                 "--out", str(tmp_path / "q.tsv"), "--int8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert main(["score", "--model", str(exported["din"]), "--input", str(tmp_path / "in.tsv"),
                 "--out", str(tmp_path / "f.tsv"), "--no-progress"]) == 0
    got_q = np.loadtxt(tmp_path / "q.tsv", skiprows=1, usecols=2, delimiter="\t")
    got_f = np.loadtxt(tmp_path / "f.tsv", skiprows=1, usecols=2, delimiter="\t")
    labels = np.loadtxt(tmp_path / "q.tsv", skiprows=1, usecols=3, delimiter="\t").astype(int)

    # reference: the float artefact with each table replaced by its int8 round trip
    float_model = ServingArtifact.load(exported["din"]).model
    int8_state = ServingArtifact.load(exported["din"], int8=True).model.state_dict()
    state = float_model.state_dict()
    for t in ("user", "item", "cate"):
        w = state[f"{t}_table.weight"]
        packed = int8_state[f"{t}_table.weight_packed"]
        lo, hi = w.min(1).values, w.max(1).values
        scale = (hi - lo) / 255
        by_hand = torch.round((w - lo[:, None]) / scale[:, None].clamp_min(1e-12))
        assert (packed[:, :-8].float() - by_hand).abs().max() <= 1, t  # the 8-bit tables held
        deq = dequantised_rows(packed)
        assert bool(((deq - w).abs() <= scale[:, None] / 2 + 1e-6).all())  # within half a step
        state[f"{t}_table.weight"] = deq
    float_model.load_state_dict(state)
    ds = PreparedDataset.open(load_run(runs["din"]).ds.path)
    from iacn_torchrec.serving.export import split_inputs

    inputs, want_labels = split_inputs(ds)
    with torch.no_grad():
        want_q = float_model(*inputs).numpy()
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(got_q, want_q, rtol=0, atol=1e-6)  # written with 6 decimals
    diff = float(np.abs(got_q - got_f).max())
    assert 1e-5 < diff < 0.05, diff  # int8, not the float tables; only the quantisation error apart

    # the AUC: P(score of a positive > score of a negative), ties counted half, over all pairs
    pos, neg = got_q[labels == 1], got_q[labels == 0]
    d = pos[:, None] - neg[None, :]
    want_auc = float(((d > 0) + 0.5 * (d == 0)).mean())
    # pairs closer than the written 6 decimals may be ordered otherwise in the unrounded scores
    tol = 0.5 * float((np.abs(d) <= 1.5e-6).mean()) + 1e-12
    s = score_file(exported["din"], tmp_path / "in.tsv", tmp_path / "again.tsv", int8=True, progress=False)
    assert s["auc"] == pytest.approx(want_auc, abs=tol)
    m = re.search(r"AUC (\d\.\d{4})", printed)
    assert m and abs(float(m.group(1)) - want_auc) <= 5e-5 + tol, printed
    assert abs(want_auc - 0.5) > 0.1, want_auc  # so the AUC of reversed scores (1 - AUC) could not pass


# ------------------------------------------------------------- robustness review: input and artefact


def test_score_input_line_ends_headers_and_dien_ids(tmp_path):
    """Only CRLF ends a line (a lone CR is a control character: an error in a field that is read, as
    in prepare); a repeated header column is refused, and so is a data line equal to the header
    (two concatenated files), naming its line; DIEN rows with empty ids are refused as prepare
    refuses them."""
    head = "user_id\titem_id\thistory\n"
    cases = {  # file text -> the error naming file, line and field
        # the review's line: scored as two rows before
        head + "1\t5\t1|2\r3\t4\n": r"line 2: field 'history': '1\|2\\r3' contains the control character",
        head + "u\ti\tx\nu\ti\r\tx\n": r"line 3: field 'item_id': 'i\\r' contains the control character",
        "user_id\titem_id\thistory\tuser_id\nu\ti\tx\tv\n": r"line 1: column 'user_id' appears twice in the "
                                                           r"header",
        head + "u\ti\tx\n" + head + "v\tj\ty\n": r"line 3: the header line again \(concatenated files\?\)",
        "0\t\t\t\t\t\n": r"line 1: field 'uid' is empty",
        "0\tu\ti\tc\ta\tb\n1\tu\t\tc\ta\tb\n": r"line 2: field 'mid' is empty",
        "0\tu\ti\t\ta\tb\n": r"line 1: field 'cat' is empty",
        "0\tu\ti\tc\ta\x02\x02b\tc\x02d\x02e\n": r"line 1: field 'hist_mids': entry 2 is empty",
        "0\tu\ti\tc\x1c\ta\tb\n": r"line 1: field 'cat': 'c\\x1c' contains the control character",
        # a row of empty fields or a lone control character after the first is no blank line either
        "1\tu\ti\tc\ta\tb\n\t\t\t\t\t\n": r"line 2: field 'label': '' is not 0 or 1",
        "1\tu\ti\tc\ta\tb\n\x1c\n": r"line 2: malformed line: 1 tab-separated fields, expected 6",
    }
    for k, (text, error) in enumerate(cases.items()):
        (tmp_path / f"{k}.tsv").write_bytes(text.encode())
        with pytest.raises(DataError, match=rf"{k}\.tsv: {error}"):
            read_samples(tmp_path / f"{k}.tsv")
    # CRLF files and a control character in a column that is not read are fine
    (tmp_path / "ok.tsv").write_bytes(b"user_id\titem_id\thistory\tnote\r\nu\ti\ta|b\tx\ry\r\n")
    s = read_samples(tmp_path / "ok.tsv")
    assert (s.user, s.item, s.hist_item) == (["u"], ["i"], ["a", "b"])


def test_a_truncated_vocabulary_is_refused_by_export_and_by_the_artefact(runs, exported, data_dir, tmp_path):
    """A damaged vocabulary must not become a published model that maps most ids to unknown: the
    export refuses the dataset, and an artefact whose vocabulary does not fill its table (even with
    a matching sha256) is refused on load, naming the file and both numbers."""
    damaged = tmp_path / "data"
    shutil.copytree(data_dir, damaged)
    lines = (damaged / "vocab" / "item.tsv").read_text().splitlines(keepends=True)
    (damaged / "vocab" / "item.tsv").write_text("".join(lines[:10]))
    with pytest.raises(DataError, match=rf"vocab/item\.tsv: 10 lines, but meta\.json's counts\.items is "
                                        rf"{len(lines)}"):
        export_run(runs["wide_deep"], tmp_path / "m", data=str(damaged))
    assert not (tmp_path / "m").exists()
    # the same size, one line fewer: the open does not read it (meta.json's vocab_bytes), the export does
    (damaged / "vocab" / "item.tsv").write_text("".join(lines).replace("\n", " ", 1))
    with pytest.raises(DataError, match=rf"vocab/item\.tsv: {len(lines) - 1} lines, but meta\.json's "
                                        rf"counts\.items is {len(lines)}"):
        export_run(runs["wide_deep"], tmp_path / "m", data=str(damaged))
    assert not (tmp_path / "m").exists()
    bad = tmp_path / "bad"
    shutil.copytree(exported["wide_deep"], bad)
    (bad / "vocab" / "item.tsv").write_text("".join(lines[:10]))
    _rehash(bad, "vocab/item.tsv")
    with pytest.raises(ValueError, match=rf"vocab/item\.tsv: 10 entries, but the model's item table has "
                                         rf"{len(lines) + 1} rows \(expected {len(lines)} entries"):
        ServingArtifact.load(bad)
