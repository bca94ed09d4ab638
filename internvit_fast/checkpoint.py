"""Checkpoint loading: file formats, key layouts and shape surgery, kept out of forward.

Accepted files:
- torch files (.pth/.pt/.bin): a bare state dict, or one wrapped under 'module', 'model'
  or 'state_dict' (mmengine/MMSegmentation checkpoints with their 'meta', 'message_hub'
  and optimizer state too). Read with ``weights_only=True``; a file that also pickles
  other objects (mmengine's HistoryBuffer, numpy scalars) is read again by an unpickler
  that builds only torch's allow-listed types (tensors, containers, dtypes) and stands an
  inert placeholder in for anything else, so no code from the file runs. Those objects
  are skipped with a log line. Unrestricted unpickling is never used;
- .safetensors files (read with the ``safetensors`` package, tensor by tensor);
- sharded sets as transformers writes them: ``*.safetensors.index.json`` or
  ``pytorch_model.bin.index.json`` with their shards, or the folder holding one of these
  (or a single .safetensors / .bin file);
- a folder written by torch.distributed.checkpoint (FSDP training's sharded checkpoints,
  ``.metadata`` plus one file per process), read whole in one process.

Key layouts: upstream's segmentation backbone keys, the InternViT layout published with
InternVL (``embeddings.*``, ``encoder.layers.N.*``), each under any prefix that is the
structure of the file: ``module.`` (DDP), ``backbone.`` (an mmseg segmentor: only its
backbone is taken), ``vision_model.`` (an InternVL chat model), or nested ones. The
prefix is the one under which the most keys match the model, and the choice is logged.

Nothing is copied before every check has passed: keys (strict), shapes (after the
position table and patch kernel are resized, as upstream does at load), and that every
tensor is a dense floating-point CPU tensor with data (not meta, sparse or quantized).
Tensors are then read, converted on the CPU and copied into the model one at a time, so
a checkpoint never sits in memory twice.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import types
from typing import Dict, List, Mapping, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .posembed import resize_pos_table

logger = logging.getLogger("internvit_fast")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file or key."""


class LazyTensor:
    """A tensor in a checkpoint file whose shape and dtype are known before it is read."""

    def __init__(self, shape, dtype: torch.dtype, read, where: str):
        self.shape, self.dtype, self._read, self.where = torch.Size(shape), dtype, read, where

    def load(self) -> torch.Tensor:
        try:
            return self._read()
        except Exception as e:  # noqa: BLE001 - an I/O or format error while reading
            raise CheckpointError(f"{self.where}: cannot read tensor ({type(e).__name__}: {e})") from None


Entry = Union[torch.Tensor, LazyTensor]


def materialize(v: Entry) -> torch.Tensor:
    return v.load() if isinstance(v, LazyTensor) else v


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


