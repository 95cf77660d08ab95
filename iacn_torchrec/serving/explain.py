"""Explain a user's interests with the trained IaCN capsules.

``iacn explain --run RUN_DIR --user UID [--target ITEM|heldout] [--plot PNG]``
``iacn explain --run RUN_DIR --summary [--md FILE] [--plot PNG]``

Per user: the history (raw item ids and categories via the vocabularies), the ``K_u`` interest
capsules of MIND's B2I routing on ``E_aux`` (eval-mode routing: deterministic), the history items
routed to each capsule (routing weights ``w_ij``; an item is *assigned* to its largest-weight
capsule), each capsule's dominant categories (routing-weighted category shares) and, given a
target, IaCN's label-aware attention over the capsules (which interest the target matched) and the
main model's click probability.

Dataset level (``--summary``): how many interests users get (``K_u`` and the number of capsules
that win at least one item), and how coherent a capsule is in category terms: the category entropy
(bits) of the items assigned to each capsule, against (a) a random grouping of the same user's
items into groups of the same sizes and (b) the same architecture with untrained (initial) weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iacn_torchrec import versions
from iacn_torchrec.errors import UserError
from iacn_torchrec.fileio import check_output_path, save_figure, write_atomic

__all__ = [
    "ExplainError",
    "UserExplanation",
    "explain_user",
    "explain_samples",
    "format_explanation",
    "plot_explanation",
    "interest_summary",
    "capsule_entropy",
    "add_arguments",
    "run",
]


class ExplainError(UserError, KeyError):
    """A user or item the run's dataset cannot explain: an id its vocabularies do not know, a user
    without a (held-out) sample. A KeyError (a failed lookup) whose text is its message, not the
    quoted key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------------------------------ core
