"""Export a trained run for serving: the main model and the merged ``E_orig ⊕ E_aux`` tables only.

``iacn export --run RUN_DIR --out MODEL_DIR [--int8]``

IaCN costs nothing at inference (DESIGN.md): the main model only ever reads ``E = E_orig ⊕ E_aux``,
so each item-side feature's two tables are merged into one table whose rows are the concatenation
(``[N + 1, orig_dim + aux_dim]``) and the IaCN task is dropped. :class:`ServingModel` does the lookups
with plain ``F.embedding`` (no KJT, no TorchRec collections, no fbgemm): of the real behaviours only
for DIN and DIEN, which read the jagged history, of the padded ids for Wide&Deep and DLRM. It calls
the trained main model and is traced to TorchScript with :func:`torch.jit.trace` (DIEN's
recurrences as a scripted loop: ``models.dien._recurrence_states``).

Why TorchScript tracing and not ``torch.export``: the main models trim the padded history to the
batch's longest one on CPU (``models.layers.effective_length`` reads ``int(hist_lengths.max())``),
a data-dependent size that ``torch.export`` refuses (``GuardOnDataDependentSymNode``). Tracing with
an example whose longest history is L fixes that slice to the full L: padded positions are masked
in every main model, so the scores are the eager ones (up to float summation order; the export
checks this on the test split and records the largest difference in the manifest). The trace keeps
the batch size dynamic.

Why the graph does not depend on IaCN: an IaCN-trained model (``orig_dim + aux_dim``) and a plain
model of the same width (``emb_dim = orig_dim + aux_dim``) produce the same :class:`ServingModel`
code path and tensor shapes, hence the same TorchScript graph (``manifest["graph_sha256"]``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iacn_torchrec import versions
from iacn_torchrec.errors import UserError
from iacn_torchrec.fileio import check_output_path, replace_dir, temp_sibling
from iacn_torchrec.modules.embeddings import EmbeddedBatch
from iacn_torchrec.runtime import set_threads
from iacn_torchrec.serving.artifact import FORMAT, FORMAT_VERSION, INPUT_NAMES, auc, file_sha256

__all__ = [
    "MergedTable",
    "ServingModel",
    "LoadedRun",
    "load_run",
    "trace_serving_model",
    "export_run",
    "split_inputs",
    "add_arguments",
    "run",
    "ExportError",
    "EXPORT_ATOL",
]

#: exported scores must equal the eager model's within this (float32 reassociation only)
EXPORT_ATOL = 1e-6


class ExportError(UserError, RuntimeError):
    """The run cannot be exported, or its export does not reproduce the eager scores."""


# --------------------------------------------------------------------------------------- modules
class MergedTable(nn.Module):
    """One embedding table for serving: float32 rows, or row-wise 8-bit quantised rows.

    8-bit (fbgemm's row-wise scheme, through torch's own ``quantized::embedding_bag_byte_*`` CPU ops,
    which need no fbgemm_gpu): each row is stored as ``d`` bytes ``q ∈ [0, 255]`` followed by its
    float32 ``scale = (max - min) / 255`` and ``bias = min``, and read as ``w ≈ q·scale + bias``
    (error ≤ scale / 2 per entry). One fused op dequantises the rows it looks up; on Beauty's tables
    it reads 10k rows in ~45 µs where a float ``F.embedding`` takes ~80 µs and a gather of the
    three parts then a multiply-add ~520 µs (one thread, measured in session 20).

    Shapes: ``weight [N, d]``; ``forward(ids [...]) -> [..., d]`` float32.
    """

    def __init__(self, weight: torch.Tensor, int8: bool = False) -> None:
        super().__init__()
        weight = weight.detach().float().contiguous()
        self.int8 = bool(int8)
        self.num_embeddings, self.embedding_dim = weight.shape
        if self.int8:
            self.register_buffer("weight_packed", torch.ops.quantized.embedding_bag_byte_prepack(weight))
        else:
            self.register_buffer("weight", weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.int8:
            flat = ids.reshape(-1)
            offsets = torch.arange(flat.numel(), device=ids.device)  # a bag of one row per id
            rows = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                self.weight_packed, flat, offsets, False, 0, False, None, None, False)
            return rows.reshape(*ids.shape, self.embedding_dim)
        return F.embedding(ids, self.weight)


class ServingModel(nn.Module):
    """Lookups in the merged tables + the trained main model → click probabilities.

    Args:
        user_table: ``[num_users + 1, Du]`` (the ``uid`` table).
        item_table: ``[num_items + 1, orig_dim + aux_dim]`` rows ``E_orig(i) ⊕ E_aux(i)``.
        cate_table: ``[num_cates + 1, orig_dim + aux_dim]`` likewise.
        main_model: the trained DIN / DIEN / W&D (``forward(EmbeddedBatch) -> (logits, aux)``), eval mode.
        max_len: L.

    ``forward(uid [B], item [B], cate [B], hist_item [B, L], hist_cate [B, L], hist_lengths [B])``
    returns ``sigmoid(logits)`` ``[B]``. The main model sees the :class:`EmbeddedBatch` the training
    embeddings build: ``target = item ⊕ cate`` ``[B, D]`` (``D = 2·(orig_dim + aux_dim)``) and the
    history of each row's first ``min(hist_lengths, L)`` positions (whatever ids sit past them): for a
    main model with ``reads_jagged_history`` (DIN, DIEN) its jagged values ``[N, D]`` and offsets
    ``[B + 1]``, otherwise ``hist`` ``[B, L, D]`` zero past the length.
    """

    def __init__(
        self,
        user_table: MergedTable,
        item_table: MergedTable,
        cate_table: MergedTable,
        main_model: nn.Module,
        max_len: int,
    ) -> None:
        super().__init__()
        self.user_table, self.item_table, self.cate_table = user_table, item_table, cate_table
        self.main_model = main_model
        self.max_len = int(max_len)
        self.register_buffer("positions", torch.arange(self.max_len))

    @classmethod
    def from_model(cls, model: nn.Module, int8: bool = False) -> ServingModel:
        """From a trained (unsharded) ``CTRWithIaCN``: merge its ``orig``/``aux`` tables, drop IaCN."""
        emb = model.embeddings
        w = {n: t.detach() for n, t in _table_weights(emb).items()}
        item = w["item_orig"] if "item_aux" not in w else torch.cat([w["item_orig"], w["item_aux"]], 1)
        cate = w["cate_orig"] if "cate_aux" not in w else torch.cat([w["cate_orig"], w["cate_aux"]], 1)
        main = model.main_model.eval()
        return cls(
            MergedTable(w["uid"], int8), MergedTable(item, int8), MergedTable(cate, int8), main, emb.max_len
        ).eval()

    def forward(
        self,
        uid: torch.Tensor,
        item: torch.Tensor,
        cate: torch.Tensor,
        hist_item: torch.Tensor,
        hist_cate: torch.Tensor,
        hist_lengths: torch.Tensor,
    ) -> torch.Tensor:
        mask = self.positions.unsqueeze(0) < hist_lengths.unsqueeze(1)  # [B, L]
        lengths = mask.sum(1)  # min(hist_lengths, L): a model that divides by the length reads this one
        target = torch.cat([self.item_table(item), self.cate_table(cate)], dim=1)
        user = self.user_table(uid)
        if getattr(self.main_model, "reads_jagged_history", False):
            # only the N real behaviours are looked up and run (Beauty's test split: ~7 of 20)
            offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
            values = torch.cat([self.item_table(hist_item[mask]), self.cate_table(hist_cate[mask])], dim=1)
            emb = EmbeddedBatch(user=user, target=target, hist=None, hist_lengths=lengths, hist_values=values,
                                hist_offsets=offsets, max_len=self.max_len)
        else:
            hist = torch.cat([self.item_table(hist_item), self.cate_table(hist_cate)], dim=2)
            hist = hist * mask.unsqueeze(-1).to(hist.dtype)
            emb = EmbeddedBatch(user=user, target=target, hist=hist, hist_lengths=lengths)
        logits, _ = self.main_model(emb)
        return torch.sigmoid(logits)


def _table_weights(emb: nn.Module) -> dict[str, torch.Tensor]:
    """``{table name: weight}`` of an unsharded ``InterestAwareEmbeddings``."""
    out: dict[str, torch.Tensor] = {}
    for ec in emb.collections().values():
        for name, t in ec.embeddings.items():
            out[name] = t.weight
    return out


def trace_serving_model(serving: ServingModel) -> torch.jit.ScriptModule:
    """TorchScript-trace ``serving`` with an example whose longest history is L (so the main model's
    history slice is the full L; see the module docstring). The batch size stays dynamic."""
    L = serving.max_len
    B = 3
    lengths = torch.tensor([L, 1, 0][:B], dtype=torch.long)
    ex = (
        torch.ones(B, dtype=torch.long),
        torch.ones(B, dtype=torch.long),
        torch.ones(B, dtype=torch.long),
        torch.ones(B, L, dtype=torch.long),
        torch.ones(B, L, dtype=torch.long),
        lengths,
    )
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # the length trim becomes a constant (= L) on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(serving.eval(), ex, check_trace=False)
    return traced


def graph_text(traced: torch.jit.ScriptModule) -> str:
    """The inlined TorchScript graph, with TorchScript's per-process class-name mangling
    (``___torch_mangle_N.``, which depends on how many modules were traced before) removed."""
    return re.sub(r"___torch_mangle_\d+\.", "", str(traced.inlined_graph))


def graph_signature(traced: torch.jit.ScriptModule) -> str:
    """sha256 of :func:`graph_text`: equal iff the exported computations (ops, shapes of the code
    path, module structure) are the same; the weights are not part of it."""
    return "sha256:" + hashlib.sha256(graph_text(traced).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- runs
@dataclass
class LoadedRun:
    """A trained run rebuilt in eval mode: ``config`` (TrainConfig), ``ds`` (PreparedDataset),
    ``model`` (CTRWithIaCN), ``test_loader`` (BatchLoader with the features the model reads),
    ``step`` (checkpoint step), ``metrics`` (metrics.json or {})."""

    path: Path
    config: Any
    ds: Any
    model: nn.Module
    test_loader: Any
    step: int
    metrics: dict


def _resolve_data(run_dir: Path, data: str | None, config_path: str) -> Path:
    if data:
        return Path(data)
    p = Path(config_path)
    for cand in (p, run_dir / p, Path.cwd() / p):
        if (cand / "meta.json").is_file():
            return cand
    raise FileNotFoundError(
        f"{run_dir / 'config.yaml'}: data.path {config_path!r} is not a prepared dataset from here; "
        "pass --data DIR"
    )


def _read_metrics(path: Path) -> dict:
    """A run's ``metrics.json`` ({} when there is none); an unreadable one names the file."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise ExportError(f"{path}: expected a JSON object, got a {type(metrics).__name__}")
    return metrics


