"""Atomic, verified, resumable checkpoints through iopath's ``PathManager``.

Layout (one folder per checkpoint, every rank writes its own file)::

    RUN_DIR/checkpoints/step_00000120/
        rank0.pt  rank1.pt ...       torch.save payloads (model, optimizer, step, data position, RNG)
        manifest.json                written last: step, world_size, and size + sha256 of every file

Sharded tables and fused optimizer states (``ShardedTensor``) are stored as this rank's shards
plus the global shard metadata (`iacn_torchrec.distributed.checkpointing`): readable by any
process, turned back into ``ShardedTensor`` s on the rank that wrote them. A checkpoint belongs to
its world size and plan; loading it with another world size raises `CheckpointError`.

A checkpoint is written into ``step_N.tmp/`` and renamed to ``step_N/`` only once every rank's
file and the manifest are complete and flushed to disk, so a crash leaves nothing that looks
valid; a second checkpoint of the same step is swapped in (the old one set aside first), and a
removal deletes the manifest first. Loading picks
the newest complete checkpoint and verifies sizes and hashes: a truncated or corrupted file
raises `CheckpointError` naming the file, never loads silently.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
from pathlib import PurePosixPath
from typing import Any

import torch
import torch.distributed as dist
from iopath.common.file_io import PathManager

from iacn_torchrec.errors import UserError

path_manager = PathManager()
_STEP_DIR = re.compile(r"^step_(\d+)$")
_UNFINISHED_DIR = re.compile(r"^step_(\d+)(\.tmp)?$")
MANIFEST = "manifest.json"
#: what every rank's file of a training checkpoint holds (besides history, loss_ema, config_fingerprint, plan)
REQUIRED_KEYS = ("model", "optimizer", "train_state", "rng")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not match this run."""


class CheckpointWorldSizeError(CheckpointError):
    """An intact checkpoint written by another number of ranks (every older one was too)."""


