"""Folders written by torch.distributed.checkpoint (DCP): this package's own reader, and the
writer of sharded training checkpoints.

Reading does not go through torch's DCP reader, which unpickles ``.metadata`` without
restriction and non-tensor entries with ``weights_only=False``: the metadata goes through
``safe_pickle.load_dcp_metadata``, every stored chunk through ``torch.load(weights_only=True)``,
and entries that are not tensors are left out (the caller logs them). Before anything is
read, every chunk's file (a plain name inside the folder), byte range (inside the file) and
place in its tensor (inside it; the chunks tiling it exactly once) is checked.

A tensor can be read whole (``StoredTensor.read()``: what ``load_checkpoint`` does in one
process) or one region of it (``read(offsets, sizes)``: what a process of a sharded run
reads for its own shard, from the chunks that overlap it, whatever the number of processes
that wrote the folder).

Writing (``save``) uses torch's own DCP writer into a temporary folder that is renamed
when complete, with the training state that is not tensors (iteration, schedulers, the
message hub) in ``runner_state.pth`` beside it, read back by the safe loader.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import safe_pickle
from .base import CheckpointError, inside, ints, regular_file

RUNNER_STATE = "runner_state.pth"
MAX_METADATA_BYTES = 1 << 28  # a 6B model's FSDP metadata with optimizer state is a few MB
MAX_CHUNKS = 1 << 16  # chunks per tensor: one per process that held a part of it


@dataclass
class Chunk:
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    path: str
    start: int
    length: int


@dataclass
class StoredTensor:
    fqn: str
    size: Tuple[int, ...]
    dtype: torch.dtype
    chunks: List[Chunk]
    where: str

    def read(self, offsets: Optional[Sequence[int]] = None, sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of the tensor (default: all of it), read from
        the chunks that overlap it."""
        offsets = tuple(offsets) if offsets is not None else (0,) * len(self.size)
        sizes = tuple(sizes) if sizes is not None else self.size
        if len(offsets) != len(self.size) or any(o < 0 or o + n > s for o, n, s in zip(offsets, sizes, self.size)):
            raise CheckpointError(f"{self.where}: region {offsets} + {sizes} lies outside {self.size}")
        out = torch.empty(sizes, dtype=self.dtype)
        for c in self.chunks:
            lo = [max(o, co) for o, co in zip(offsets, c.offsets)]
            hi = [min(o + n, co + cn) for o, n, co, cn in zip(offsets, sizes, c.offsets, c.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            t = self._load(c)
            src = tuple(slice(a - co, b - co) for a, b, co in zip(lo, hi, c.offsets))
            dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))
            out[dst].copy_(t[src])
        return out

    def _load(self, c: Chunk) -> torch.Tensor:
        with open(c.path, "rb") as f:
            f.seek(c.start)
            data = f.read(c.length)
        t = safe_pickle.load_torch_bytes(data)
        if type(t) is not torch.Tensor or t.dtype != self.dtype or tuple(t.shape) != c.sizes:
            raise CheckpointError(f"{self.where}: the chunk at {c.offsets} holds {type(t).__name__} "
                                  f"{getattr(t, 'dtype', '')} {tuple(getattr(t, 'shape', ()))}, expected "
                                  f"{self.dtype} {c.sizes}")
        return t