def load_run(
    run_dir: str | Path, data: str | None = None, step: int | None = None, doing: str = "using"
) -> LoadedRun:
    """Rebuild ``run_dir``'s model from its config.yaml and newest (or ``step``'s) checkpoint. Newer
    checkpoints left incomplete are announced on stderr (``note: ...; DOING step N``)."""
    from iacn_torchrec.data.loader import PreparedDataset
    from iacn_torchrec.distributed.setup import build_model_from_config
    from iacn_torchrec.train.checkpoint import (
        CheckpointError,
        complete_steps,
        incomplete_note,
        latest_step,
        load_full_state,
        state_dict_mismatch,
        step_dir,
    )
    from iacn_torchrec.train.config import TrainConfig
    from iacn_torchrec.train.loop import (
        config_fingerprint,
        fingerprint_differences,
        make_loaders,
        shown_differences,
    )

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory (iacn train --out)")
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml: not a training run directory (iacn train --out)")
    config = TrainConfig.from_yaml(run_dir / "config.yaml", stored=True)
    ds = PreparedDataset.open(_resolve_data(run_dir, data, config.data.path))
    metrics = _read_metrics(run_dir / "metrics.json")
    root = str(run_dir / "checkpoints")
    if step is not None and step not in complete_steps(root):
        raise ExportError(f"{root}: no complete checkpoint of step {step}; the run has "
                          f"{complete_steps(root) or 'none'} (only the newest are kept)")
    newest_chosen = step is None
    if step is None:
        step = latest_step(root)
        note = incomplete_note(root, step, f"{doing} step {step}" if step is not None
                               else "no complete checkpoint before it")
        if note:
            print(note, file=sys.stderr, flush=True)
    if step is None:
        raise ExportError(f"{run_dir}: no complete checkpoint under {root} yet (the run was stopped before "
                          "its first checkpoint, or is still training)")
    try:
        state = load_full_state(root, step=step)  # missing, damaged: CheckpointError naming the file
    except CheckpointError as e:
        older = [s for s in complete_steps(root) if s < step]
        if not newest_chosen or not older:
            raise
        raise CheckpointError(f"{e}; the checkpoint before it (step {older[-1]}) may be intact: pass "
                              f"--step {older[-1]}") from None
    # config.yaml rebuilds the model and is what the manifest reports: it must be the configuration the
    # checkpoint was trained with (the fingerprint a resume checks; distributed.* only shards it)
    where = step_dir(root, step)
    if not state.get("config_fingerprint"):
        raise CheckpointError(f"{where}: no configuration fingerprint in the checkpoint: cannot tell whether "
                              f"{run_dir / 'config.yaml'} is the configuration it was trained with")
    differ = fingerprint_differences(state["config_fingerprint"],
                                      config_fingerprint(config, ds.meta.get("content_hash")),
                                      ignore=("distributed.",))
    # the dataset's content hash is part of the fingerprint: the one check of the dataset
    hashes = [d for d in differ if d.startswith("data.content_hash:")]
    if hashes:
        raise ExportError(f"{ds.path} is not the dataset {where} was trained on ({hashes[0]}); "
                          "pass that dataset with --data")
    if differ:
        raise ExportError(f"{run_dir / 'config.yaml'}: not the configuration {where} was trained with "
                          f"(checkpoint → config.yaml: {shown_differences(differ)}); restore the "
                          "config.yaml it was trained with")
    _, test_loader, item_log_q = make_loaders(config, ds, 0, 1)
    torch.manual_seed(config.seed)
    model = build_model_from_config(config, ds, item_log_q=item_log_q)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # shapes: another dataset's vocabulary, or another model's config
        raise ExportError(f"{root}: the checkpoint does not fit the model built from "
                          f"{run_dir / 'config.yaml'} and {ds.path}: {state_dict_mismatch(e)}") from None
    model.eval()
    return LoadedRun(run_dir, config, ds, model, test_loader, int(step), metrics)