def _join(*parts: str) -> str:
    return str(PurePosixPath(parts[0]).joinpath(*parts[1:]))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(
    root: str, step: int, state: dict[str, Any], rank: int = 0, world_size: int = 1, keep: int = 2
) -> str:
    """Write ``state`` of this rank as checkpoint ``step`` under ``root``; all ranks must call it.

    Returns the final checkpoint directory. Keeps the newest ``keep`` checkpoints.
    """
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if rank == 0:
        if path_manager.exists(tmp):
            path_manager.rm(tmp) if path_manager.isfile(tmp) else _rmtree(tmp)
        path_manager.mkdirs(tmp)
    _barrier()
    from iacn_torchrec.distributed.checkpointing import to_portable

    buf = io.BytesIO()
    torch.save(to_portable(state), buf)
    payload = buf.getvalue()
    name = f"rank{rank}.pt"
    with path_manager.open(_join(tmp, name), "wb") as f:
        f.write(payload)
    _fsync(_join(tmp, name))
    entry = {"file": name, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    entries = _gather(entry, world_size)
    if rank == 0:
        manifest = {"step": step, "world_size": world_size, "files": entries}
        with path_manager.open(_join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _fsync(_join(tmp, MANIFEST))
        _fsync(tmp)  # the files are on disk before the rename makes them the checkpoint
        replaced = None
        if path_manager.exists(final):  # a rerun of the same step (e.g. after a resume): set the old
            # one aside first, so a crash never leaves a half-deleted step_N that looks complete
            replaced = final + ".replaced"
            if path_manager.exists(replaced):
                _rmtree(replaced)
            if not path_manager.mv(final, replaced):
                raise CheckpointError(f"could not rename {final} to {replaced}")
        if not path_manager.mv(tmp, final):
            raise CheckpointError(f"could not rename {tmp} to {final}")
        _fsync(root)
        if replaced is not None:
            _rmtree(replaced)
        for old in sorted(complete_steps(root))[:-keep] if keep > 0 else []:
            _rmtree(step_dir(root, old))
        remove_leftovers(root)
    _barrier()
    return final


def remove_leftovers(root: str) -> None:
    """What interrupted saves and removals leave (this run's rank 0 is the only writer of ``root``,
    and its own save is complete by now): ``step_N.tmp`` / ``step_N.replaced`` folders and
    ``step_N`` folders without a manifest."""
    for name in path_manager.ls(root):
        p = _join(root, name)
        stray = name.startswith("step_") and (name.endswith((".tmp", ".replaced")) or (
            _STEP_DIR.match(name) and not path_manager.exists(_join(p, MANIFEST))))
        if stray and path_manager.isdir(p):
            _rmtree(p)


def _fsync(path: str) -> None:
    """Flush a local file or folder to disk (after a power loss a renamed checkpoint must not hold
    empty files); other iopath backends keep their own guarantees."""
    if "://" in path:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network/FUSE file systems cannot fsync a folder: their own guarantees
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF) or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _rmtree(path: str) -> None:
    """Remove a checkpoint folder, its manifest first: interrupted, it no longer looks complete."""
    children = path_manager.ls(path)
    if MANIFEST in children:
        path_manager.rm(_join(path, MANIFEST))
        children.remove(MANIFEST)
    for child in children:
        p = _join(path, child)
        if path_manager.isdir(p):
            _rmtree(p)
        else:
            path_manager.rm(p)
    os.rmdir(path_manager.get_local_path(path))


def step_dir(root: str, step: int) -> str:
    """The folder of checkpoint ``step`` under ``root``."""
    return _join(root, f"step_{step:08d}")


def complete_steps(root: str) -> list[int]:
    """The steps of ``root``'s complete checkpoints (those with a manifest), oldest first."""
    if not path_manager.exists(root):
        return []
    steps = []
    for name in path_manager.ls(root):
        m = _STEP_DIR.match(name)
        if m and path_manager.exists(_join(root, name, MANIFEST)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(root: str) -> int | None:
    steps = complete_steps(root)
    return steps[-1] if steps else None


def incomplete_note(root: str, newer_than: int | None, then: str) -> str | None:
    """``"note: ROOT/step_N is incomplete (no manifest.json); THEN"`` for the checkpoint folders newer
    than step ``newer_than`` (None: all) that a save or a removal left unfinished, or None when
    there are none: resuming, exporting or explaining passes over them, and says so."""
    if not path_manager.exists(root):
        return None
    found = []
    for name in path_manager.ls(root):
        m = _UNFINISHED_DIR.match(name)
        if not m or (newer_than is not None and int(m.group(1)) <= newer_than):
            continue
        if m.group(2):
            found.append((int(m.group(1)), f"{_join(root, name)} is incomplete (a save in progress or "
                                           "interrupted)"))
        elif not path_manager.exists(_join(root, name, MANIFEST)):
            found.append((int(m.group(1)), f"{_join(root, name)} is incomplete (no {MANIFEST})"))
    return "note: " + "; ".join(text for _, text in sorted(found)) + f"; {then}" if found else None


def _manifest(root: str, step: int | None) -> tuple[int, str, dict[str, Any]]:
    """``(step, directory, manifest)`` of checkpoint ``step`` (default: the newest complete one)."""
    if step is None:
        step = latest_step(root)
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {root}")
    d = step_dir(root, step)
    mpath = _join(d, MANIFEST)
    if not path_manager.exists(mpath):
        raise CheckpointError(f"{d}: no {MANIFEST}; the checkpoint is incomplete")
    try:
        with path_manager.open(mpath, "r") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath}: corrupted manifest (not an object)")
    ws, files = manifest.get("world_size"), manifest.get("files")
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise CheckpointError(f"{mpath}: corrupted manifest (world_size {ws!r})")
    if not isinstance(files, list) or len(files) != ws or not all(
        isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("bytes"), int)
        and isinstance(e.get("sha256"), str) for e in files
    ):
        raise CheckpointError(f"{mpath}: corrupted manifest (files must list file, bytes, sha256 for each "
                              f"of its {ws} rank(s))")
    return step, d, manifest


