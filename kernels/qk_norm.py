"""Fused QK-norm: split the qkv projection, RMS-normalise q and k, lay out for attention.

For each token row r of ``qkv = [q | k | v]`` (each C wide, head-major):

    out[0, r] = round(q / sqrt(mean(q^2) + eps)) * w_q     (over all C columns: upstream
    out[1, r] = round(k / sqrt(mean(k^2) + eps)) * w_k      normalises all heads together)
    out[2, r] = v

``out`` is (3, B, N, C) contiguous, so ``out[i].view(B, N, H, D).transpose(1, 2)``
is the (B, H, N, D) tensor that scaled_dot_product_attention and flash-attn take
without any further copy. The qkv row is read once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import as_rows, cast, check_row_width, check_tensors, on_device, rms_scale_row
from .tuning import row_config

OP = "qk_norm"


def qk_norm_ref(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                eps: float = 1e-6) -> torch.Tensor:
    """Plain-torch statement: (B, N, 3C) -> (3, B, N, C) with q and k RMS-normalised."""
    q, k, v = qkv.chunk(3, dim=-1)

    def norm(t, w):
        if w is None:
            return t
        h = t.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)

    return torch.stack([norm(q, q_weight), norm(k, k_weight), v])


@triton.jit
def _qk_norm_kernel(
    QKV,  # (rows, 3C) qkv projection output, row stride stride_qkv
    WQ, WK,  # (C,) q_norm and k_norm weights (unused when not NORMALIZE)
    OUT,  # (3, rows, C) contiguous
    stride_qkv,
    rows, C,
    eps,
    BLOCK_N: tl.constexpr,  # power of two >= C
    NORMALIZE: tl.constexpr,  # False: qk_normalization off, split only
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < C
    src = QKV + row * stride_qkv
    dst = OUT + row * C
    plane = rows.to(tl.int64) * C  # distance between out[0], out[1], out[2]
    ty = OUT.dtype.element_ty

    q = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        q = rms_scale_row(q, tl.load(WQ + cols, mask=mask, other=0.0).to(tl.float32), C, eps, ty)
    tl.store(dst + cols, cast(q, ty), mask=mask)

    k = tl.load(src + C + cols, mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        k = rms_scale_row(k, tl.load(WK + cols, mask=mask, other=0.0).to(tl.float32), C, eps, ty)
    tl.store(dst + plane + cols, cast(k, ty), mask=mask)

    v = tl.load(src + 2 * C + cols, mask=mask, other=0.0)
    tl.store(dst + 2 * plane + cols, v, mask=mask)


def qk_norm_launch(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
                   eps: float, out: torch.Tensor, config: Optional[dict] = None) -> torch.Tensor:
    """Check the inputs, then write the (3, ..., C) split of ``qkv`` into ``out``."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError(f"{OP}: pass both q_weight and k_weight, or neither")
    weights = [] if q_weight is None else [("q_weight", q_weight), ("k_weight", k_weight)]
    check_tensors(OP, ("qkv", qkv), ("out", out), *weights)
    if qkv.shape[-1] % 3:
        raise ValueError(f"{OP}: qkv last dimension {qkv.shape[-1]} is not 3 * C")
    c = qkv.shape[-1] // 3
    check_row_width(OP, "q/k/v", c)
    for name, w in weights:
        if w.shape != (c,):
            raise ValueError(f"{OP}: {name} must have shape ({c},), got {tuple(w.shape)}")
        if w.dtype != qkv.dtype:
            raise ValueError(f"{OP}: {name} dtype {w.dtype} differs from qkv dtype {qkv.dtype}")
    want = (3,) + tuple(qkv.shape[:-1]) + (c,)
    if tuple(out.shape) != want or out.dtype != qkv.dtype or not out.is_contiguous():
        raise ValueError(f"{OP}: out must be contiguous {want} {qkv.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    rows = as_rows(OP, "qkv", qkv, 3 * c)
    wq = q_weight.contiguous() if q_weight is not None else out  # placeholder pointer, never read
    wk = k_weight.contiguous() if k_weight is not None else out
    if rows.shape[0]:
        launch = row_config(OP, qkv, rows.shape[0], c, config)
        with on_device(qkv):
            _qk_norm_kernel[(rows.shape[0],)](rows, wq, wk, out, rows.stride(0), rows.shape[0], c, eps,
                                              NORMALIZE=q_weight is not None, **launch)
    return out


@torch.library.custom_op("internvit_fast::qk_norm", mutates_args=())
def qk_norm(qkv: torch.Tensor, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
            eps: float = 1e-6) -> torch.Tensor:
    """(..., 3C) -> (3, ..., C): q and k RMS-normalised (when weights are given), v copied."""
    out = torch.empty((3,) + tuple(qkv.shape[:-1]) + (qkv.shape[-1] // 3,), dtype=qkv.dtype,
                      device=qkv.device)
    return qk_norm_launch(qkv, q_weight, k_weight, eps, out)


@qk_norm.register_fake
def _(qkv, q_weight, k_weight, eps=1e-6):
    return qkv.new_empty((3,) + tuple(qkv.shape[:-1]) + (qkv.shape[-1] // 3,))