def split_inputs(
    ds: Any, split: str = "test", limit: int | None = None
) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
    """A split's samples as :class:`ServingModel` inputs (in file order) and their labels."""
    from iacn_torchrec.serving.artifact import pad_last

    s = ds.split(split)
    n = len(s) if limit is None else min(limit, len(s))
    off = np.asarray(s.hist_offsets[: n + 1])
    lengths = np.diff(off)
    hi, kept = pad_last(np.asarray(s.hist_item[off[0] : off[-1]]), lengths, ds.max_len)
    hc, _ = pad_last(np.asarray(s.hist_cate[off[0] : off[-1]]), lengths, ds.max_len)
    cols = [np.asarray(s.uid[:n]), np.asarray(s.item[:n]), np.asarray(s.cate[:n]), hi, hc, kept]
    return tuple(torch.from_numpy(np.array(c, dtype=np.int64)) for c in cols), np.array(s.label[:n])


@torch.inference_mode()
def eager_scores(run: LoadedRun, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The eager ``CTRWithIaCN.predict`` on the test split in file order → (probs, labels)."""
    from iacn_torchrec.data.loader import BatchLoader

    tl = run.test_loader
    loader = BatchLoader(
        run.ds,
        "test",
        batch_size=tl.batch_size,
        with_neg_hist=tl.with_neg_hist,
        iacn_negatives=tl.iacn_negatives,
        limit=limit,
        seed=tl.seed,
    )
    probs, labels = [], []
    for batch in loader:
        probs.append(run.model.predict(batch).numpy())
        labels.append(batch.labels.numpy())
    return np.concatenate(probs), np.concatenate(labels)


@torch.inference_mode()
def batched(model: Any, inputs: tuple[torch.Tensor, ...], batch_size: int = 4096) -> np.ndarray:
    n = inputs[0].shape[0]
    return np.concatenate(
        [model(*(t[i : i + batch_size] for t in inputs)).numpy() for i in range(0, n, batch_size)]
    )


# ----------------------------------------------------------------------------------------- export
def export_run(
    run_dir: str | Path,
    out: str | Path,
    data: str | None = None,
    step: int | None = None,
    int8: bool = False,
    check_samples: int | None = 4096,
    overwrite: bool = False,
) -> dict:
    """Export ``run_dir`` to ``out`` (atomically: a hidden sibling renamed at the end) and return the
    manifest. ``check_samples``: compare exported vs eager scores on that many test samples (None:
    all); with ``int8`` the test AUC of the float and the int8 artefact is measured on the full test
    split."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty (pass --force to replace it)")
        try:  # --force replaces an earlier export only, never a folder of something else
            is_artefact = json.loads((out / "manifest.json").read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            is_artefact = False
        if not is_artefact:
            raise FileExistsError(f"{out}: exists, is not empty and is not an exported model: not "
                                  "replaced, even with --force")
    t0 = time.perf_counter()
    run = load_run(run_dir, data=data, step=step, doing="exporting")
    if run.step == 0:
        raise ExportError(f"{run_dir}: its checkpoint is at step 0: the run trained no step (too few "
                          "training samples for a batch?), so there is no trained model to export")
    emb = run.model.embeddings
    serving = ServingModel.from_model(run.model)
    traced = trace_serving_model(serving)

    # check: exported == eager on the first test samples
    eager, labels = eager_scores(run, limit=check_samples)
    inputs, _ = split_inputs(run.ds, limit=len(eager))
    exported = batched(traced, inputs)
    max_diff = float(np.abs(exported - eager).max()) if eager.size else 0.0
    if not max_diff <= EXPORT_ATOL:  # `not <=`: a NaN fails too
        raise ExportError(
            f"the exported model's scores differ from the eager model's by up to {max_diff:.3g} on "
            f"{eager.size} test samples (tolerance {EXPORT_ATOL:g}); nothing was written"
        )
    checks: dict[str, Any] = {
        "samples": int(eager.size),
        "max_abs_diff_vs_eager": max_diff,
        "auc_exported": auc(labels, exported),
        "auc_eager": auc(labels, eager),
    }
    traced_q = None
    if int8:
        traced_q = trace_serving_model(ServingModel.from_model(run.model, int8=True))
        all_inputs, all_labels = split_inputs(run.ds)
        p_f = batched(traced, all_inputs)
        p_q = batched(traced_q, all_inputs)
        checks["int8"] = {
            "test_samples": int(all_labels.size),
            "auc_float": auc(all_labels, p_f),
            "auc_int8": auc(all_labels, p_q),
            "max_abs_score_diff": float(np.abs(p_f - p_q).max()),
            "mean_abs_score_diff": float(np.abs(p_f - p_q).mean()),
        }
        checks["int8"]["auc_change"] = checks["int8"]["auc_int8"] - checks["int8"]["auc_float"]

    tmp = temp_sibling(out)
    tmp.mkdir(parents=True)
    try:
        torch.jit.save(traced, str(tmp / "model.pt"))
        if traced_q is not None:
            torch.jit.save(traced_q, str(tmp / "model_int8.pt"))
        (tmp / "vocab").mkdir()
        for kind in ("uid", "item", "cate"):
            # the checked content, not a blind copy of the file
            (tmp / "vocab" / f"{kind}.tsv").write_bytes(run.ds.read_vocab_file(kind))
        np.save(tmp / "item2cate.npy", np.asarray(run.ds.item2cate, dtype=np.int64))
        files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        cfg = run.config
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": cfg.model.name,
            "iacn_trained": bool(cfg.iacn.enabled),
            "iacn": {"lam": cfg.iacn.lam, "delta": cfg.iacn.delta} if cfg.iacn.enabled else None,
            "export": "torchscript-trace",
            "inputs": {
                "names": list(INPUT_NAMES),
                "shapes": ["[B]", "[B]", "[B]", "[B, L]", "[B, L]", "[B]"],
                "dtype": "int64",
                "padding": "hist_* left-aligned (oldest first), ids past hist_lengths ignored; "
                "id 0 = padding/unknown",
                "output": "click probability [B] float32",
            },
            "dims": {
                "max_len": int(emb.max_len),
                "orig_dim": int(emb.orig_dim),
                "aux_dim": int(emb.aux_dim),
                "user_dim": int(emb.user_dim),
                "item_dim": int(emb.item_dim),
            },
            "tables": {
                name: {
                    "rows": t.num_embeddings,
                    "dim": t.embedding_dim,
                    "merged_from": [f"{name}_orig", f"{name}_aux"] if emb.aux_dim else [f"{name}_orig"],
                }
                for name, t in (("item", serving.item_table), ("cate", serving.cate_table))
            }
            | {
                "uid": {
                    "rows": serving.user_table.num_embeddings,
                    "dim": serving.user_table.embedding_dim,
                    "merged_from": ["uid"],
                }
            },
            "parameters": {
                "trained_model": sum(
                    t.numel()
                    for n, t in run.model.state_dict().items()
                    if not n.endswith("num_batches_tracked")
                ),
                "served": sum(
                    t.numel()
                    for n, t in serving.state_dict().items()
                    if n != "positions" and not n.endswith("num_batches_tracked")
                ),
            },
            "graph_sha256": graph_signature(traced),
            "data": {k: run.ds.meta.get(k) for k in ("protocol", "max_len", "seed", "content_hash", "source")}
            | {"counts": {k: run.ds.meta["counts"].get(k) for k in ("users", "items", "categories")}},
            # the run's test metrics belong to its final step: none for an earlier checkpoint
            "run": {"path": str(Path(run_dir).resolve()), "step": run.step, "config": cfg.to_dict(),
                    "test": run.metrics.get("test") if run.step == run.metrics.get("steps") else None},
            "checks": checks,
            "versions": versions(),
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        replace_dir(tmp, out)  # an earlier export is set aside first and put back if this fails
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["export_seconds"] = time.perf_counter() - t0
    return manifest


# -------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run directory (iacn train --out)")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--data", help="prepared dataset (default: the run's data.path)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write model_int8.pt (row-wise int8 tables) and report the AUC change",
    )
    parser.add_argument(
        "--check-samples",
        type=int,
        default=4096,
        help="test samples compared exported vs eager (0: the whole test split; default 4096)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if args.check_samples < 0:
        print(f"iacn export: --check-samples must be >= 0 (0: the whole test split), "
              f"got {args.check_samples}", file=sys.stderr)
        return 2
    check_output_path(args.out, "--out", directory=True, parents=True)  # before loading and tracing
    try:
        m = export_run(
            args.run,
            args.out,
            data=args.data,
            step=args.step,
            int8=args.int8,
            check_samples=args.check_samples or None,
            overwrite=args.force,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"iacn export: {e}", file=sys.stderr)
        return 2
    c = m["checks"]
    d = m["dims"]
    print(
        f"exported {m['model']} ({'IaCN-trained' if m['iacn_trained'] else 'plain'}, "
        f"step {m['run']['step']}) "
        f"to {args.out} in {m['export_seconds']:.1f}s"
    )
    print(
        f"  tables: item {m['tables']['item']['rows']}x{m['tables']['item']['dim']}, cate "
        f"{m['tables']['cate']['rows']}x{m['tables']['cate']['dim']}, uid {m['tables']['uid']['rows']}x"
        f"{m['tables']['uid']['dim']} (orig {d['orig_dim']} + aux {d['aux_dim']})"
        + ("; IaCN dropped" if d["aux_dim"] else "; a plain model: no IaCN to drop")
    )
    print(
        f"  state values (parameters and BatchNorm statistics): trained {m['parameters']['trained_model']:,}"
        f" -> served {m['parameters']['served']:,}"
    )
    print(
        f"  check on {c['samples']} test samples: max |exported - eager| = {c['max_abs_diff_vs_eager']:.2e}, "
        f"AUC {c['auc_exported']:.4f} (eager {c['auc_eager']:.4f})"
    )
    if "int8" in c:
        q = c["int8"]
        print(
            f"  int8 tables on {q['test_samples']} test samples: AUC {q['auc_int8']:.5f} vs float "
            f"{q['auc_float']:.5f} (change {q['auc_change']:+.5f}), mean |score diff| "
            f"{q['mean_abs_score_diff']:.2e}"
        )
    print(f"  graph {m['graph_sha256'][:23]}…")
    return 0
