"""RMSNorm, optionally after a LayerScale residual add: one row kernel, two ops.

    rms_norm:           h     = round(x / sqrt(mean(x^2) + eps)) * w
    residual_rms_norm:  x_new = round(x + round(gamma * y))
                        h     = round(x_new / sqrt(mean(x_new^2) + eps)) * w   (w optional)

``round`` is to the activation dtype, at the points where upstream's eager ops round
(LayerScale's product, the residual sum, the normalised row before the weight), so the
residual stream matches the reference path bit for bit. The kernel is built with FMA
contraction off (``enable_fp_fusion=False``): contracted, ``x + gamma * y`` becomes one
fma that skips the product's rounding on the GPU (the compile gate checks the PTX).
Statistics are in fp32. One program per row; every load is issued before the first store.

``residual_rms_norm`` is the unfused alternative of the proj/fc2 GEMM's residual
epilogue (cuBLAS, then this); ``rms_norm`` follows that epilogue (see linear.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import registry
from ._common import as_rows, cast, check_row_width, check_tensors, on_device, rms_scale_row
from .registry import KernelSpec, Shape
from .tuning import row_config

LAUNCH_OPTIONS = {"enable_fp_fusion": False}  # the rounding points above must survive compilation


def rms_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6,
                 residual: Optional[torch.Tensor] = None, gamma: Optional[torch.Tensor] = None):
    """Plain torch with upstream's rounding. Without ``residual``: RMSNorm(x) * weight.
    With it: (x_new, h) where x_new = x + gamma * residual and h = RMSNorm(x_new) * weight
    (h is None without weight)."""
    if residual is not None:
        x = x + (residual if gamma is None else (residual.float() * gamma.float()).to(residual.dtype))
    h = None
    if weight is not None:
        f = x.float()
        h = weight * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if residual is None else (x, h)


@triton.jit
def _rms_norm_kernel(
    X,  # (rows, N) input: the residual stream, or a plain RMSNorm's input
    Y,  # (rows, N) sub-layer output added to X (HAS_RESIDUAL)
    G,  # (N,) LayerScale gamma applied to Y (HAS_GAMMA)
    W,  # (N,) RMSNorm weight (HAS_NORM)
    X_OUT,  # (rows, N) new residual stream (HAS_RESIDUAL)
    H_OUT,  # (rows, N) normalised row (HAS_NORM)
    stride_x, stride_y, stride_xo, stride_ho,  # row strides; columns are unit-stride
    N, eps,
    BLOCK_N: tl.constexpr,  # power of two >= N
    HAS_RESIDUAL: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    # All loads first: stores could alias them, so the compiler keeps program order.
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        g = tl.load(G + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        ty = X_OUT.dtype.element_ty
        if HAS_GAMMA:
            # bf16/fp16 products are exact in fp32: one rounding matches torch both with and
            # without layerscale_force_fp32.
            y = cast(y * g, ty).to(tl.float32)
        x_new = cast(x + y, ty)
        tl.store(X_OUT + row * stride_xo + cols, x_new, mask=mask)
        x = x_new.to(tl.float32)
    if HAS_NORM:
        h = rms_scale_row(x, w, N, eps, X.dtype.element_ty if not HAS_RESIDUAL else X_OUT.dtype.element_ty)
        tl.store(H_OUT + row * stride_ho + cols, cast(h, H_OUT.dtype.element_ty), mask=mask)


def _launch(op: str, x2, y2, g, w, xo, ho, eps, n, config):
    rows = x2.shape[0]
    if not rows:
        return
    launch = row_config(op, x2, rows, n, config)
    placeholder = x2  # pointer for an absent operand; its constexpr flag keeps it unread
    with on_device(x2):
        _rms_norm_kernel[(rows,)](
            x2, y2 if y2 is not None else placeholder, g if g is not None else placeholder,
            w if w is not None else placeholder, xo if xo is not None else placeholder,
            ho if ho is not None else placeholder,
            x2.stride(0), y2.stride(0) if y2 is not None else 0, xo.stride(0) if xo is not None else 0,
            ho.stride(0) if ho is not None else 0, n, eps,
            HAS_RESIDUAL=y2 is not None, HAS_GAMMA=g is not None, HAS_NORM=w is not None,
            **launch, **LAUNCH_OPTIONS)


# --- plain RMSNorm ----------------------------------------------------------------------

OP = "rms_norm"


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
    _launch(OP, x2, None, None, weight.contiguous(), None, y2, eps, n, config)
    return out


@torch.library.custom_op("internvit_fast::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm(x) * weight through the Triton kernel (a torch custom op)."""
    out = torch.empty(x.shape, dtype=_out_dtype(x, weight), device=x.device)
    return rms_norm_launch(x, weight, eps, out)


@rms_norm.register_fake
def _(x, weight, eps=1e-6):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


# --- residual + LayerScale + RMSNorm ----------------------------------------------------

RES_OP = "residual_rms_norm"


def residual_rms_norm_launch(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                             weight: Optional[torch.Tensor], eps: float, x_out: torch.Tensor,
                             h_out: Optional[torch.Tensor], config: Optional[dict] = None) -> None:
    """Check the inputs, then write x_new into ``x_out`` and, with ``weight``, h into ``h_out``."""
    op = RES_OP
    if (weight is None) != (h_out is None):
        raise ValueError(f"{op}: pass weight and h_out together, or neither")
    named = [("x", x), ("y", y), ("x_out", x_out)]
    named += [] if gamma is None else [("gamma", gamma)]
    named += [] if weight is None else [("weight", weight), ("h_out", h_out)]
    check_tensors(op, *named)
    n = x.shape[-1]
    check_row_width(op, "x", n)
    for name, t in named:
        if name in ("gamma", "weight"):
            if t.shape != (n,):
                raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(t.shape)}")
            if t.dtype != x.dtype:
                raise ValueError(f"{op}: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
        elif t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} is {tuple(t.shape)} {t.dtype}, expected "
                             f"{tuple(x.shape)} {x.dtype} like x")
    x2, y2, xo = (as_rows(op, nm, t, n) for nm, t in (("x", x), ("y", y), ("x_out", x_out)))
    ho = as_rows(op, "h_out", h_out, n) if h_out is not None else None
    _launch(op, x2, y2, gamma.contiguous() if gamma is not None else None,
            weight.contiguous() if weight is not None else None, xo, ho, eps, n, config)


