"""Checkpoints are verified: truncated, corrupted, incomplete or mismatched ones raise
`CheckpointError` naming the file, and `train()` refuses to resume from them."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from iacn_torchrec.train.checkpoint import (
    CheckpointError,
    incomplete_note,
    latest_step,
    load_checkpoint,
    save_checkpoint,
)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(50, 8, generator=g)}, "optimizer": {}, "train_state": {"step": seed},
            "rng": {}}


@pytest.fixture()
def root(tmp_path) -> str:
    r = str(tmp_path / "checkpoints")
    save_checkpoint(r, 3, _state(3))
    save_checkpoint(r, 5, _state(5))
    return r


def test_round_trip_and_newest(root):
    assert latest_step(root) == 5
    ck = load_checkpoint(root)
    assert torch.equal(ck["model"]["w"], _state(5)["model"]["w"])
    assert torch.equal(load_checkpoint(root, 3)["model"]["w"], _state(3)["model"]["w"])


def test_truncated_file_is_detected(root):
    f = Path(root) / "step_00000005" / "rank0.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"rank0\.pt: truncated"):
        load_checkpoint(root)


def test_corrupted_file_is_detected(root):
    f = Path(root) / "step_00000005" / "rank0.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"rank0\.pt: corrupted \(sha256"):
        load_checkpoint(root)


def test_missing_rank_file_is_detected(root):
    (Path(root) / "step_00000005" / "rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(root)


def test_incomplete_checkpoint_is_never_picked(root):
    d = Path(root) / "step_00000005"
    (d / "manifest.json").unlink()  # as if the writer died before the manifest
    (Path(root) / "step_00000009.tmp").mkdir()  # a half-written one
    assert latest_step(root) == 3
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(root, 5)


def _replace_matching_manifest(f: Path, data: bytes) -> None:
    """Write ``data`` as ``f`` and update its manifest entry to match (size and sha256 pass)."""
    import hashlib

    f.write_bytes(data)
    mpath = f.parent / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    mpath.write_text(json.dumps(manifest))


@pytest.mark.parametrize("data, shown", [
    (b"hello", r"UnpicklingError: "),
    (b"", r"EOFError: Ran out of input"),
    (b"PK\x03\x04 not a zip", r"RuntimeError: PytorchStreamReader failed"),
])
def test_a_file_that_is_no_torch_checkpoint_is_a_checkpoint_error(root, data, shown):
    """A file whose size and sha256 match the manifest but that torch cannot read: the error names
    the file, in one line (no unpickler traceback)."""
    f = Path(root) / "step_00000005" / "rank0.pt"
    _replace_matching_manifest(f, data)
    wanted = rf"^{re.escape(str(f))}: not a readable checkpoint \({shown}[^\n]*\)$"
    with pytest.raises(CheckpointError, match=wanted):
        load_checkpoint(root)
    buf = io.BytesIO()
    torch.save([1, 2], buf)  # a torch file, but not a state dict
    _replace_matching_manifest(f, buf.getvalue())
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(f))}: not a checkpoint \(a list"):
        load_checkpoint(root)


@pytest.mark.parametrize("state, shown", [
    ({"foo": 1}, "no 'model', 'optimizer', 'train_state', 'rng'; it holds 'foo'"),
    ({"model": {}, "optimizer": {}, "train_state": {}},
     "no 'rng'; it holds 'model', 'optimizer', 'train_state'"),
    ({"model": 3, "optimizer": {}, "train_state": {}, "rng": {}}, "'model' is of type int, not a state dict"),
])
def test_a_torch_file_without_the_training_state_is_a_checkpoint_error(root, state, shown):
    """A torch file whose manifest entry matches but that holds no (or not all of the) training
    state: named with the missing keys, not a KeyError wherever a key is first read."""
    f = Path(root) / "step_00000005" / "rank0.pt"
    buf = io.BytesIO()
    torch.save(state, buf)
    _replace_matching_manifest(f, buf.getvalue())
    wanted = rf"^{re.escape(str(f))}: not a checkpoint \({re.escape(shown)}\)$"
    with pytest.raises(CheckpointError, match=wanted):
        load_checkpoint(root)


def test_incomplete_newer_checkpoints_are_named(root):
    assert incomplete_note(root, 5, "resuming from step 5") is None
    (Path(root) / "step_00000005" / "manifest.json").unlink()
    (Path(root) / "step_00000007.tmp").mkdir()
    (Path(root) / "step_00000001").mkdir()  # older than the one used: not announced
    assert incomplete_note(root, latest_step(root), "exporting step 3") == (
        f"note: {root}/step_00000005 is incomplete (no manifest.json); {root}/step_00000007.tmp is "
        "incomplete (a save in progress or interrupted); exporting step 3")
    assert incomplete_note(str(Path(root) / "absent"), None, "x") is None


def test_corrupted_manifest_is_detected(root):
    (Path(root) / "step_00000005" / "manifest.json").write_text('{"step": 5, "world')
    with pytest.raises(CheckpointError, match="corrupted manifest"):
        load_checkpoint(root)


@pytest.mark.parametrize("manifest, shown", [
    ('{"step": 5, "files": []}', r"world_size None"),
    ('{"step": 5, "world_size": 2, "files": [{"file": "rank0.pt", "bytes": 1, "sha256": "x"}]}',
     r"each of its 2 rank"),
    ('{"step": 5, "world_size": 1, "files": [{"file": "rank0.pt"}]}', r"file, bytes, sha256"),
])
def test_malformed_manifest_is_a_checkpoint_error(root, manifest, shown):
    (Path(root) / "step_00000005" / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointError, match=rf"manifest\.json: corrupted manifest \(.*{shown}"):
        load_checkpoint(root)


def test_rewriting_a_step_swaps_it_in(root, monkeypatch):
    """A second checkpoint of step 5 replaces the first whole; if the swap fails half-way, no step_5
    that looks complete but holds a mix is left (the previous step is the newest)."""
    save_checkpoint(root, 5, _state(7))
    assert torch.equal(load_checkpoint(root, 5)["model"]["w"], _state(7)["model"]["w"])
    assert sorted(p.name for p in Path(root).iterdir()) == ["step_00000003", "step_00000005"]
    from iacn_torchrec.train import checkpoint as ck_module

    real_mv = ck_module.path_manager.mv

    def mv_fails_for_the_new_one(src, dst, **kw):
        if src.endswith(".tmp"):
            return False
        return real_mv(src, dst, **kw)

    monkeypatch.setattr(ck_module.path_manager, "mv", mv_fails_for_the_new_one)
    with pytest.raises(CheckpointError, match="could not rename"):
        save_checkpoint(root, 5, _state(8))
    monkeypatch.undo()
    assert latest_step(root) == 3
    # the next save clears what the failed one left (step_5.tmp, step_5.replaced) and any step
    # folder whose removal was interrupted (no manifest)
    (Path(root) / "step_00000004").mkdir()
    save_checkpoint(root, 6, _state(6))
    assert sorted(p.name for p in Path(root).iterdir()) == ["step_00000003", "step_00000006"]


def test_other_world_size_is_refused(root):
    with pytest.raises(CheckpointError, match="written by 1 rank.*this run has 2"):
        load_checkpoint(root, rank=0, world_size=2)


def test_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(str(tmp_path / "nothing"))


def test_train_refuses_a_corrupted_checkpoint(tmp_path):
    """The loop resumes from OUT's newest checkpoint: a damaged one stops it with the error."""
    from iacn_torchrec.distributed.testing import write_tiny_dataset
    from iacn_torchrec.train.config import TrainConfig
    from iacn_torchrec.train.loop import train

    data = write_tiny_dataset(tmp_path / "tiny")
    config = TrainConfig.from_dict({"data": {"path": str(data), "batch_size": 16}, "max_steps": 2,
                                    "out": str(tmp_path / "run"), "progress": False, "threads": 1})
    first = train(config)
    assert first["steps"] == 2 and first["resumed_from_step"] is None
    f = tmp_path / "run" / "checkpoints" / "step_00000002" / "rank0.pt"
    manifest = json.loads((f.parent / "manifest.json").read_text())
    assert manifest["files"][0]["bytes"] == f.stat().st_size
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        train(config.override(["max_steps=3"]))
