"""Reading checkpoint files: one file, a sharded set, a folder; each tensor lazily where the
format allows. Every path a file names is checked to stay inside its folder; every file
opened is a regular one (a FIFO or device could block). See the package docstring for the
accepted formats."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Mapping

import torch

from . import dcp, safe_pickle
from .base import CheckpointError, Entry, LazyTensor, inside, regular_file

logger = logging.getLogger("internvit_fast")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}


# --- reading files ----------------------------------------------------------------------

def read_safetensors(path: str) -> Dict[str, LazyTensor]:
    """The tensors of one .safetensors file, each read on demand (safetensors memory-maps)."""
    from safetensors import safe_open
    try:
        handle = safe_open(path, framework="pt", device="cpu")
        out = {}
        for name in handle.keys():
            sl = handle.get_slice(name)
            dtype = _ST_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {sl.get_dtype()}, which is not supported")
            out[name] = LazyTensor(sl.get_shape(), dtype, lambda n=name: handle.get_tensor(n), f"{path}: {name}")
        return out
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a corrupt or truncated file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_torch(path: str, trusted=None) -> Mapping:
    """A torch.save file, read by torch's weights-only unpickler; objects that are not tensor
    data (mmengine's, numpy's) become inert placeholders, logged (safe_pickle)."""
    try:
        try:
            obj, skipped = safe_pickle.load_torch_file(path, trusted)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj, skipped = safe_pickle.load_torch_file(path, trusted, mmap=False)  # an old zip layout
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise _unreadable(path, e) from None
    if skipped:
        logger.info("%s: skipped pickled objects that are not tensors or containers: %s", path, skipped)
    return obj


def _unreadable(path: str, e: BaseException) -> "CheckpointError":
    return CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]})")


def _unwrap(sd, path: str) -> Dict[str, torch.Tensor]:
    for key in ("module", "model", "state_dict"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {safe_pickle.brief(bad[:10])}")
    return dict(sd)


def _read_file(path: str) -> Dict[str, Entry]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return _unwrap(read_torch(path), path)


def _read_index(index_path: str) -> Dict[str, Entry]:
    """A sharded set: the index json's weight_map names each tensor's shard file."""
    regular_file(index_path, index_path, max_bytes=64 << 20)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a sharded checkpoint index ({e})") from None
    folder = os.path.dirname(index_path)
    out = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = inside(folder, shard, index_path)
        if not os.path.exists(shard_path):
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        regular_file(shard_path, index_path, folder)
        tensors = _read_file(shard_path)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = sorted(expected - set(tensors))
        if missing:
            raise CheckpointError(f"{shard_path}: lacks tensors its index lists: {missing[:10]}")
        out.update({k: tensors[k] for k in expected})
    return out


def _read_distributed(folder: str) -> Dict[str, Entry]:
    """A sharded checkpoint written by torch.distributed.checkpoint (one file per process),
    e.g. by ``internvit_fast.mmseg.ShardedCheckpointHook``, read whole in one process by
    this package's own reader (``dcp.py``: restricted metadata unpickling, chunks read
    weights-only, every chunk checked before anything is read); entries that are not
    tensors are left out with a log line."""
    stored, skipped = dcp.read_index(folder)
    if skipped:
        logger.info("%s: skipped %d entries that are not tensors: %s", folder, len(skipped), skipped[:10])
    return {k: LazyTensor(t.size, t.dtype, t.read, f"{folder}: {k}") for k, t in stored.items()}


_WEIGHTS = (".safetensors", ".bin", ".pth", ".pt")


def read_state_dict(path) -> Dict[str, Entry]:
    """Read any supported file, sharded set or folder into a flat name -> tensor dict."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata")):
        return _read_distributed(path)
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        index = [f for f in names if f.endswith((".safetensors.index.json", ".bin.index.json"))]
        single = [f for f in names if f.endswith(_WEIGHTS)]
        if len(index) == 1:
            return _read_index(regular_file(os.path.join(path, index[0]), path, path))
        if not index and len(single) == 1:
            return _read_file(regular_file(os.path.join(path, single[0]), path, path))
        raise CheckpointError(f"{path}: expected one *.index.json or one weights file ({', '.join(_WEIGHTS)}) "
                              f"in the folder, found {index + single}")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    regular_file(path, path)
    if path.endswith(".json"):
        return _read_index(path)
    return _read_file(path)


