"""FP8 weights in checkpoint files: what a stored e4m3 weight and its scales must be, and
the expansion that quantizes a full-precision file's weights as they load into a model
built with precision="fp8" (the model side is internvit_fast/fp8.py)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..kernels.common import FP8
from ..kernels.fp8 import groups, quantize_weight
from .base import materialize

SCALE = "weight_scale"
MAX_SCALE_EXP = 120  # the largest scale exponent the quantizer writes (fp32's largest value / 448)


def scale_problem(scale, weight_shape) -> Optional[str]:
    """What is wrong with a weight's stored scales, or None. The format's scales are powers of
    two 2^e, -126 <= e <= 120, one per 128 x 128 block in fp32, as the quantizer writes them
    (no fp32 magnitude needs e > 120: 448 * 2^120 already exceeds fp32's largest value):
    with any other value the two paths no longer compute the same thing (the reference
    dequantizes q * s, the kernels scale the product; both exact only for powers of two), and
    a zero, negative or NaN scale is a broken layer that would load without a word."""
    want = (groups(weight_shape[0]), groups(weight_shape[1]))
    if scale.dtype != torch.float32:
        return f"{SCALE} has dtype {scale.dtype}, expected torch.float32"
    if tuple(scale.shape) != want:
        return f"{SCALE} has shape {tuple(scale.shape)}, expected {want} for a {tuple(weight_shape)} weight"
    bits = scale.view(torch.int32)
    exponent = bits >> 23  # the sign bit makes it negative
    bad = ((bits & 0x7FFFFF) != 0) | (exponent < 1) | (exponent > 127 + MAX_SCALE_EXP)
    if bool(bad.any()):
        first = scale.flatten()[bad.flatten()][0].item()
        return (f"{SCALE} holds {int(bad.sum())} value(s) that are not a power of two in [2^-126, 2^{MAX_SCALE_EXP}] "
                f"(the first: {first!r}); this file was not written by this quantizer or is damaged")
    return None


def weight_problem(w: torch.Tensor) -> Optional[str]:
    """What is wrong with a stored e4m3 weight, or None: e4m3 has no infinities, and its NaN
    (bytes 0x7F, 0xFF) is never written by the quantizer; a NaN weight makes every feature NaN."""
    nan = (w.view(torch.uint8) & 0x7F) == 0x7F
    if bool(nan.any()):
        return f"holds {int(nan.sum())} NaN value(s) (e4m3 bytes 0x7F/0xFF), which no quantizer writes"
    return None


def expand_checkpoint(sd: Dict[str, object], own: Dict[str, torch.Tensor], lazy) -> Dict[str, object]:
    """Checkpoint entries for a model with Fp8Linear layers: each full-precision weight that
    lands on an e4m3 one is quantized when it is copied (``lazy(shape, dtype, read)`` makes the
    deferred entry), its scales right after it from the same quantization; an e4m3 weight must
    come with its scales; both are read and checked here, before anything is copied (the
    scales a few KB, the weight a byte a value, read again when copied). Dtypes are the
    callers' check (loader.check_tensor: no integers into a weight). Raises ValueError
    naming the key."""
    for k in sd:
        if k.endswith("." + SCALE) and k in own and k[: -len(SCALE)] + "weight" not in sd:
            raise ValueError(f"{k}: a {SCALE} without its weight (it would pair with the model's old weight)")
    out = {}  # in the file's order, each new scale right after its weight: see part()
    for k, v in sd.items():
        out.setdefault(k, v)  # (an e4m3 weight's scales may have been read already)
        if not k.endswith(".weight") or k not in own or own[k].dtype != FP8:
            continue
        scale_key = k[: -len("weight")] + SCALE
        if v.dtype == FP8:
            if scale_key not in sd:
                raise ValueError(f"{k}: an e4m3 weight without its {SCALE}")
            out[scale_key] = materialize(sd[scale_key])
            # the weight is read here once more to be checked (1 byte a weight), then again when copied
            problem = scale_problem(out[scale_key], own[k].shape) or weight_problem(materialize(v))
            if problem:
                raise ValueError(f"{k}: {problem}")
            continue
        if scale_key in sd:
            raise ValueError(f"{k}: a {v.dtype} weight with a {SCALE} (only e4m3 weights carry scales)")
        memo = {}

        def part(i, v=v, memo=memo):
            if "qs" not in memo:
                memo["qs"] = quantize_weight(materialize(v))
            return memo["qs"][i] if i == 0 else memo.pop("qs")[i]  # the scales come second: done

        out[k] = lazy(own[k].shape, FP8, lambda part=part: part(0))
        out[scale_key] = lazy(own[scale_key].shape, torch.float32, lambda part=part: part(1))
    return out
