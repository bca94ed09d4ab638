"""Checkpoint loading: file formats, key layouts and shape surgery, kept out of forward.

Accepted:
- upstream segmentation checkpoints (.pth): the bare state dict or one wrapped
  under 'module', 'model' or 'state_dict', with or without mmseg's 'backbone.'
  prefix (a whole segmentor: only the backbone's keys are taken);
- InternViT checkpoints published with InternVL (optional 'vision_model.'
  prefix, 'embeddings.*' / 'encoder.layers.N.*'), as .pth/.bin, .safetensors or
  a sharded safetensors set (its index json, or the folder holding it).

Tensors are memory-mapped and copied into the model one at a time, so a 6B
checkpoint never sits in memory twice.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("internvit_fast")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file or key."""


# --- reading files ----------------------------------------------------------------------

def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Memory-map one .safetensors file; every tensor is a view of the mapping."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        data_len = size - 8 - n
        # A private copy-on-write mapping: pages load on demand and the tensors are
        # writable views, so torch never warns about read-only buffers.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors entry for {name!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= start <= end <= data_len or end - start != numel * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong "
                                  f"size (truncated or corrupt file)")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + start).view(shape)
    return out


def _read_safetensors_index(index_path: str) -> Dict[str, torch.Tensor]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
    folder = os.path.dirname(index_path)
    out = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        tensors = read_safetensors(shard_path)
        expected = {k for k, v in weight_map.items() if v == shard}
        missing = sorted(expected - set(tensors))
        if missing:
            raise CheckpointError(f"{shard_path}: lacks tensors its index lists: {missing[:10]}")
        out.update({k: tensors[k] for k in expected})
    return out


def _read_torch(path: str) -> Mapping:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    # Old (non-zip) serialisation cannot be memory-mapped: read it whole.
    try:
        logger.info("%s: legacy torch format, loading without mmap", path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read any supported file (or sharded set) into a flat name -> tensor dict."""
    path = os.fspath(path)
    if os.path.isdir(path):
        index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
        single = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        if len(index) == 1:
            return _read_safetensors_index(os.path.join(path, index[0]))
        if not index and len(single) == 1:
            return read_safetensors(os.path.join(path, single[0]))
        raise CheckpointError(f"{path}: expected one *.safetensors.index.json or one *.safetensors "
                              f"file in the folder, found {sorted(index + single)}")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.endswith(".index.json"):
        return _read_safetensors_index(path)
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    sd = _read_torch(path)
    return _unwrap(sd, path)


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


# --- key layouts --------------------------------------------------------------------------

_INTERNVL_KEYS = [
    (re.compile(r"^embeddings\.class_embedding$"), "cls_token"),
    (re.compile(r"^embeddings\.position_embedding$"), "pos_embed"),
    (re.compile(r"^embeddings\.patch_embedding\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^encoder\.layers\.(\d+)\.(ls[12])$"), r"blocks.\1.\2.gamma"),
    (re.compile(r"^encoder\.layers\.(\d+)\.(.+)$"), r"blocks.\1.\2"),
]


def _take_prefix(sd: Dict[str, torch.Tensor], prefix: str, what: str) -> Dict[str, torch.Tensor]:
    if not any(k.startswith(prefix) for k in sd):
        return sd
    rest = [k for k in sd if not k.startswith(prefix)]
    if rest:
        logger.info("checkpoint: ignoring %d keys outside %r (%s), e.g. %s", len(rest), prefix, what, rest[:3])
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def to_upstream_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map any accepted key layout onto the upstream backbone's keys."""
    sd = _take_prefix(sd, "backbone.", "the rest of an mmseg segmentor")
    sd = _take_prefix(sd, "vision_model.", "the rest of an InternVL model")
    if not any(k.startswith(("embeddings.", "encoder.layers.")) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        for pattern, repl in _INTERNVL_KEYS:
            if pattern.match(k):
                k = pattern.sub(repl, k)
                break
        out[k] = v
    if "cls_token" in out and out["cls_token"].ndim == 1:
        out["cls_token"] = out["cls_token"].view(1, 1, -1)
    return out


# --- shape surgery ------------------------------------------------------------------------

def _resize_pos_embed(t: torch.Tensor, want: torch.Size) -> torch.Tensor:
    from .model import resize_pos_table
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


def adapt_state_dict(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Resize what upstream resizes at load time (position table, patch kernel); check the rest."""
    own = model.state_dict(keep_vars=True)
    out = {}
    for k, v in sd.items():
        if k in own and v.shape != own[k].shape:
            if k not in _RESIZERS:
                raise CheckpointError(f"{k}: checkpoint shape {tuple(v.shape)} does not match the model's "
                                      f"{tuple(own[k].shape)}")
            logger.info("checkpoint: resizing %s from %s to %s", k, tuple(v.shape), tuple(own[k].shape))
            v = _RESIZERS[k](v, own[k].shape)
        out[k] = v
    return out


# --- loading --------------------------------------------------------------------------------

def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> Tuple[List[str], List[str]]:
    """Load a checkpoint file (any accepted format) into an InternViT6B, in place.

    Returns (missing, unexpected) keys. With strict=True either list non-empty
    raises before any parameter is touched; with strict=False they are logged.
    Keys of blocks the model does not have (a deeper checkpoint) count as unexpected.
    """
    try:
        sd = to_upstream_keys(read_state_dict(path))
        sd = adapt_state_dict(sd, model)
    except CheckpointError as e:
        if str(e).startswith(os.fspath(path)):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path}: does not match the model (nothing was loaded): "
                              f"missing keys {missing}, unexpected keys {unexpected}")
    if missing:
        logger.warning("%s: missing keys (left as initialised): %s", path, missing)
    if unexpected:
        logger.warning("%s: unexpected keys (ignored): %s", path, unexpected)
    bad = [k for k, v in sd.items() if k in own and not torch.is_floating_point(v)]
    if bad:
        raise CheckpointError(f"{path}: {bad} are not float tensors (nothing was loaded)")
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v)  # converts dtype; one tensor at a time, from the mapping
    logger.info("%s: loaded %d tensors", path, len(sd) - len(unexpected))
    return missing, unexpected
