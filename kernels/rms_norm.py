"""RMSNorm: y = round(x / sqrt(mean(x^2) + eps)) * w, statistics in fp32.

One program per row; the row is read once and written once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import as_rows, cast, check_row_width, check_tensors, on_device, rms_scale_row
from .tuning import row_config

OP = "rms_norm"


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-torch RMSNorm with upstream's rounding (the reference the kernel matches)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@triton.jit
def _rms_norm_kernel(
    X,  # (rows, N) input, row stride stride_x, unit column stride
    W,  # (N,) weight
    Y,  # (rows, N) output, row stride stride_y
    stride_x, stride_y,
    N,  # row width
    eps,
    BLOCK_N: tl.constexpr,  # power of two >= N
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = rms_scale_row(x, w, N, eps, X.dtype.element_ty)
    tl.store(Y + row * stride_y + cols, cast(y, Y.dtype.element_ty), mask=mask)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                    config: Optional[dict] = None) -> torch.Tensor:
    """Check the inputs, then write RMSNorm(x) * weight into ``out`` (same shape as x)."""
    check_tensors(OP, ("x", x), ("weight", weight), ("out", out))
    if weight.ndim != 1:
        raise ValueError(f"{OP}: weight must be 1-D, got shape {tuple(weight.shape)}")
    n = weight.shape[0]
    check_row_width(OP, "x", n)
    if out.shape != x.shape or out.dtype != _out_dtype(x, weight):
        raise ValueError(f"{OP}: out must be {tuple(x.shape)} {_out_dtype(x, weight)}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    x2, y2 = as_rows(OP, "x", x, n), as_rows(OP, "out", out, n)
    weight = weight.contiguous()
    if x2.shape[0]:
        launch = row_config(OP, x, x2.shape[0], n, config)
        with on_device(x):
            _rms_norm_kernel[(x2.shape[0],)](x2, weight, y2, x2.stride(0), y2.stride(0), n, eps, **launch)
    return out


@torch.library.custom_op("internvit_fast::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm(x) * weight through the Triton kernel (a torch custom op)."""
    out = torch.empty(x.shape, dtype=_out_dtype(x, weight), device=x.device)
    return rms_norm_launch(x, weight, eps, out)


@rms_norm.register_fake
def _(x, weight, eps=1e-6):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))
