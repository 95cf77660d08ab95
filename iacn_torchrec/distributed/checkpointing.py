"""Sharded state in checkpoints: ShardedTensors as plain, process-group-free payloads.

A ``ShardedTensor`` (TorchRec's sharded tables and their fused optimizer states) can be pickled,
but unpickling one needs an initialised process group and re-validates the shards collectively.
Checkpoints therefore store :class:`PortableShards` instead — this rank's shards (plain tensors)
plus the global ``ShardedTensorMetadata`` — which any process can read (inspection, tests,
hashing), and which :func:`from_portable` turns back into a ``ShardedTensor`` on the loading
rank without a collective (``_init_from_local_shards_and_global_metadata``), so ranks may load
in any order and a rank without shards of a table (table-wise placement) needs no special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata

__all__ = ["PortableShards", "to_portable", "from_portable", "full_tensor"]


@dataclass
class PortableShards:
    """One rank's part of a ``ShardedTensor``: ``shards`` = [(ShardMetadata, tensor)], and the
    global metadata (size, dtype, every rank's shard placement)."""

    metadata: ShardedTensorMetadata
    shards: list[tuple[ShardMetadata, torch.Tensor]]

    @property
    def size(self) -> torch.Size:
        return self.metadata.size


def to_portable(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples) with every ShardedTensor replaced by PortableShards."""
    if isinstance(obj, ShardedTensor):
        return PortableShards(obj.metadata(), [(s.metadata, s.tensor.detach()) for s in obj.local_shards()])
    if isinstance(obj, dict):
        return {k: to_portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_portable(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_portable(v) for v in obj)
    return obj


def from_portable(obj: Any) -> Any:
    """Inverse of :func:`to_portable` on the rank that saved it (needs the default process group)."""
    if isinstance(obj, PortableShards):
        shards = [Shard(tensor=t, metadata=m) for m, t in obj.shards]
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, obj.metadata)
    if isinstance(obj, dict):
        return {k: from_portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_portable(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_portable(v) for v in obj)
    return obj


def full_tensor(parts: list[PortableShards]) -> torch.Tensor:
    """Assemble the whole tensor from every rank's :class:`PortableShards` of it (e.g. one entry of
    each rank's checkpoint file); raises if the shards do not cover it."""
    if not parts:
        raise ValueError("full_tensor: no parts")
    size = tuple(parts[0].size)
    out = torch.zeros(size, dtype=parts[0].metadata.tensor_properties.dtype)
    covered = 0
    for p in parts:
        for m, t in p.shards:
            idx = tuple(slice(o, o + n) for o, n in zip(m.shard_offsets, m.shard_sizes, strict=True))
            out[idx] = t
            covered += t.numel()
    if covered != out.numel():
        raise ValueError(
            f"full_tensor: shards cover {covered} of {out.numel()} elements of a {list(size)} tensor"
        )
    return out
