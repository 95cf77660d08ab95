"""Synthetic users with planted interests (for testing what the interest capsules recover).

The catalogue is split into ``num_groups`` disjoint *interest groups*; group g owns
``cates_per_group`` categories and each category ``items_per_cate`` items. Every user has exactly
two planted interests (two distinct groups drawn uniformly) and a sequence of ``n_u`` interactions
(``n_u`` uniform in ``[min_len, max_len]``); each interaction picks one of the user's two groups
with probability 1/2, then a category of that group and an item of that category uniformly. So a
user's history mixes two disjoint category groups, and the groups co-occur across users only
through the pairs users hold — the capsules should separate each user's two groups.

Files are written in the ``tsv`` source format of :mod:`iacn_torchrec.data.sources` (read them with
``prepare_dataset(source="tsv", interactions=..., items=..., category_column="cate")``):
``interactions.tsv`` (``user_id, item_id, timestamp``) and ``items.tsv`` (``item_id, cate, group``).
Raw ids: users ``u00042``, items ``g1c0i07`` (group 1, category 0 of the group, item 7), categories
``g1c0``. Every draw comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PlantedInterests", "make_planted_interests", "item_group_of"]


@dataclass
class PlantedInterests:
    """Paths of the written files and the ground truth: ``user_groups`` raw user id → its two groups."""

    interactions: Path
    items: Path
    num_groups: int
    user_groups: dict[str, tuple[int, int]]


def item_group_of(raw_item: str) -> int:
    """The planted group of a raw item id ``g<group>c<cate>i<item>``."""
    if not raw_item.startswith("g") or "c" not in raw_item:
        raise ValueError(f"not a planted-interest item id: {raw_item!r}")
    return int(raw_item[1 : raw_item.index("c")])


def make_planted_interests(
    out_dir: str | Path,
    num_users: int = 600,
    num_groups: int = 4,
    cates_per_group: int = 2,
    items_per_cate: int = 20,
    min_len: int = 8,
    max_len: int = 16,
    seed: int = 0,
) -> PlantedInterests:
    """Write the planted-interest interactions and item table under ``out_dir`` (see the module doc)."""
    if num_groups < 2 or cates_per_group < 1 or items_per_cate < 1 or num_users < 1:
        raise ValueError("need num_groups >= 2 and positive num_users, cates_per_group, items_per_cate")
    if not 3 <= min_len <= max_len:
        raise ValueError(f"need 3 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # two distinct groups per user: the first uniform, the second uniform over the others
    g1 = rng.integers(0, num_groups, num_users)
    g2 = (g1 + rng.integers(1, num_groups, num_users)) % num_groups
    n = rng.integers(min_len, max_len + 1, num_users)
    user_of = np.repeat(np.arange(num_users), n)
    m = user_of.size
    pick = rng.random(m) < 0.5
    group = np.where(pick, g1[user_of], g2[user_of])
    cate = rng.integers(0, cates_per_group, m)
    item = rng.integers(0, items_per_cate, m)
    ts = np.arange(m) - np.repeat(np.cumsum(n) - n, n) + 1  # 1..n_u per user: strictly increasing

    width = len(str(items_per_cate - 1))
    users = [f"u{u:05d}" for u in range(num_users)]
    with open(out / "interactions.tsv", "w") as f:
        f.write("user_id\titem_id\ttimestamp\n")
        f.writelines(
            f"{users[u]}\tg{g}c{c}i{i:0{width}d}\t{t}\n"
            for u, g, c, i, t in zip(
                user_of.tolist(), group.tolist(), cate.tolist(), item.tolist(), ts.tolist(), strict=True
            )
        )
    with open(out / "items.tsv", "w") as f:
        f.write("item_id\tcate\tgroup\n")
        for g in range(num_groups):
            for c in range(cates_per_group):
                f.writelines(f"g{g}c{c}i{i:0{width}d}\tg{g}c{c}\t{g}\n" for i in range(items_per_cate))
    return PlantedInterests(
        out / "interactions.tsv",
        out / "items.tsv",
        num_groups,
        {users[u]: (int(g1[u]), int(g2[u])) for u in range(num_users)},
    )
