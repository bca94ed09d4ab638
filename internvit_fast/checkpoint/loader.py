"""Loading a checkpoint into a model: key layouts, shape surgery, checks, the copy.

Nothing is copied before every check has passed: keys (strict), shapes (after the
position table and patch kernel are resized, as upstream does at load), and that every
tensor is a plain, dense floating-point CPU tensor with data (not meta, sparse, quantized
or a tensor subclass). Tensors are then read, converted on the CPU and copied into the
model one at a time, so a checkpoint never sits in memory twice.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..posembed import resize_pos_table
from .base import CheckpointError, Entry, LazyTensor, materialize
from .files import read_state_dict
from .fp8 import expand_checkpoint

logger = logging.getLogger("internvit_fast")

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
FPN_PREFIXES = ("up1.", "up2.", "up3.", "up4.")  # the segmentation FPN: in no pretrained ViT file


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
    return {upstream_name(k): v for k, v in sd.items()}


def _under(sd: Dict[str, Entry], prefix: str) -> Dict[str, Entry]:
    return _internvl_to_upstream({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})


def upstream_name(key: str) -> str:
    for pattern, repl in _INTERNVL_KEYS:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def to_upstream_keys(sd: Dict[str, Entry], model_keys, own_shapes: Optional[Mapping] = None
                     ) -> Tuple[Dict[str, Entry], str]:
    """Map a checkpoint's keys onto the upstream backbone's; returns (state dict, prefix taken).

    The prefix is a structure of the file, not of a stray key: every prefix of one or two
    dotted parts is tried (and none), and the one under which the most keys match the
    model wins (ties: the shorter). Keys outside it are left out, with a log line. One pass
    over the keys counts the matches of every candidate (a file may have tens of thousands
    of distinct prefixes).
    """
    own = set(model_keys)
    matches: Dict[str, int] = {"": 0}
    for k in sd:
        parts = k.split(".")
        for i in range(min(len(parts) - 1, 2) + 1):
            prefix = ".".join(parts[:i]) + "." if i else ""
            hit = upstream_name(".".join(parts[i:])) in own
            matches[prefix] = matches.get(prefix, 0) + hit
    best = max(matches.values())
    prefix = min((p for p, n in matches.items() if n == best), key=lambda p: (len(p), p)) if best else ""
    out = _under(sd, prefix)
    if prefix:
        rest = [k for k in sd if not k.startswith(prefix)]
        logger.info("checkpoint: taking the %d keys under %r; leaving out %d others%s", len(out), prefix, len(rest),
                    f", e.g. {rest[:3]}" if rest else "")
    t = out.get("cls_token")
    want = own_shapes.get("cls_token") if own_shapes else None
    if t is not None and len(t.shape) == 1 and (want is None or t.shape[0] == want[-1]):
        out["cls_token"] = materialize(t).view(1, 1, -1)  # InternVL stores it flat (read once its size fits)
    return out, prefix


# --- shape surgery ------------------------------------------------------------------------

def resize_pos_embed(t: torch.Tensor, want: torch.Size) -> torch.Tensor:
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


_RESIZERS = {"pos_embed": resize_pos_embed, "patch_embed.proj.weight": _resize_patch_kernel}
# A table or kernel resized at load is read whole first: one far larger than the model's
# (a 1344px table into a 224px model is 36x) is a file's way to make a load allocate memory.
MAX_RESIZE_RATIO = 64


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


_COUNTS = (torch.int64, torch.int32)  # integer buffers: BatchNorm's num_batches_tracked (a Segmentor's heads)


def check_tensor(k: str, v: Entry, into: Optional[torch.dtype] = None) -> None:
    """Raise for anything the copy could not take: checked for every tensor before the first
    copy. ``into``: the model's dtype there; an integer tensor loads only into an integer one."""
    if isinstance(v, LazyTensor):
        dtype = v.dtype
    else:
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{k}: is a {type(v).__name__}, not a tensor")
        if type(v) not in (torch.Tensor, nn.Parameter):
            # A subclass brings its own code to every op on it; wrapper subclasses (DTensor,
            # nested tensors: torch allow-lists them once imported) have no storage to copy.
            raise CheckpointError(f"{k}: is a {type(v).__name__}, a tensor subclass; only plain tensors load")
        if v.is_meta:
            raise CheckpointError(f"{k}: is a meta tensor (it has no data)")
        if v.layout != torch.strided:
            raise CheckpointError(f"{k}: has layout {v.layout}; only dense tensors load")
        if v.is_quantized:
            raise CheckpointError(f"{k}: is quantized ({v.dtype}); only floating-point tensors load")
        if v.device.type != "cpu":
            raise CheckpointError(f"{k}: is on {v.device}, expected the CPU")
        dtype = v.dtype
    if dtype == torch.float8_e4m3fn:
        if into != torch.float8_e4m3fn:
            raise CheckpointError(f"{k}: is an FP8 (e4m3) tensor; e4m3 loads only into the blocks' linear weights "
                                  "(attn.qkv, attn.proj, mlp.fc1, mlp.fc2) of a model built with precision='fp8'")
        return
    if dtype not in _FLOATS and not (dtype in _COUNTS and into in _COUNTS):
        raise CheckpointError(f"{k}: has dtype {dtype}; only floating-point tensors load"
                              + (" (and integer counters into integer buffers)" if dtype in _COUNTS else ""))