def load_checkpoint(
    root: str, step: int | None = None, rank: int = 0, world_size: int = 1, sharded: bool = True
) -> dict[str, Any]:
    """Load this rank's state of checkpoint ``step`` (default: the newest complete one), verified.

    ShardedTensors come back as such when ``sharded`` and this process is that rank of a process
    group of that size (the training run), else as `PortableShards` (this rank's shards + global
    metadata).

    Raises `CheckpointError` when there is none, when it was written by another world size (the
    per-rank files hold that run's shards), when a file's size or sha256 does not match, or when
    it is no torch file or does not hold the training state (`REQUIRED_KEYS`, ``model`` a dict).
    """
    _, d, manifest = _manifest(root, step)
    if manifest.get("world_size") != world_size:
        raise CheckpointWorldSizeError(
            f"{d} was written by {manifest.get('world_size')} rank(s) and this run has {world_size}: "
            "sharded per-rank states cannot be re-sharded by this format; resume with the same world size"
        )
    entry = manifest["files"][rank]
    fpath = _join(d, entry["file"])
    if not path_manager.exists(fpath):
        raise CheckpointError(f"{fpath}: missing")
    with path_manager.open(fpath, "rb") as f:
        payload = f.read()
    if len(payload) != entry["bytes"]:
        raise CheckpointError(f"{fpath}: truncated ({len(payload)} bytes, manifest says {entry['bytes']})")
    if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{fpath}: corrupted (sha256 does not match the manifest)")
    from iacn_torchrec.distributed.checkpointing import from_portable

    # ShardedTensors again only in the rank that wrote the file, inside a group of the same size (the
    # training run); portable shards for inspection anywhere else (e.g. rank 1's file read by rank 0),
    # on the CPU (a GPU run's checkpoint then loads on a CPU-only box too)
    in_run = (
        sharded and dist.is_available() and dist.is_initialized()
        and dist.get_world_size() == world_size and dist.get_rank() == rank
    )
    try:
        state = torch.load(io.BytesIO(payload), weights_only=False, map_location=None if in_run else "cpu")
    except torch.OutOfMemoryError:
        raise
    # the manifest matches, but the file is no torch checkpoint (written by something else, or with
    # its manifest edited to match)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, ImportError, AttributeError) as e:
        detail = re.split(r"(?<=\.)\s", str(e).strip() or "empty", maxsplit=1)[0].splitlines()[0]
        raise CheckpointError(f"{fpath}: not a readable checkpoint ({type(e).__name__}: {detail})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{fpath}: not a checkpoint (a {type(state).__name__}, not a state dict)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        held = ", ".join(map(repr, list(state)[:8])) + (", ..." if len(state) > 8 else "") or "nothing"
        raise CheckpointError(
            f"{fpath}: not a checkpoint (no {', '.join(map(repr, missing))}; it holds {held})")
    if not isinstance(state["model"], dict):
        kind = type(state["model"]).__name__
        raise CheckpointError(f"{fpath}: not a checkpoint ('model' is of type {kind}, not a state dict)")
    return from_portable(state) if in_run else state


def load_full_state(root: str, step: int | None = None) -> dict[str, Any]:
    """Rank 0's state of checkpoint ``step`` (default: the newest), outside the training run, with
    ``"model"`` the whole model state: every rank's file is read and each sharded table is assembled
    from all its shards, so a run sharded over any number of processes (or using a fused table
    optimizer) loads into the unsharded model (export, explain, serving benchmarks). The rest
    (``config_fingerprint``, ``train_state``, ...) as rank 0 saved it."""
    from iacn_torchrec.distributed.checkpointing import PortableShards, full_tensor

    step, d, manifest = _manifest(root, step)
    world_size = manifest.get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"{d}: corrupted manifest (world_size {world_size!r})")
    first = load_checkpoint(root, step, rank=0, world_size=world_size, sharded=False)
    states = [first["model"]] + [
        load_checkpoint(root, step, rank=r, world_size=world_size, sharded=False)["model"]
        for r in range(1, world_size)
    ]
    out = {}
    for key, value in states[0].items():
        if isinstance(value, PortableShards):
            out[key] = full_tensor([s[key] for s in states])
        else:
            out[key] = value
    return {**first, "model": out}


def state_dict_mismatch(e: Exception) -> str:
    """The first line that says what differs in ``load_state_dict``'s error (several lines, a tab
    before each: ``size mismatch for tower.0.weight: ...``), for a one-line message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[1] if len(lines) > 1 else lines[0]) if lines else type(e).__name__


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # IaCN's routing logits draw there
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], where: str = "the checkpoint") -> None:
    """Restore :func:`rng_state`'s generators; a malformed state (a damaged or hand-made checkpoint)
    is a `CheckpointError` naming ``where``."""
    import random

    import numpy as np

    try:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: its 'rng' state is damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