def _kjt(
    feature_names: list[str],
    uid: np.ndarray,
    item: np.ndarray,
    cate: np.ndarray,
    hist_item: np.ndarray,
    hist_cate: np.ndarray,
    hist_len: np.ndarray,
):
    """A KJT with every feature the embeddings read (negatives filled with the padding id 0)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from iacn_torchrec.data.loader import BASE_KEYS, IACN_NEG_KEYS, NEG_HIST_KEYS

    B = len(uid)
    one = np.ones(B, dtype=np.int64)
    feats = {
        "uid": (uid, one),
        "item": (item, one),
        "cate": (cate, one),
        "hist_item": (hist_item, hist_len),
        "hist_cate": (hist_cate, hist_len),
        "neg_hist_item": (np.zeros_like(hist_item), hist_len),
        "neg_hist_cate": (np.zeros_like(hist_cate), hist_len),
        "iacn_neg_item": (np.zeros(B, np.int64), one),
        "iacn_neg_cate": (np.zeros(B, np.int64), one),
    }
    keys = [k for k in BASE_KEYS + NEG_HIST_KEYS + IACN_NEG_KEYS if k in feature_names]
    values = torch.from_numpy(np.concatenate([np.asarray(feats[k][0], dtype=np.int64) for k in keys]))
    lengths = torch.from_numpy(np.concatenate([np.asarray(feats[k][1], dtype=np.int64) for k in keys]))
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


@torch.no_grad()
def _interests(model: Any, kjt: Any) -> tuple[Any, Any]:
    """(EmbeddedBatch, IaCNInterests) of ``kjt`` in eval mode (deterministic routing)."""
    if model.iacn is None:
        raise ValueError("this run was trained without IaCN: it has no interest capsules to explain")
    model.eval()
    emb = model.embeddings(kjt, model.delta, aux_views=True)
    out = model.iacn.interests(emb.aux_hist, emb.hist_lengths, emb.aux_target, user=emb.user)
    return emb, out


@dataclass
class UserExplanation:
    """One user's interests.

    ``hist_item`` / ``hist_cate``: indices ``[n]`` (oldest first); ``routing``: ``[K_u, n]`` weights
    ``w_ij`` (each column sums to 1); ``assignment``: ``[n]`` the capsule of largest weight;
    ``capsule_categories``: per capsule ``[(category index, share)]`` best first (routing-weighted);
    ``capsule_norms``: ``|u_j|`` ``[K_u]``; with a target: ``attention`` ``[K_u]``, ``matched``
    (argmax), ``score`` (the main model's click probability)."""

    uid: int
    hist_item: np.ndarray
    hist_cate: np.ndarray
    routing: np.ndarray
    assignment: np.ndarray
    capsule_categories: list[list[tuple[int, float]]]
    capsule_norms: np.ndarray
    target: int | None = None
    target_cate: int | None = None
    attention: np.ndarray | None = None
    matched: int | None = None
    score: float | None = None
    names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_interests(self) -> int:
        return int(self.routing.shape[0])

    def name(self, kind: str, idx: int) -> str:
        voc = self.names.get(kind)
        return (
            voc[idx - 1]
            if voc is not None and 1 <= idx <= len(voc)
            else ("<unknown>" if idx == 0 else str(idx))
        )


def _explanation_from(
    out: Any,
    row: int,
    uid: int,
    hist_item: np.ndarray,
    hist_cate: np.ndarray,
    target: int | None,
    target_cate: int | None,
    score: float | None,
) -> UserExplanation:
    n = len(hist_item)
    k = int(out.capsule_mask[row].sum())
    w = out.routing_weights[row, :k, :n].numpy().astype(np.float64)
    assignment = w.argmax(0) if n else np.zeros(0, dtype=np.int64)
    cats = []
    for j in range(k):
        shares: dict[int, float] = {}
        for c, wj in zip(hist_cate.tolist(), w[j].tolist(), strict=True):
            shares[c] = shares.get(c, 0.0) + wj
        tot = sum(shares.values()) or 1.0
        cats.append(sorted(((c, s / tot) for c, s in shares.items()), key=lambda x: -x[1]))
    att = matched = None
    if target is not None and out.attention_weights is not None:
        att = out.attention_weights[row, :k].numpy().astype(np.float64)
        matched = int(att.argmax())
    return UserExplanation(
        uid,
        hist_item,
        hist_cate,
        w,
        assignment,
        cats,
        out.capsules[row, :k].norm(dim=-1).numpy(),
        target,
        target_cate,
        att,
        matched,
        score,
    )


def explain_samples(
    model: Any,
    uid: np.ndarray,
    hist_item: np.ndarray,
    hist_cate: np.ndarray,
    hist_len: np.ndarray,
    item: np.ndarray | None = None,
    cate: np.ndarray | None = None,
) -> list[UserExplanation]:
    """Explanations of B samples given as indices (histories jagged: ``hist_* [sum(hist_len)]``,
    oldest first, at most L each; ``item``/``cate`` ``[B]`` targets or None)."""
    B = len(uid)
    has_target = item is not None
    item = np.zeros(B, np.int64) if item is None else np.asarray(item, dtype=np.int64)
    cate = np.zeros(B, np.int64) if cate is None else np.asarray(cate, dtype=np.int64)
    kjt = _kjt(
        model.embeddings.feature_names(),
        np.asarray(uid, np.int64),
        item,
        cate,
        np.asarray(hist_item, np.int64),
        np.asarray(hist_cate, np.int64),
        np.asarray(hist_len, np.int64),
    )
    emb, out = _interests(model, kjt)
    scores = None
    if has_target:
        with torch.no_grad():
            logits, _ = model.main_model(emb)
            scores = torch.sigmoid(logits).numpy()
    offs = np.r_[0, np.cumsum(hist_len)]
    return [
        _explanation_from(
            out,
            b,
            int(uid[b]),
            np.asarray(hist_item[offs[b] : offs[b + 1]]),
            np.asarray(hist_cate[offs[b] : offs[b + 1]]),
            int(item[b]) if has_target else None,
            int(cate[b]) if has_target else None,
            float(scores[b]) if scores is not None else None,
        )
        for b in range(B)
    ]


def _user_row(ds: Any, uid: int) -> tuple[str, int]:
    """The sample holding the user's latest history: the label-1 test row, else the last train row."""
    for split in ("test", "train"):
        if f"{split}/label.npy" not in ds.meta["arrays"]:
            continue
        s = ds.split(split)
        rows = np.flatnonzero(np.asarray(s.uid) == uid)
        if rows.size:
            pos = rows[np.asarray(s.label)[rows] == 1]
            return split, int((pos if pos.size else rows)[-1])
    raise ExplainError(f"{ds.path}: user index {uid} has no sample in any split (fewer than 3 interactions?)")


def explain_user(run: Any, user: str, target: str | None = None) -> UserExplanation:
    """Explain raw user id ``user`` of a loaded run (:func:`~iacn_torchrec.serving.export.load_run`).

    ``target``: a raw item id, ``"heldout"`` (the user's held-out test item) or None."""
    ds = run.ds
    names = {k: ds.vocab(k) for k in ("uid", "item", "cate")}
    uid_map = {r: i + 1 for i, r in enumerate(names["uid"])}
    if user not in uid_map:
        raise ExplainError(f"{ds.path}/vocab/uid.tsv: unknown user id {user!r}")
    uid = uid_map[user]
    split, row = _user_row(ds, uid)
    s = ds.split(split)
    a, b = int(s.hist_offsets[row]), int(s.hist_offsets[row + 1])
    hist_item, hist_cate = np.asarray(s.hist_item[a:b]), np.asarray(s.hist_cate[a:b])
    item = cate = None
    if target is not None:
        if target == "heldout":
            if split != "test" or int(s.label[row]) != 1:  # e.g. a dien-protocol user in the train split
                raise ExplainError(f"{ds.path}: user {user!r} has no held-out (label-1 test) sample; "
                               "pass --target ITEM")
            t = int(s.item[row])
        else:
            item_map = {r: i + 1 for i, r in enumerate(names["item"])}
            if target not in item_map:
                raise ExplainError(f"{ds.path}/vocab/item.tsv: unknown item id {target!r}")
            t = item_map[target]
        item, cate = np.array([t]), np.array([int(ds.item2cate[t])])
    ex = explain_samples(run.model, np.array([uid]), hist_item, hist_cate, np.array([b - a]), item, cate)[0]
    ex.names = names
    return ex


def format_explanation(ex: UserExplanation, max_items: int = 8) -> str:
    """Plain-text report of :class:`UserExplanation`."""
    lines = [
        f"user {ex.name('uid', ex.uid)} (index {ex.uid}): {len(ex.hist_item)} behaviours in the history, "
        f"K_u = {ex.num_interests} interest capsule(s)",
        "",
        "history (oldest first):",
        f"  {'#':>3}  {'item':<14} {'category':<28} {'interest':>8}",
    ]
    for t, (i, c) in enumerate(zip(ex.hist_item.tolist(), ex.hist_cate.tolist(), strict=True), start=1):
        lines.append(
            f"  {t:>3}  {ex.name('item', i):<14} {ex.name('cate', c):<28} {ex.assignment[t - 1] + 1:>8}"
        )
    lines.append("")
    for j in range(ex.num_interests):
        members = np.flatnonzero(ex.assignment == j)
        top = ", ".join(f"{ex.name('cate', c)} {s:.0%}" for c, s in ex.capsule_categories[j][:3])
        lines.append(
            f"interest {j + 1} (|u| = {ex.capsule_norms[j]:.2f}, {members.size} item(s) assigned, "
            f"routing mass {ex.routing[j].sum():.2f}): {top}"
        )
        order = members[np.argsort(-ex.routing[j, members])]
        for t in order[:max_items]:
            lines.append(
                f"      {ex.name('item', int(ex.hist_item[t])):<14} "
                f"{ex.name('cate', int(ex.hist_cate[t])):<28} w = {ex.routing[j, t]:.2f}"
            )
        if order.size > max_items:
            lines.append(f"      … {order.size - max_items} more")
    if ex.target is not None and ex.attention is not None:
        att = ", ".join(f"{a:.2f}" for a in ex.attention)
        lines += [
            "",
            f"target {ex.name('item', ex.target)} ({ex.name('cate', ex.target_cate)}): "
            f"label-aware attention [{att}] -> matched interest {ex.matched + 1}"
            + (f"; main-model click probability {ex.score:.3f}" if ex.score is not None else ""),
        ]
    return "\n".join(lines)


def plot_explanation(ex: UserExplanation, path: str | Path) -> None:
    """Routing-weight heat map (capsules × history items, labelled by category) and, with a target,
    the attention bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(ex.hist_item)
    with_att = ex.attention is not None
    fig, axes = plt.subplots(
        1,
        2 if with_att else 1,
        figsize=(max(6.0, 0.45 * n + 3), 1.2 + 0.6 * ex.num_interests + 1.8),
        gridspec_kw={"width_ratios": [max(n, 1), 3]} if with_att else None,
        squeeze=False,
    )
    ax = axes[0, 0]
    im = ax.imshow(ex.routing, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(ex.num_interests), [f"interest {j + 1}" for j in range(ex.num_interests)])
    ax.set_xticks(
        range(n),
        [f"{ex.name('cate', int(c))[:18]}" for c in ex.hist_cate],
        rotation=70,
        ha="right",
        fontsize=7,
    )
    for t in range(n):
        ax.text(t, ex.assignment[t], "•", ha="center", va="center", color="white", fontsize=9)
    ax.set_title(
        f"user {ex.name('uid', ex.uid)}: routing weights of the history (oldest → newest)", fontsize=9
    )
    fig.colorbar(im, ax=ax, fraction=0.03)
    if with_att:
        ax2 = axes[0, 1]
        ax2.barh(
            range(ex.num_interests),
            ex.attention,
            color=["C3" if j == ex.matched else "C0" for j in range(ex.num_interests)],
        )
        ax2.set_yticks(range(ex.num_interests), [f"{j + 1}" for j in range(ex.num_interests)])
        ax2.invert_yaxis()
        ax2.set_xlim(0, 1)
        ax2.set_title(
            f"attention of target\n{ex.name('item', ex.target)} ({ex.name('cate', ex.target_cate)[:18]})",
            fontsize=8,
        )
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ summary
def capsule_entropy(group: np.ndarray, cate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Category entropy (bits) of each group of items.

    Args: ``group [N]`` non-negative group ids (e.g. ``user_row · K + capsule``), ``cate [N]`` category ids.
    Returns: (group ids present ``[G]``, entropy ``[G]``), and sizes via ``np.unique``."""
    c_span = int(cate.max()) + 1 if cate.size else 1
    key = group.astype(np.int64) * c_span + cate
    uk, counts = np.unique(key, return_counts=True)
    g_of = uk // c_span
    groups, g_idx = np.unique(g_of, return_inverse=True)
    size = np.bincount(g_idx, weights=counts)
    p = counts / size[g_idx]
    ent = np.bincount(g_idx, weights=-p * np.log2(p))
    return groups, ent


def _assignments(model: Any, loader: Any, limit_users: int | None) -> dict[str, np.ndarray]:
    """Per real history item of every label-1 sample: row, capsule (argmax routing), category; and
    per row K_u."""
    rows_, caps_, cats_, kus, lens, wmax = [], [], [], [], [], []
    base = 0
    for batch in loader:
        keep = batch.labels.numpy() == 1
        if limit_users is not None:  # exactly the first N users, not the rest of the last batch
            keep &= np.cumsum(keep) <= limit_users - base
        emb, out = _interests(model, batch.sparse_features)
        L = out.routing_weights.shape[-1]
        hist_cate = batch.sparse_features["hist_cate"].to_padded_dense(L, 0).numpy()
        lengths = emb.hist_lengths.numpy()
        w = out.routing_weights.numpy()[keep]
        hc, ln = hist_cate[keep], lengths[keep]
        ku = out.capsule_mask.numpy()[keep].sum(1)
        real = np.arange(L)[None, :] < ln[:, None]
        r, t = np.nonzero(real)
        rows_.append(r + base)
        caps_.append(w.argmax(1)[r, t])
        wmax.append(w.max(1)[r, t])
        cats_.append(hc[r, t])
        kus.append(ku)
        lens.append(ln)
        base += int(keep.sum())
        if limit_users is not None and base >= limit_users:
            break
    return {
        "row": np.concatenate(rows_),
        "capsule": np.concatenate(caps_),
        "cate": np.concatenate(cats_),
        "k_u": np.concatenate(kus),
        "length": np.concatenate(lens),
        "max_weight": np.concatenate(wmax),
    }


_BUCKET_LABELS = {6: "6–7", 8: "8–9", 10: "≥ 10"}


def _coherence(a: dict[str, np.ndarray], capsule: np.ndarray, k_max: int) -> dict[str, Any]:
    groups, ent = capsule_entropy(a["row"] * k_max + capsule, a["cate"])
    _, size = np.unique(a["row"] * k_max + capsule, return_counts=True)
    multi = size >= 2
    by_size = {}
    for s in (2, 3, 4, 5, 6, 8, 10):
        sel = (size >= s) & (size < {2: 3, 3: 4, 4: 5, 5: 6, 6: 8, 8: 10, 10: 10**9}[s])
        if sel.any():
            by_size[s] = {"capsules": int(sel.sum()), "entropy_bits": float(ent[sel].mean())}
    return {
        "capsules_with_items": int(groups.size),
        "capsules_with_2plus_items": int(multi.sum()),
        "mean_entropy_bits_2plus": float(ent[multi].mean()) if multi.any() else float("nan"),
        "item_weighted_entropy_bits": float((ent * size).sum() / size.sum()),
        "pure_fraction_2plus": float((ent[multi] < 1e-9).mean()) if multi.any() else float("nan"),
        "by_size": by_size,
    }


def interest_summary(run: Any, limit_users: int | None = None, seed: int = 0, batch_size: int = 4096) -> dict:
    """Dataset-level interest statistics on the test split's label-1 samples (one per user for the
    ``din`` protocol): ``K_u`` and effective-interest distributions; capsule category entropy for the
    trained model, a random same-size grouping of each user's items (``seed``), and the untrained model."""
    from iacn_torchrec.data.loader import BatchLoader
    from iacn_torchrec.distributed.setup import build_model_from_config

    tl = run.test_loader

    def mk() -> Any:
        return BatchLoader(
            run.ds,
            "test",
            batch_size=batch_size,
            with_neg_hist=tl.with_neg_hist,
            iacn_negatives=tl.iacn_negatives,
        )

    model = run.model
    k_max = model.iacn.k_max
    a = _assignments(model, mk(), limit_users)

    # random grouping: the same user's items reshuffled over the same capsule labels (same sizes);
    # seeds seed..seed+4 give the spread of the control
    def shuffled(s: int) -> np.ndarray:
        rng = np.random.default_rng(s)
        return a["capsule"][np.lexsort((rng.random(a["row"].size), a["row"]))]

    rand_caps = shuffled(seed)
    rand_means = [_coherence(a, shuffled(seed + i), k_max)["mean_entropy_bits_2plus"] for i in range(5)]
    torch.manual_seed(run.config.seed)
    fresh = build_model_from_config(run.config, run.ds, item_log_q=getattr(model, "item_log_q", None)).eval()
    a0 = _assignments(fresh, mk(), limit_users)
    n_users = int(a["k_u"].size)
    eff = np.bincount(np.unique(a["row"] * k_max + a["capsule"]) // k_max, minlength=n_users)
    eff0 = np.bincount(np.unique(a0["row"] * k_max + a0["capsule"]) // k_max, minlength=n_users)
    distinct_c = np.bincount(
        np.unique(a["row"] * (int(a["cate"].max()) + 1) + a["cate"]) // (int(a["cate"].max()) + 1),
        minlength=n_users,
    )
    hist = lambda x: {int(k): int(v) for k, v in zip(*np.unique(x, return_counts=True), strict=True)}  # noqa: E731
    return {
        "users": n_users,
        "k_max": int(k_max),
        "history_length_mean": float(a["length"].mean()),
        "k_u": hist(a["k_u"]),
        "k_u_mean": float(a["k_u"].mean()),
        "effective_interests": hist(eff),
        "effective_interests_mean": float(eff.mean()),
        "effective_interests_untrained_mean": float(eff0.mean()),
        # how decisive routing is: mean over items of max_j w_ij (1/K_u would be uniform routing)
        "routing_max_weight_mean": float(a["max_weight"].mean()),
        "routing_max_weight_untrained_mean": float(a0["max_weight"].mean()),
        "routing_uniform_max_weight_mean": float((1.0 / a["k_u"][a["row"]]).mean()),
        "distinct_categories_mean": float(distinct_c.mean()),
        "coherence": {
            "trained": _coherence(a, a["capsule"], k_max),
            "random_grouping": _coherence(a, rand_caps, k_max)
            | {
                "mean_entropy_bits_2plus_over_5_seeds": [
                    float(np.mean(rand_means)),
                    float(statistics.stdev(rand_means)),  # the sample SD, as everywhere in the results
                ]
            },
            "untrained": _coherence(a0, a0["capsule"], k_max),
        },
        "seed": seed,
    }


def plot_summary(summary: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ks = sorted(set(summary["k_u"]) | set(summary["effective_interests"]))
    x = np.arange(len(ks))
    ax1.bar(x - 0.2, [summary["k_u"].get(k, 0) for k in ks], 0.4, label="K_u (live capsules)")
    ax1.bar(
        x + 0.2,
        [summary["effective_interests"].get(k, 0) for k in ks],
        0.4,
        label="capsules winning ≥ 1 item",
    )
    ax1.set_xticks(x, [str(k) for k in ks])
    ax1.set_xlabel("interests per user")
    ax1.set_ylabel("users")
    ax1.legend(fontsize=8)
    ax1.set_title(f"{summary['users']:,} test users", fontsize=10)
    for name, style in (("trained", "o-"), ("untrained", "s--"), ("random_grouping", "^:")):
        bs = summary["coherence"][name]["by_size"]
        sizes = [k for k in sorted(bs, key=int) if bs[k]["capsules"] >= 50]  # skip near-empty buckets
        ax2.plot(
            [int(s) for s in sizes],
            [bs[s]["entropy_bits"] for s in sizes],
            style,
            label=name.replace("_", " "),
        )
    ax2.set_xlabel("items assigned to the capsule (bucket lower bound)")
    ax2.set_ylabel("category entropy of the capsule (bits)")
    ax2.set_title("capsule coherence (lower = purer)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def summary_markdown(summary: dict, run: Any, plot_name: str | None, example: str | None) -> str:
    from iacn_torchrec.experiments.reproduce import MODEL_LABELS  # the tables' names of the models

    c = summary["coherence"]
    m = run.metrics.get("test", {})
    label = MODEL_LABELS.get(run.config.model.name, run.config.model.name)
    lines = [
        f"# What the interest capsules learned (Amazon Beauty, {label} + IaCN)"
        if "beauty" in str(run.ds.path).lower()
        else f"# What the interest capsules learned ({label} + IaCN)",
        "",
        f"Run: `{run.config.model.name}` + IaCN (λ={run.config.iacn.lam}, δ={run.config.iacn.delta}, "
        f"p={run.config.iacn.pow_p}, K_max={summary['k_max']}), "
        f"{run.metrics.get('epochs_completed', '?')} epoch(s), "
        f"step {run.step}, seed {run.config.seed}; test AUC {m.get('auc', float('nan')):.4f}, "
        f"GAUC {m.get('gauc', float('nan')):.4f}. Data: `{run.ds.path}` ({run.ds.protocol} protocol, "
        f"L={run.ds.max_len}). Produced by `{summary.get('command', 'iacn explain --run RUN --summary')}` "
        f"(run `{run.path}`; random-grouping seed {summary['seed']}; versions "
        f"{json.dumps(summary.get('versions', {}))}).",
        "",
        f"Users: the {summary['users']:,} label-1 test samples (one per user), mean history length "
        f"{summary['history_length_mean']:.1f}, mean {summary['distinct_categories_mean']:.2f} distinct "
        "categories per history.",
        "",
        "## How many interests users get",
        "",
        "| interests | users by K_u = clamp(ceil(log2 n_u), 1, K_max) "
        "| users by capsules that win ≥ 1 item |",
        "|---:|---:|---:|",
    ]
    ks = sorted(set(summary["k_u"]) | set(summary["effective_interests"]))
    for k in ks:
        lines.append(f"| {k} | {summary['k_u'].get(k, 0):,} | {summary['effective_interests'].get(k, 0):,} |")
    lines += [
        "",
        f"Mean K_u {summary['k_u_mean']:.2f}; mean capsules that win at least one history item (largest "
        f"routing weight) {summary['effective_interests_mean']:.2f} trained vs "
        f"{summary['effective_interests_untrained_mean']:.2f} untrained. Routing decisiveness (mean over "
        f"history items of the largest routing weight max_j w_ij): {summary['routing_max_weight_mean']:.2f} "
        f"trained, {summary['routing_max_weight_untrained_mean']:.2f} untrained, "
        f"{summary['routing_uniform_max_weight_mean']:.2f} for uniform routing (1/K_u).",
        "",
        "## How coherent a capsule is in category terms",
        "",
        "Each history item is assigned to its largest-weight capsule; a capsule's coherence is the "
        "entropy (bits) of its items' categories (0 = one category). Controls: the same users' items "
        "randomly regrouped into groups of the same sizes (seeded), and the same architecture with its "
        "initial, untrained weights (eval-mode routing as well).",
        "",
        "| grouping | capsules with ≥ 2 items | mean entropy (bits) | item-weighted entropy "
        "| category-pure capsules |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("trained", "trained IaCN capsules"),
        ("random_grouping", "random grouping, same sizes"),
        ("untrained", "untrained IaCN capsules"),
    ):
        x = c[name]
        lines.append(
            f"| {label} | {x['capsules_with_2plus_items']:,} | {x['mean_entropy_bits_2plus']:.3f} | "
            f"{x['item_weighted_entropy_bits']:.3f} | {x['pure_fraction_2plus']:.1%} |"
        )
    rs = c["random_grouping"]["mean_entropy_bits_2plus_over_5_seeds"]
    lines += ["", f"Random grouping over 5 seeds: mean entropy {rs[0]:.3f} ± {rs[1]:.3f} bits (SD)."]
    lines += [
        "",
        "By capsule size (mean entropy, bits):",
        "",
        "| items in capsule | trained | random grouping | untrained (its own sizes) |",
        "|---|---:|---:|---:|",
    ]
    for s in sorted(c["trained"]["by_size"], key=int):

        def g(name: str, s: Any = s) -> str:
            v = c[name]["by_size"].get(s)
            return f"{v['entropy_bits']:.3f} ({v['capsules']:,})" if v else "–"

        lab = _BUCKET_LABELS.get(int(s), str(s))
        lines.append(f"| {lab} | {g('trained')} | {g('random_grouping')} | {g('untrained')} |")
    if plot_name:
        lines += ["", f"![interests per user and capsule coherence]({plot_name})"]
    if example:
        lines += ["", "## One user", "", "```", example, "```"]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run directory of an IaCN-trained model")
    parser.add_argument("--data", help="prepared dataset (default: the run's data.path)")
    parser.add_argument("--user", help="raw user id to explain")
    parser.add_argument("--target", help="raw item id, or 'heldout' for the user's held-out test item")
    parser.add_argument("--plot", help="write a PNG figure here")
    parser.add_argument("--summary", action="store_true", help="dataset-level interest statistics")
    parser.add_argument("--md", help="with --summary: write the markdown report here")
    parser.add_argument("--example-user", help="with --summary --md: include this user's explanation")
    parser.add_argument("--limit-users", type=int, help="with --summary: only the first N test users")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --summary: seed of the random-grouping control (default 0)")
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    from iacn_torchrec.runtime import set_threads
    from iacn_torchrec.serving.export import load_run

    set_threads(args.threads)
    problem = None
    if bool(args.summary) == bool(args.user):
        problem = "pass either --user UID (one user) or --summary (the whole test split)"
    elif args.limit_users is not None and args.limit_users < 1:
        problem = f"--limit-users must be >= 1, got {args.limit_users}"
    elif not args.summary and (args.md or args.example_user or args.limit_users):
        problem = "--md, --example-user and --limit-users go with --summary"
    elif args.summary and args.target:
        problem = "--target goes with --user (one user's explanation), not --summary"
    elif args.summary and args.example_user and not args.md:
        problem = "--example-user goes with --md (the report shows that user)"
    elif not args.summary and args.seed is not None:
        problem = "--seed goes with --summary (it seeds the random-grouping control)"
    if problem:
        print(f"iacn explain: {problem}", file=sys.stderr)
        return 2
    # before the work: a figure or report that cannot be written would fail after it
    if args.plot:
        check_output_path(args.plot, "--plot")
    if args.md:
        check_output_path(args.md, "--md", parents=True)
    try:
        r = load_run(args.run, data=args.data)
        if r.model.iacn is None:
            raise ValueError(f"{args.run}: trained without IaCN: no interest capsules to explain")
        if args.user:
            ex = explain_user(r, args.user, args.target)
            print(format_explanation(ex))
            if args.plot:
                plot_explanation(ex, args.plot)
                print(f"\nfigure: {args.plot}")
            return 0
        s = interest_summary(r, limit_users=args.limit_users, seed=args.seed or 0)
        s["command"] = shlex.join(["iacn", "explain", *sys.argv[2:]]) if sys.argv[1:2] == ["explain"] \
            else "iacn explain --run RUN --summary"
        s["versions"] = versions()
        example = None
        if args.md and args.example_user:
            example = format_explanation(explain_user(r, args.example_user, "heldout"))
        if args.plot:
            plot_summary(s, args.plot)
            print(f"figure: {args.plot}")
    # explain's own lookups only: another KeyError is a bug, and keeps its traceback
    except (ExplainError, ValueError, FileNotFoundError) as e:
        print(f"iacn explain: {e}", file=sys.stderr)
        return 2
    c = s["coherence"]
    print(
        f"{s['users']:,} users; mean K_u {s['k_u_mean']:.2f}; K_u counts {s['k_u']}; "
        f"capsules winning ≥1 item: mean {s['effective_interests_mean']:.2f} ({s['effective_interests']})"
    )
    for name in ("trained", "random_grouping", "untrained"):
        x = c[name]
        print(
            f"  {name:<16} mean category entropy (capsules with ≥2 items) "
            f"{x['mean_entropy_bits_2plus']:.3f} bits, "
            f"pure {x['pure_fraction_2plus']:.1%} of {x['capsules_with_2plus_items']:,}"
        )
    if args.md:
        # the figure as the report's own folder reaches it
        plot_name = os.path.relpath(Path(args.plot).resolve(), Path(args.md).parent.resolve()) if args.plot \
            else None
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.md, summary_markdown(s, r, plot_name, example))
        print(f"report: {args.md}")
    if math.isnan(c["trained"]["mean_entropy_bits_2plus"]):
        print("  (no capsule got 2 or more items)")
    return 0