def adapt_state_dict(sd: Dict[str, Entry], model: nn.Module) -> Dict[str, Entry]:
    """Check every tensor, resize what upstream resizes at load time (position table, patch
    kernel) and check the shapes of the rest."""
    own = model.state_dict(keep_vars=True)
    out = {}
    for k, v in sd.items():
        if k not in own:
            out[k] = v
            continue
        check_tensor(k, v, own[k].dtype)
        if v.shape != own[k].shape:
            resize = _RESIZERS.get(k[len("backbone."):] if k.startswith("backbone.") else k)  # a Segmentor's
            if resize is None:
                raise CheckpointError(f"{k}: checkpoint shape {tuple(v.shape)} does not match the model's "
                                      f"{tuple(own[k].shape)}")
            if _numel(v.shape) > MAX_RESIZE_RATIO * _numel(own[k].shape):
                raise CheckpointError(f"{k}: checkpoint shape {tuple(v.shape)} is more than {MAX_RESIZE_RATIO}x the "
                                      f"model's {tuple(own[k].shape)}; not resized")
            logger.info("checkpoint: resizing %s from %s to %s", k, tuple(v.shape), tuple(own[k].shape))
            v = resize(materialize(v), own[k].shape)
        out[k] = v
    return out


# --- loading --------------------------------------------------------------------------------

def _some(keys: List[str], most: int = 6) -> str:
    """A key list for a message: whole when short, else its first few and the count (a
    message of thousands of keys would hide the other list)."""
    return str(keys) if len(keys) <= most else f"{str(keys[:most])[:-1]}, ... ({len(keys)} in all)]"