class _Skipped:
    """Stands in for an object a checkpoint pickles that is not a tensor or a container:
    built without running any of the file's code, holding nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


def _skipping_pickle_module(skipped: set):
    allowed = _allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            obj = allowed.get(f"{module}.{name}")
            if obj is not None:
                return obj
            skipped.add(f"{module}.{name}")
            return _Skipped

    mod = types.ModuleType("internvit_fast_skipping_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    mod.__name__ = "pickle"  # torch.load reads it for its own messages only
    return mod


def _allowed_globals() -> dict:
    """What torch's weights-only unpickler builds (tensors, storages, dtypes, containers),
    plus anything the user allow-listed with torch.serialization.add_safe_globals."""
    from torch import _weights_only_unpickler as w
    allowed = dict(w._get_allowed_globals())
    for g in torch.serialization.get_safe_globals():
        obj = g[0] if isinstance(g, tuple) else g
        allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return allowed


def _torch_load(path: str, **kw):
    try:
        return torch.load(path, map_location="cpu", mmap=True, **kw)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
    # Old (non-zip) serialisation cannot be memory-mapped: read it whole.
    logger.info("%s: legacy torch format, loading without mmap", path)
    return torch.load(path, map_location="cpu", **kw)


def _read_torch(path: str) -> Mapping:
    try:
        try:
            return _torch_load(path, weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise
        skipped: set = set()
        obj = _torch_load(path, weights_only=False, pickle_module=_skipping_pickle_module(skipped))
        logger.info("%s: skipped pickled objects that are not tensors or containers: %s", path, sorted(skipped))
        return obj
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:300]})") from None


def _unwrap(sd, path: str) -> Dict[str, torch.Tensor]:
    for key in ("module", "model", "state_dict"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    return dict(sd)


def _read_file(path: str) -> Dict[str, Entry]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return _unwrap(_read_torch(path), path)


def _read_index(index_path: str) -> Dict[str, Entry]:
    """A sharded set: the index json's weight_map names each tensor's shard file."""
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
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        tensors = _read_file(shard_path)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = sorted(expected - set(tensors))
        if missing:
            raise CheckpointError(f"{shard_path}: lacks tensors its index lists: {missing[:10]}")
        out.update({k: tensors[k] for k in expected})
    return out


def _read_distributed(folder: str) -> Dict[str, Entry]:
    """A sharded checkpoint written by torch.distributed.checkpoint (one file per process),
    e.g. by ``internvit_fast.mmseg.ShardedCheckpointHook``: read whole, in one process."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        whole = os.path.join(tmp, "whole.pt")
        try:
            dcp_to_torch_save(folder, whole)
        except Exception as e:  # noqa: BLE001 - a corrupt or partial set of shards
            raise CheckpointError(f"{folder}: cannot read the sharded checkpoint ({type(e).__name__}: {e})") from None
        sd = _unwrap(_read_torch(whole), folder)
        return {k: v.clone() for k, v in sd.items()}  # own memory: the file goes with the folder


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
            return _read_index(os.path.join(path, index[0]))
        if not index and len(single) == 1:
            return _read_file(os.path.join(path, single[0]))
        raise CheckpointError(f"{path}: expected one *.index.json or one weights file ({', '.join(_WEIGHTS)}) "
                              f"in the folder, found {index + single}")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.endswith(".json"):
        return _read_index(path)
    return _read_file(path)


# --- key layouts --------------------------------------------------------------------------

_INTERNVL_KEYS = [
    (re.compile(r"^embeddings\.class_embedding$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embedding$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embedding\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^encoder\.layers\.(\d+)\.(ls[12])$"), r"blocks.\1.\2.gamma"),
    (re.compile(r"^encoder\.layers\.(\d+)\.(.+)$"), r"blocks.\1.\2"),
]


def _internvl_to_upstream(sd: Dict[str, Entry]) -> Dict[str, Entry]:
    if not any(k.startswith(("embeddings.", "encoder.layers.")) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        for pattern, repl in _INTERNVL_KEYS:
            if pattern.match(k):
                k = pattern.sub(repl, k)
                break
        out[k] = v
    return out


def _under(sd: Dict[str, Entry], prefix: str) -> Dict[str, Entry]:
    return _internvl_to_upstream({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})


def to_upstream_keys(sd: Dict[str, Entry], model_keys) -> Tuple[Dict[str, Entry], str]:
    """Map a checkpoint's keys onto the upstream backbone's; returns (state dict, prefix taken).

    The prefix is a structure of the file, not of a stray key: every prefix of one or two
    dotted parts is tried (and none), and the one under which the most keys match the
    model wins (ties: the shorter). Keys outside it are left out, with a log line.
    """
    own = set(model_keys)
    candidates = {""}
    for k in sd:
        parts = k.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in (1, 2) if len(parts) > i)

    def score(prefix):
        return len(own & set(_under(sd, prefix))), -len(prefix)

    prefix = max(sorted(candidates), key=score)
    if score(prefix)[0] == 0:
        prefix = ""
    out = _under(sd, prefix)
    if prefix:
        rest = [k for k in sd if not k.startswith(prefix)]
        logger.info("checkpoint: taking the %d keys under %r; leaving out %d others%s", len(out), prefix, len(rest),
                    f", e.g. {rest[:3]}" if rest else "")
    if "cls_token" in out and len(out["cls_token"].shape) == 1:  # InternVL stores it flat
        t = out["cls_token"]
        out["cls_token"] = materialize(t).view(1, 1, -1)
    return out, prefix


# --- shape surgery ------------------------------------------------------------------------

def _resize_pos_embed(t: torch.Tensor, want: torch.Size) -> torch.Tensor:
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[0] != 1 or t.shape[2] != want[2]:
        raise CheckpointError(f"pos_embed: checkpoint shape {tuple(t.shape)} cannot become {tuple(want)}")
    g = int(round((want[1] - 1) ** 0.5))
    try:
        return resize_pos_table(t, (g, g))
    except ValueError as e:
        raise CheckpointError(f"pos_embed: {e}") from None