def read_index(folder: str) -> Tuple[Dict[str, StoredTensor], List[str]]:
    """(the tensors of a DCP folder by name, the names of entries that are not tensors)."""
    meta_path = regular_file(os.path.join(folder, ".metadata"), folder, folder, max_bytes=MAX_METADATA_BYTES)
    try:
        with open(meta_path, "rb") as f:
            meta = safe_pickle.load_dcp_metadata(f.read())
        return _index(folder, meta, meta_path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or crafted metadata file
        raise CheckpointError(f"{meta_path}: not a readable torch.distributed.checkpoint metadata file "
                              f"({type(e).__name__}: {str(e)[:300]})") from None


def _index(folder: str, meta, meta_path: str):
    field = safe_pickle.field
    entries, storage = field(meta, "state_dict_metadata"), field(meta, "storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{meta_path}: metadata without state_dict_metadata/storage_data")
    places: Dict[Tuple[str, tuple], tuple] = {}  # (fqn, chunk offsets) -> (file, byte offset, length)
    file_sizes: Dict[str, int] = {}
    for index, info in storage.items():
        fqn, offsets = field(index, "fqn", "MetadataIndex"), field(index, "offset", "MetadataIndex")
        where = f"{meta_path}: {safe_pickle.brief(fqn)}"
        if field(info, "transform_descriptors", "_StorageInfo"):
            raise CheckpointError(f"{where}: stored with transforms {safe_pickle.brief(field(info, 'transform_descriptors'))}, "
                                  "which this reader does not apply")
        path = inside(folder, field(info, "relative_path"), meta_path)
        start, length = ints((field(info, "offset"), field(info, "length")), "byte range", where)
        if path not in file_sizes:
            if not os.path.lexists(path):
                raise CheckpointError(f"{meta_path}: shard file {os.path.basename(path)} is missing")
            file_sizes[path] = os.path.getsize(regular_file(path, meta_path, folder))
        if start + length > file_sizes[path]:
            raise CheckpointError(f"{path}: too short for {safe_pickle.brief(fqn)} (bytes {start}..{start + length} of "
                                  f"{file_sizes[path]}): a truncated shard")
        key = (fqn, None if offsets is None else ints(offsets, "chunk offset", where))
        places[key] = (path, start, length)
    out: Dict[str, StoredTensor] = {}
    skipped = []
    for fqn, md in entries.items():
        where = f"{meta_path}: {safe_pickle.brief(fqn)}"
        if not isinstance(fqn, str):
            raise CheckpointError(f"{meta_path}: an entry name that is not a string: {safe_pickle.brief(fqn)}")
        if type(md) is safe_pickle.Record and md.kind == "BytesStorageMetadata":
            skipped.append(fqn)
            continue
        props = field(md, "properties", "TensorStorageMetadata")
        dtype = (field(props, "state", "TensorProperties") or (None,))[0] or field(props, "dtype")
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{where}: no tensor dtype in its metadata")
        size = ints(field(md, "size"), "size", where)
        layout = []
        for chunk in field(md, "chunks") or ():
            offs = ints(field(chunk, "offsets", "ChunkStorageMetadata"), "chunk offsets", where)
            sizes = ints(field(chunk, "sizes"), "chunk sizes", where)
            if len(offs) != len(size) or len(sizes) != len(size) or \
                    any(o + n > s for o, n, s in zip(offs, sizes, size)):
                raise CheckpointError(f"{where}: chunk at {offs} of size {sizes} lies outside {size}")
            if _volume(sizes):  # an empty chunk holds nothing
                layout.append((offs, sizes))
            if len(layout) > MAX_CHUNKS:
                raise CheckpointError(f"{where}: more than {MAX_CHUNKS} chunks")
        _check_tiling(size, layout, where)
        chunks = []
        for offs, sizes in layout:
            if (fqn, offs) not in places:
                raise CheckpointError(f"{where}: no stored data for the chunk at {offs}")
            chunks.append(Chunk(offs, sizes, *places[fqn, offs]))
            _check_chunk(chunks[-1], dtype, where)
        out[fqn] = StoredTensor(fqn, size, dtype, chunks, where)
    return out, skipped


def _check_chunk(c: Chunk, dtype: torch.dtype, where: str) -> None:
    """A chunk's bytes are one tensor saved by torch.save, of the chunk's dtype and size,
    before anything is read or copied: its zip structure and pickle are checked, not its data."""
    try:
        with open(c.path, "rb") as f:
            res = safe_pickle.check_torch_zip(safe_pickle.FileSlice(f, c.start, c.length),
                                              lambda name: name in safe_pickle.tensor_globals())
    except safe_pickle.UnsafeFileError as e:
        raise CheckpointError(f"{where}: the chunk at {c.offsets} is not a saved tensor ({e})") from None
    if len(res.tensors) != 1 or res.tensors[0].dtype != dtype or res.tensors[0].size != c.sizes:
        got = [(t.dtype, t.size) for t in res.tensors]
        raise CheckpointError(f"{where}: the chunk at {c.offsets} holds {safe_pickle.brief(got)}, expected one "
                              f"{dtype} tensor of size {c.sizes}")


def _volume(n) -> int:
    v = 1
    for i in n:
        v *= i
    return v


def _check_tiling(size, layout: List[Tuple[tuple, tuple]], where: str) -> None:
    """The chunks (offsets, sizes) cover the tensor exactly once (no gap left as uninitialised
    memory): their volumes add up to the tensor's and no two overlap. Chunks that are slabs
    along the first dimension (FSDP's sharding) are checked in one sort; others pairwise."""
    if sum(_volume(n) for _, n in layout) != _volume(size):
        raise CheckpointError(f"{where}: its chunks do not cover the tensor of shape {size}")
    if size and all(o[1:] == (0,) * (len(size) - 1) and n[1:] == tuple(size[1:]) for o, n in layout):
        spans = sorted((o[0], o[0] + n[0]) for o, n in layout)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise CheckpointError(f"{where}: chunks at row {start} overlap")
        return
    if len(layout) > 1024:
        raise CheckpointError(f"{where}: {len(layout)} chunks of a layout this reader does not check")
    for i, (oa, na) in enumerate(layout):
        for ob, nb in layout[i + 1:]:
            if all(x < y + m and y < x + n for x, n, y, m in zip(oa, na, ob, nb)):
                raise CheckpointError(f"{where}: chunks at {oa} and {ob} overlap")


# --- sharded training state: what each process holds ------------------------------------------

def local_region(t: torch.Tensor) -> Tuple[Tuple[int, ...], Tuple[int, ...], torch.Tensor]:
    """(global offsets, sizes, local tensor) of what this process holds of ``t``: its shard of
    a DTensor (FSDP2), or the whole of a plain tensor."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(offsets), tuple(shape), t.to_local()
    return (0,) * t.ndim, tuple(t.shape), t


def fill(folder: str, targets: Dict[str, torch.Tensor]) -> None:
    """Copy each stored tensor's region into this process's part of ``targets`` (name ->
    tensor or DTensor, the names as written by ``save``), reading only the chunks that
    overlap it. Every name, shape and dtype is checked before anything is copied."""
    stored, _ = read_index(folder)
    missing = sorted(set(targets) - set(stored))
    if missing:
        raise CheckpointError(f"{folder}: lacks {len(missing)} tensors this run needs, e.g. {missing[:5]}")
    for name, t in targets.items():
        if tuple(t.shape) != stored[name].size:
            raise CheckpointError(f"{folder}: {name} has shape {stored[name].size}, this run's is {tuple(t.shape)}")
    with torch.no_grad():
        for name, t in targets.items():
            offsets, sizes, local = local_region(t)
            if local.numel():
                local.copy_(stored[name].read(offsets, sizes).to(local.dtype))


def save(folder: str, tensors: Dict[str, torch.Tensor], runner_state: dict) -> None:
    """Write a sharded checkpoint from every process: ``tensors`` (name -> tensor or DTensor,
    each process its shards) with torch's DCP writer, ``runner_state`` (plain data, from
    rank 0) as ``runner_state.pth``; into ``folder + '.tmp'``, renamed to ``folder`` when all
    of it is written, so a folder under its final name is always complete."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = folder + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()
    dcp.save(tensors, checkpoint_id=tmp)  # returns on every rank once all shards and the metadata are written
    if rank == 0:
        torch.save(runner_state, os.path.join(tmp, RUNNER_STATE))
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    if dist.is_initialized():
        dist.barrier()


def is_dcp_folder(path) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata"))