def load_checkpoint(model: nn.Module, path, strict: bool = True, may_miss: Sequence[str] = (),
                    renames: Optional[Mapping[str, str]] = None, device=None) -> Tuple[List[str], List[str]]:
    """Load a checkpoint file (any accepted format) into an InternViT6B, in place; or into a
    ``Segmentor`` (segmentor.py), whose keys are mmseg's: backbone.*, decode_head.*, auxiliary_head.*.

    Returns (missing, unexpected) keys. With strict=True either list non-empty raises
    before any parameter is touched; with strict=False they are logged. Keys of blocks
    the model does not have (a deeper checkpoint) count as unexpected. A checkpoint with
    no FPN keys at all (a pretrained ViT) may leave the FPN out even when strict: it keeps
    its initialisation (logged; its keys are in the returned ``missing``). So may any
    ``may_miss`` prefix of the model whose keys the file has none of (a Segmentor's
    auxiliary head, which inference never runs). ``renames``: key prefixes of the file to
    read under another prefix, each applied only when the model has no key under the old
    one and some under the new (another codebase's name for the same module).

    A model built under ``torch.device("meta")`` (no memory, no initialisation: the 6B model
    in a second) gets each tensor created on ``device`` (default: the CPU) as it is read, one
    at a time; a pretrained ViT file's missing FPN is initialised there as upstream does. Every
    other key the file lacks is refused first (it would stay without data).
    """
    where = os.fspath(path)
    own = model.state_dict(keep_vars=True)
    try:
        sd, _ = to_upstream_keys(read_state_dict(where), own, {k: v.shape for k, v in own.items()})
        for old, new in (renames or {}).items():
            if not any(k.startswith(old) for k in own) and any(k.startswith(new) for k in own):
                sd = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
        sd = adapt_state_dict(sd, model)
        if any(t.dtype == torch.float8_e4m3fn for t in own.values()):  # precision="fp8": quantized as copied
            try:
                sd = expand_checkpoint(sd, own, lambda shape, dtype, read: LazyTensor(shape, dtype, read, where))
            except ValueError as e:
                raise CheckpointError(str(e)) from None
    except CheckpointError as e:
        if str(e).startswith(where):
            raise
        raise CheckpointError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - e.g. a folder that cannot be listed
        raise CheckpointError(f"{where}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    refused = missing
    if any(k.startswith(FPN_PREFIXES) for k in own) and not any(k.startswith(FPN_PREFIXES) for k in sd):
        # A pretrained ViT checkpoint: no pretrained file has the FPN (upstream builds it after
        # loading and loads with strict=False). It keeps its initialisation; the rest stays strict.
        logger.info("%s: a ViT checkpoint without the FPN: up1..up4 keep their initialisation", where)
        refused = [k for k in missing if not k.startswith(FPN_PREFIXES)]
    for prefix in may_miss:
        if not any(k.startswith(prefix) for k in sd):
            refused = [k for k in refused if not k.startswith(prefix)]
    if strict and (refused or unexpected):
        raise CheckpointError(f"{where}: does not match the model (nothing was loaded): "
                              f"missing keys {_some(refused)}, unexpected keys {_some(unexpected)}")
    empty = [k for k in missing if own[k].is_meta]
    fpn_owner = _fpn_owner(model, [k for k in empty if k not in refused]) if empty else None
    left = [k for k in empty if k in refused or fpn_owner is None]
    if left:
        raise CheckpointError(f"{where}: the model is on the meta device and the file lacks {_some(left)}: they "
                              "would stay without data (nothing was loaded)")
    if refused:
        logger.warning("%s: missing keys (left as initialised): %s", where, refused)
    if unexpected:
        logger.warning("%s: unexpected keys (ignored): %s", where, unexpected)
    names = [k for k in sd if k in own]
    done = 0
    try:
        with torch.no_grad():
            for k in names:
                # Converted on the CPU first: a dtype change inside copy_ would stage the
                # source on the GPU at its own width.
                t = materialize(sd[k]).to(own[k].dtype)
                if own[k].is_meta:
                    _assign(model, k, own[k], t.to(device if device is not None else "cpu"))
                else:
                    own[k].copy_(t)
                done += 1
            if fpn_owner is not None:  # a meta model's FPN, which the ViT file does not hold
                for up in (fpn_owner.up1, fpn_owner.up2, fpn_owner.up3, fpn_owner.up4):
                    up.to_empty(device=device if device is not None else "cpu")
                fpn_owner.init_fpn()
    except Exception as e:  # noqa: BLE001 - past every check: an I/O or device error
        raise CheckpointError(
            f"{where}: copying {names[done]} failed ({type(e).__name__}: {e}) after {done} of {len(names)} "
            f"tensors were copied: the model holds a mix of old and new weights; reload it") from None
    logger.info("%s: loaded %d tensors", where, len(names))
    return missing, unexpected


def _fpn_owner(model: nn.Module, keys: List[str]) -> Optional[nn.Module]:
    """The backbone whose FPN ``keys`` are (the model, or a Segmentor's ``backbone``), when
    every one of them is an FPN key and it can initialise its FPN; else None."""
    for prefix, owner in (("", model), ("backbone.", getattr(model, "backbone", None))):
        if owner is not None and hasattr(owner, "init_fpn") and keys and all(
                k.startswith(prefix) and k[len(prefix):].startswith(FPN_PREFIXES) for k in keys):
            return owner
    return None


def _assign(model: nn.Module, key: str, old: torch.Tensor, value: torch.Tensor) -> None:
    """Put ``value`` in place of a meta tensor (a parameter keeps its requires_grad)."""
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(name, value)