def _resize_patch_kernel(t: torch.Tensor, want: torch.Size) -> torch.Tensor:
    if t.ndim != 4 or t.shape[:2] != want[:2]:
        raise CheckpointError(f"patch_embed.proj.weight: checkpoint shape {tuple(t.shape)} cannot become "
                              f"{tuple(want)}")
    return F.interpolate(t.float(), size=tuple(want[2:]), mode="bicubic", align_corners=False).to(t.dtype)


_RESIZERS = {"pos_embed": _resize_pos_embed, "patch_embed.proj.weight": _resize_patch_kernel}


def _check_tensor(k: str, v: Entry) -> None:
    """Raise for anything the copy could not take: checked for every tensor before the first copy."""
    if isinstance(v, LazyTensor):
        dtype = v.dtype
    else:
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{k}: is a {type(v).__name__}, not a tensor")
        if v.is_meta:
            raise CheckpointError(f"{k}: is a meta tensor (it has no data)")
        if v.layout != torch.strided:
            raise CheckpointError(f"{k}: has layout {v.layout}; only dense tensors load")
        if v.is_quantized:
            raise CheckpointError(f"{k}: is quantized ({v.dtype}); only floating-point tensors load")
        if v.device.type != "cpu":
            raise CheckpointError(f"{k}: is on {v.device}, expected the CPU")
        dtype = v.dtype
    if dtype not in _FLOATS:
        raise CheckpointError(f"{k}: has dtype {dtype}; only floating-point tensors load")


def adapt_state_dict(sd: Dict[str, Entry], model: nn.Module) -> Dict[str, Entry]:
    """Check every tensor, resize what upstream resizes at load time (position table, patch
    kernel) and check the shapes of the rest."""
    own = model.state_dict(keep_vars=True)
    out = {}
    for k, v in sd.items():
        if k not in own:
            out[k] = v
            continue
        _check_tensor(k, v)
        if v.shape != own[k].shape:
            if k not in _RESIZERS:
                raise CheckpointError(f"{k}: checkpoint shape {tuple(v.shape)} does not match the model's "
                                      f"{tuple(own[k].shape)}")
            logger.info("checkpoint: resizing %s from %s to %s", k, tuple(v.shape), tuple(own[k].shape))
            v = _RESIZERS[k](materialize(v), own[k].shape)
        out[k] = v
    return out


# --- loading --------------------------------------------------------------------------------

def load_checkpoint(model: nn.Module, path, strict: bool = True) -> Tuple[List[str], List[str]]:
    """Load a checkpoint file (any accepted format) into an InternViT6B, in place.

    Returns (missing, unexpected) keys. With strict=True either list non-empty raises
    before any parameter is touched; with strict=False they are logged. Keys of blocks
    the model does not have (a deeper checkpoint) count as unexpected.
    """
    where = os.fspath(path)
    own = model.state_dict(keep_vars=True)
    try:
        sd, _ = to_upstream_keys(read_state_dict(where), own)
        sd = adapt_state_dict(sd, model)
    except CheckpointError as e:
        if str(e).startswith(where):
            raise
        raise CheckpointError(f"{where}: {e}") from None
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{where}: does not match the model (nothing was loaded): "
                              f"missing keys {missing}, unexpected keys {unexpected}")
    if missing:
        logger.warning("%s: missing keys (left as initialised): %s", where, missing)
    if unexpected:
        logger.warning("%s: unexpected keys (ignored): %s", where, unexpected)
    names = [k for k in sd if k in own]
    done = 0
    try:
        with torch.no_grad():
            for k in names:
                # Converted on the CPU first: a dtype change inside copy_ would stage the
                # source on the GPU at its own width.
                own[k].copy_(materialize(sd[k]).to(own[k].dtype))
                done += 1
    except Exception as e:  # noqa: BLE001 - past every check: an I/O or device error
        raise CheckpointError(
            f"{where}: copying {names[done]} failed ({type(e).__name__}: {e}) after {done} of {len(names)} "
            f"tensors were copied: the model holds a mix of old and new weights; reload it") from None
    logger.info("%s: loaded %d tensors", where, len(names))
    return missing, unexpected