@torch.library.custom_op("internvit_fast::residual_rms_norm", mutates_args=())
def residual_rms_norm(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                      weight: Optional[torch.Tensor], eps: float = 1e-6,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + gamma * y, RMSNorm(x + gamma * y) * weight); the second is empty without weight."""
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h_out = torch.empty_like(x_out) if weight is not None else x.new_empty(0)
    residual_rms_norm_launch(x, y, gamma, weight, eps, x_out, h_out if weight is not None else None)
    return x_out, h_out


@residual_rms_norm.register_fake
def _(x, y, gamma, weight, eps=1e-6):
    x_out = x.new_empty(x.shape)
    return x_out, (torch.empty_like(x_out) if weight is not None else x.new_empty(0))


# --- what the tools need to know (registry) ----------------------------------------------

def _row_args(shape: Shape) -> dict:
    p, n = registry.POINTER[shape.dtype], shape.width
    return dict(X=p, Y=p, G=p, W=p, X_OUT=p, H_OUT=p, stride_x=n, stride_y=n, stride_xo=n, stride_ho=n,
                N=n, eps=1e-6)


def _norm_candidates(arch: str):
    return [dict(num_warps=w) for w in ((4, 16) if arch == "smoke" else (4, 8, 16))]


def _row_shape(shape: Shape) -> dict:
    return {"M": shape.rows, "N": shape.width, "dtype": registry.DTYPE_NAMES[shape.dtype]}


def _rms_inputs(shape: Shape, device) -> dict:
    r = registry.rand
    return dict(x=r((shape.rows, shape.width), shape.dtype, device, 2.0),
                weight=r((shape.width,), shape.dtype, device, 1.0, 1.0), eps=1e-6)


def _res_inputs(shape: Shape, device) -> dict:
    r = registry.rand
    return dict(x=r((shape.rows, shape.width), shape.dtype, device, 3.0),
                y=r((shape.rows, shape.width), shape.dtype, device),
                gamma=r((shape.width,), shape.dtype, device, 0.3),
                weight=r((shape.width,), shape.dtype, device, 1.0, 1.0), eps=1e-6)


SPEC = KernelSpec(
    name=OP,
    math="h = round(x / sqrt(mean(x^2) + eps)) * w",
    promises_rounding=True,
    loads_first=True,
    make_inputs=_rms_inputs,
    new_outputs=lambda i: {"h": registry.nan_like(i["x"])},
    launch=lambda i, o, cfg: rms_norm_launch(i["x"], i["weight"], i["eps"], o["h"], cfg),
    reference=lambda i: {"h": rms_norm_ref(i["x"], i["weight"], i["eps"])},
    eager=lambda i: rms_norm_ref(i["x"], i["weight"], i["eps"]),
    compile_specs=registry.row_specs(OP, _rms_norm_kernel, dict(HAS_RESIDUAL=False, HAS_GAMMA=False, HAS_NORM=True),
                                     _row_args, LAUNCH_OPTIONS),
    candidates=_norm_candidates,
    tuned_shape=_row_shape,
    traffic=lambda s, cfg=None: (2 * s.rows * s.width * s.el + s.width * s.el,) * 2,
)


def _res_specs(arch: int):
    out = []
    for flags in ({"HAS_GAMMA": True, "HAS_NORM": True}, {"HAS_GAMMA": False, "HAS_NORM": True},
                  {"HAS_GAMMA": True, "HAS_NORM": False}, {"HAS_GAMMA": False, "HAS_NORM": False}):
        out += registry.row_specs(RES_OP, _rms_norm_kernel, dict(HAS_RESIDUAL=True, **flags), _row_args,
                                  LAUNCH_OPTIONS)(arch)
    return out


def _res_traffic(s: Shape, cfg=None):
    b = 4 * s.rows * s.width * s.el + 2 * s.width * s.el
    return b, b


RES_SPEC = KernelSpec(
    name=RES_OP,
    math="x_new = round(x + round(gamma * y)); h = round(x_new / sqrt(mean(x_new^2) + eps)) * w",
    promises_rounding=True,
    loads_first=True,
    make_inputs=_res_inputs,
    new_outputs=lambda i: {"x_new": registry.nan_like(i["x"]), "h": registry.nan_like(i["x"])},
    launch=lambda i, o, cfg: residual_rms_norm_launch(i["x"], i["y"], i["gamma"], i["weight"], i["eps"],
                                                      o["x_new"], o["h"], cfg),
    reference=lambda i: dict(zip(("x_new", "h"), rms_norm_ref(i["x"], i["weight"], i["eps"], i["y"], i["gamma"]))),
    eager=lambda i: rms_norm_ref(i["x"], i["weight"], i["eps"], i["y"], i["gamma"]),
    compile_specs=_res_specs,
    candidates=_norm_candidates,
    tuned_shape=_row_shape,
    traffic=_res_traffic,
)

__all__ = ["rms_norm", "rms_norm_launch", "rms_norm_ref", "residual_rms_norm", "residual_rms_norm_launch",
           "SPEC", "RES_SPEC"]
