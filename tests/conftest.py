"""Shared fixtures: repository paths and a prepared copy of the embedded Beauty data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BEAUTY_RAW = REPO / "data" / "amazon-beauty"  # the project's own copy (gzip TSVs)
DIEN_SAMPLE = SHARED / "data" / "dien-books-sample"
MOVIELENS = SHARED / "data" / "movielens-100k"

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def beauty_prepared(tmp_path_factory) -> Path:
    """The embedded Beauty data prepared once per test session (din protocol, max_len 20, seed 0)."""
    from iacn_torchrec.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("beauty") / "din-L20-s0"
    prepare_dataset(
        source="tsv",
        interactions=BEAUTY_RAW / "interactions.tsv.gz",
        items=BEAUTY_RAW / "items.tsv.gz",
        protocol="din",
        max_len=20,
        seed=0,
        out=out,
        progress=False,
    )
    return out
