"""LayerScale residual add fused with the next RMSNorm.

    x_new = round(x + round(gamma * y))                 (the residual stream, written once)
    h     = round(x_new / sqrt(mean(x_new^2) + eps)) * w (the next sub-layer's input)

``round`` is to the activation dtype, at the points where upstream's eager ops
round (LayerScale's product, the residual sum, the normalised row), so the fused
result tracks the reference path bit for bit up to the order of the mean.
Without gamma (init_values falsy) the product is y itself; without w only x_new
is produced (the last block).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import as_rows, cast, check_row_width, check_tensors, on_device, rms_scale_row
from .tuning import row_config

OP = "residual_rms_norm"


def residual_rms_norm_ref(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                          weight: Optional[torch.Tensor], eps: float = 1e-6,
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain torch: (x + gamma * y, RMSNorm(x + gamma * y) * weight) with upstream's rounding."""
    x_new = x + (y if gamma is None else (y.float() * gamma.float()).to(y.dtype))
    if weight is None:
        return x_new, None
    h = x_new.float()
    return x_new, weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@triton.jit
def _residual_rms_norm_kernel(
    X, Y,  # (rows, N) residual stream and sub-layer output
    G,  # (N,) LayerScale gamma (unused when not HAS_GAMMA)
    W,  # (N,) next RMSNorm weight (unused when not HAS_NORM)
    X_OUT, H_OUT,  # (rows, N) new residual stream, normalised row
    stride_x, stride_y, stride_xo, stride_ho,
    N, eps,
    BLOCK_N: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    ty = X_OUT.dtype.element_ty
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        # bf16/fp16 products are exact in fp32, so one rounding matches torch both with
        # and without layerscale_force_fp32.
        y = cast(y * tl.load(G + cols, mask=mask, other=0.0).to(tl.float32), ty).to(tl.float32)
    x_new = cast(x + y, ty)
    tl.store(X_OUT + row * stride_xo + cols, x_new, mask=mask)
    if HAS_NORM:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        h = rms_scale_row(x_new.to(tl.float32), w, N, eps, ty)
        tl.store(H_OUT + row * stride_ho + cols, cast(h, ty), mask=mask)


def residual_rms_norm_launch(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                             weight: Optional[torch.Tensor], eps: float, x_out: torch.Tensor,
                             h_out: Optional[torch.Tensor], config: Optional[dict] = None) -> None:
    """Check the inputs, then write x_new into ``x_out`` and, with ``weight``, h into ``h_out``."""
    if (weight is None) != (h_out is None):
        raise ValueError(f"{OP}: pass weight and h_out together, or neither")
    named = [("x", x), ("y", y), ("x_out", x_out)]
    named += [] if gamma is None else [("gamma", gamma)]
    named += [] if weight is None else [("weight", weight), ("h_out", h_out)]
    check_tensors(OP, *named)
    n = x.shape[-1]
    check_row_width(OP, "x", n)
    for name, t in named:
        if name in ("gamma", "weight"):
            if t.shape != (n,):
                raise ValueError(f"{OP}: {name} must have shape ({n},), got {tuple(t.shape)}")
        elif t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(f"{OP}: {name} is {tuple(t.shape)} {t.dtype}, expected "
                             f"{tuple(x.shape)} {x.dtype} like x")
    if weight is not None and weight.dtype != x.dtype:
        raise ValueError(f"{OP}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    x2, y2, xo = (as_rows(OP, nm, t, n) for nm, t in (("x", x), ("y", y), ("x_out", x_out)))
    ho = as_rows(OP, "h_out", h_out, n) if h_out is not None else xo
    g = gamma.contiguous() if gamma is not None else x2  # placeholder pointer, never read
    w = weight.contiguous() if weight is not None else x2
    if x2.shape[0]:
        launch = row_config(OP, x, x2.shape[0], n, config)
        with on_device(x):
            _residual_rms_norm_kernel[(x2.shape[0],)](
                x2, y2, g, w, xo, ho, x2.stride(0), y2.stride(0), xo.stride(0), ho.stride(0), n, eps,
                HAS_GAMMA=gamma is not None, HAS_NORM=weight is not None, **launch)


@torch.library.custom_op("internvit_fast::residual_rms_norm", mutates_args=())
def residual_rms_norm(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                      weight: Optional[torch.Tensor], eps: float = 1e-6,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + gamma * y, RMSNorm(x + gamma * y) * weight); the second is empty without weight."""
    x_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h_out = torch.empty_like(x_out) if weight is not None else x.new_empty(0)
    residual_rms_norm_launch(x, y, gamma, weight, eps, x_out, h_out if weight is not None else None)
    return x_out, h_out


@residual_rms_norm.register_fake
def _(x, y, gamma, weight, eps=1e-6):
    x_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return x_out, (torch.empty_like(x_out) if weight is not None else x.new_empty(0))
