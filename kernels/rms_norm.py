"""RMSNorm, optionally after a LayerScale residual add: one row kernel, two ops.

    rms_norm:           h     = round(x / sqrt(mean(x^2) + eps)) * w
    residual_rms_norm:  x_new = round(x + round(round(gamma * y) * s))     s: drop path's per-row
                        h     = round(x_new / sqrt(mean(x_new^2) + eps)) * w   scale (optional;
                                                                                w optional)

``round`` is to the activation dtype, at the points where upstream's eager ops round
(LayerScale's product, the residual sum, the normalised row before the weight), so the
residual stream matches the reference path bit for bit. The kernel is built with FMA
contraction off (``enable_fp_fusion=False``): contracted, ``x + gamma * y`` becomes one
fma that skips the product's rounding on the GPU (the compile gate checks the PTX).
Statistics are in fp32. One program per row; every load is issued before the first store.

``residual_rms_norm`` is the unfused alternative of the proj/fc2 GEMM's residual
epilogue (cuBLAS, then this); ``rms_norm`` follows that epilogue (see linear.py).

Backward (``_rms_norm_bwd_kernel``, registered with torch.library for both ops): the
gradient autograd computes through the reference ops, with the same rounding points
(the gradient of the normalised row rounded as autograd rounds it in the activation dtype,
the two gradients of x_new summed in that dtype, drop path and LayerScale rounded as their
products are). Each program handles a run of rows and keeps fp32 partial sums of the
weight's and gamma's gradients; ``sum(0)`` over the programs finishes them (no atomics).
Saved for backward: x_new (the input x for the plain norm), y and the row scale when
present, the weights: the tensors the reference's autograd keeps, minus its fp32 copies.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import registry
from .common import (as_rows, cast, check_row_width, check_tensors, fp8_quantize_groups, on_device, rms_scale_row,
                      row_launch)
from .launch import LaunchPlan, Meta, Target, lookup, table_key
from .registry import KernelSpec, Shape

OP, RES_OP, BWD_OP = "rms_norm", "residual_rms_norm", "rms_norm_backward"
RES_FP8_OP = "residual_rms_norm_fp8"  # the residual kernel writing h in e4m3 (kernels/fp8.py)
# The rounding points above must survive compilation: every plan of these kernels is built
# without FMA contraction.
FP_FUSION = False


def rms_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6,
                 residual: Optional[torch.Tensor] = None, gamma: Optional[torch.Tensor] = None,
                 rowscale: Optional[torch.Tensor] = None):
    """Plain torch with upstream's rounding. Without ``residual``: RMSNorm(x) * weight.
    With it: (x_new, h) where x_new = x + rowscale * gamma * residual (LayerScale, then drop
    path's per-row scale of shape x.shape[:-1]) and h = RMSNorm(x_new) * weight (h is None
    without weight)."""
    if residual is not None:
        p = residual if gamma is None else (residual.float() * gamma.float()).to(residual.dtype)
        if rowscale is not None:
            p = p * rowscale.unsqueeze(-1)
        x = x + p
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
    S,  # (rows,) drop path's per-row scale of the sub-layer output (HAS_ROWSCALE)
    HS,  # (rows, cdiv(N, 128)) fp32 scales of H_OUT's 1 x 128 groups (QUANT_H), contiguous
    stride_x, stride_y, stride_xo, stride_ho,  # row strides; columns are unit-stride
    N, eps,
    BLOCK_N: tl.constexpr,  # power of two >= N (and >= 128 with QUANT_H)
    HAS_RESIDUAL: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr = False,
    QUANT_H: tl.constexpr = False,  # H_OUT in e4m3 with scales (precision="fp8": the next GEMM's input)
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
    if HAS_ROWSCALE:
        s = tl.load(S + row).to(tl.float32)
    if HAS_RESIDUAL:
        ty = X_OUT.dtype.element_ty
        if HAS_GAMMA:
            # bf16/fp16 products are exact in fp32: one rounding matches torch both with and
            # without layerscale_force_fp32.
            y = cast(y * g, ty).to(tl.float32)
        if HAS_ROWSCALE:
            y = cast(y * s, ty).to(tl.float32)
        x_new = cast(x + y, ty)
        tl.store(X_OUT + row * stride_xo + cols, x_new, mask=mask)
        x = x_new.to(tl.float32)
    if HAS_NORM:
        act = X.dtype.element_ty if not HAS_RESIDUAL else X_OUT.dtype.element_ty
        h = rms_scale_row(x, w, N, eps, act)
        if QUANT_H:
            # The row as the activation dtype holds it, quantized while in registers: exactly
            # what quantizing this kernel's bf16 output would give.
            GROUPS: tl.constexpr = BLOCK_N // 128
            hb = tl.where(mask, cast(h, act).to(tl.float32), 0.0)
            q, scale = fp8_quantize_groups(tl.reshape(hb, (GROUPS, 128)))
            tl.store(H_OUT + row * stride_ho + cols, tl.reshape(q, (BLOCK_N,)), mask=mask)
            g = tl.arange(0, GROUPS)
            tl.store(HS + row * tl.cdiv(N, 128) + g, scale, mask=g < tl.cdiv(N, 128))
        else:
            tl.store(H_OUT + row * stride_ho + cols, cast(h, H_OUT.dtype.element_ty), mask=mask)


FWD_TENSORS = ("X", "Y", "G", "W", "X_OUT", "H_OUT", "S", "HS")


def plan_rows(name: str, metas: Dict[str, Meta], eps: float, flags: Dict[str, bool], target: Target,
              config: Optional[dict] = None) -> LaunchPlan:
    """The forward row kernel's launch: one program per row of ``metas['X']`` (rows, N);
    ``flags`` are its HAS_* switches; absent operands are passed as X (never read).
    ``config`` (the tuner's) overrides the tuned table, which overrides the heuristic."""
    x = metas["X"]
    rows, n = x.shape
    key = table_key(name, M=rows, N=n, dtype=x.dtype)
    entry = lookup(target, key)
    launch = row_launch(max(n, 128) if flags.get("QUANT_H") else n, config or (entry or {}).get("config"))
    stride = {t: metas[t].stride[0] for t in ("X", "Y", "X_OUT", "H_OUT")}
    args = dict({t: metas.get(t, x) for t in FWD_TENSORS}, stride_x=stride["X"], stride_y=stride["Y"],
                stride_xo=stride["X_OUT"], stride_ho=stride["H_OUT"], N=n, eps=float(eps))
    return LaunchPlan(_rms_norm_kernel, (rows,), args, dict(BLOCK_N=launch["BLOCK_N"], **flags),
                      dict(num_warps=launch["num_warps"], num_stages=1, enable_fp_fusion=FP_FUSION), dict(flags),
                      key, entry is not None, f"{name} {x.shape}")


def launch_rows(op: str, x2, y2, g, w, xo, ho, eps, config, s=None, hs=None):
    if not x2.shape[0]:
        return
    given = dict(X=x2, Y=y2, G=g, W=w, X_OUT=xo, H_OUT=ho, S=s, HS=hs)
    tensors = {k: v if v is not None else x2 for k, v in given.items()}  # absent: X, kept unread by its flag
    flags = dict(HAS_RESIDUAL=y2 is not None, HAS_GAMMA=g is not None, HAS_NORM=w is not None,
                 HAS_ROWSCALE=s is not None, QUANT_H=hs is not None)
    plan = plan_rows(op, {k: Meta.of(v) for k, v in tensors.items()}, eps, flags, Target.of(x2.device), config)
    with on_device(x2):
        plan.run(**tensors)


@triton.jit
def _rms_norm_bwd_kernel(
    X,  # (rows, N) what was normalised: x (plain) or x_new (residual), as saved
    W,  # (N,) norm weight (HAS_NORM)
    DH,  # (rows, N) gradient of h (HAS_NORM)
    DXN,  # (rows, N) gradient of x_new from its other uses (HAS_RESIDUAL)
    Y,  # (rows, N) the sub-layer output (HAS_RESIDUAL and HAS_GAMMA: for gamma's gradient)
    G,  # (N,) LayerScale gamma (HAS_GAMMA)
    S,  # (rows,) drop path's row scale (HAS_ROWSCALE)
    DX,  # (rows, N) out: gradient of x (the stream, or the plain norm's input)
    DY,  # (rows, N) out: gradient of y (HAS_RESIDUAL)
    DW_PART, DG_PART,  # (programs, N) fp32 out: this program's partial sums for w and gamma
    rows, N, eps,
    stride_x, stride_dh, stride_dxn, stride_y, stride_dx, stride_dy,  # row strides, unit columns
    rows_per_program,
    BLOCK_N: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_ROWSCALE: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    ty = DX.dtype.element_ty
    if HAS_NORM:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        g = tl.load(G + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dg_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(rows_per_program):
        row = first + i
        if row < rows:
            r64 = row.to(tl.int64)
            x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                dh = tl.load(DH + r64 * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                dxn_in = tl.load(DXN + r64 * stride_dxn + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_GAMMA:
                    y = tl.load(Y + r64 * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_ROWSCALE:
                    s = tl.load(S + r64).to(tl.float32)
            if HAS_NORM:
                rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
                n = cast(x * rstd, ty).to(tl.float32)  # the normalised row, as the forward rounded it
                dw_acc += dh * n
                dn = cast(dh * w, ty).to(tl.float32)  # autograd's gradient of n, in the activation dtype
                dx = rstd * dn - x * (rstd * rstd * rstd) * (tl.sum(dn * x, axis=0) / N)
                dx = cast(dx, ty).to(tl.float32)  # leaves the fp32 part through .float()'s backward
            else:
                dx = tl.zeros((BLOCK_N,), dtype=tl.float32)
            if HAS_RESIDUAL:
                dx = cast(dx + dxn_in, ty).to(tl.float32)  # x_new's two gradients, summed in dtype
                dp = dx
                if HAS_ROWSCALE:
                    dp = cast(dp * s, ty).to(tl.float32)
                if HAS_GAMMA:
                    dg_acc += dp * y
                    dy = cast(dp * g, ty)
                else:
                    dy = cast(dp, ty)
                tl.store(DY + r64 * stride_dy + cols, dy, mask=mask)
            tl.store(DX + r64 * stride_dx + cols, cast(dx, ty), mask=mask)
    if HAS_NORM:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)
    if HAS_GAMMA:
        tl.store(DG_PART + pid.to(tl.int64) * N + cols, dg_acc, mask=mask)


_BWD_TENSORS = ("X", "W", "DH", "DXN", "Y", "G", "S", "DX", "DY", "DW_PART", "DG_PART")


def _bwd_split(rows: int, sms: int) -> Tuple[int, int]:
    """(programs, rows per program) of the backward kernel: enough programs to fill the card,
    few enough that the fp32 partial sums stay small (four per SM), each a run of rows."""
    programs = max(1, min(rows, 4 * sms))
    per = triton.cdiv(rows, programs)
    return triton.cdiv(rows, per), per


def plan_rows_bwd(metas: Dict[str, Meta], eps: float, flags: Dict[str, bool], target: Target,
                  config: Optional[dict] = None) -> LaunchPlan:
    """The backward kernel's launch over the rows of ``metas['X']``."""
    x = metas["X"]
    rows, n = x.shape
    programs, per = _bwd_split(rows, target.sms)
    key = table_key(BWD_OP, M=rows, N=n, dtype=x.dtype)
    entry = lookup(target, key)
    # About 4 values per thread (the forward's 8 halved): a row here holds up to five operands
    # live; at width 3200 with 16 warps triton 3.9 spilled 8 bytes of the bf16 build without
    # the norm (3.6 did not); 32 warps do not spill on either.
    tuned = config or (entry or {}).get("config") or {"num_warps": max(1, min(32, triton.next_power_of_2(n) // 128))}
    launch = row_launch(n, tuned)
    strides = {f"stride_{t.lower()}": metas[t].stride[0] for t in ("X", "DH", "DXN", "Y", "DX", "DY")}
    args = dict({t: metas[t] for t in _BWD_TENSORS}, rows=rows, N=n, eps=float(eps), **strides,
                rows_per_program=per)
    return LaunchPlan(_rms_norm_bwd_kernel, (programs,), args, dict(BLOCK_N=launch["BLOCK_N"], **flags),
                      dict(num_warps=launch["num_warps"], num_stages=1, enable_fp_fusion=FP_FUSION), dict(flags),
                      key, entry is not None, f"{BWD_OP} {x.shape}")


def rms_norm_bwd_launch(x, weight, dh, eps, dx, dxn=None, y=None, gamma=None, rowscale=None, dy=None,
                        config=None):
    """Gradients of rms_norm (``dxn`` None) or residual_rms_norm: writes dx (and dy), returns
    (dweight, dgamma) as fp32 sums, None where absent. ``x`` is what was normalised (x_new)."""
    n = x.shape[-1]
    rows_x = as_rows(BWD_OP, "x", x, n)
    rows = rows_x.shape[0]
    target = Target.of(x.device)
    programs = _bwd_split(rows, target.sms)[0] if rows else 0
    parts = {p: torch.empty((programs, n), dtype=torch.float32, device=x.device) if need else None
             for p, need in (("DW_PART", weight is not None), ("DG_PART", gamma is not None))}
    if rows:
        given = dict(X=rows_x, W=weight, DH=dh, DXN=dxn, Y=y, G=gamma,
                     S=rowscale.reshape(-1) if rowscale is not None else None, DX=dx, DY=dy, **parts)
        tensors = {k: (as_rows(BWD_OP, k.lower(), v, n) if k in ("DH", "DXN", "Y", "DX", "DY") else v)
                   if v is not None else rows_x for k, v in given.items()}  # absent: X, never read
        flags = dict(HAS_NORM=weight is not None, HAS_RESIDUAL=dxn is not None, HAS_GAMMA=gamma is not None,
                     HAS_ROWSCALE=rowscale is not None)
        plan = plan_rows_bwd({k: Meta.of(v) for k, v in tensors.items()}, eps, flags, target, config)
        with on_device(x):
            plan.run(**tensors)
    dw = (parts["DW_PART"].sum(0) if rows else torch.zeros(n, device=x.device)) if weight is not None else None
    dg = (parts["DG_PART"].sum(0) if rows else torch.zeros(n, device=x.device)) if gamma is not None else None
    return dw, dg


# --- plain RMSNorm ----------------------------------------------------------------------


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
    launch_rows(OP, x2, None, None, weight.contiguous(), None, y2, eps, config)
    return out


@torch.library.custom_op("internvit_fast::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm(x) * weight through the Triton kernel (a torch custom op)."""
    out = torch.empty(x.shape, dtype=_out_dtype(x, weight), device=x.device)
    return rms_norm_launch(x, weight, eps, out)


@rms_norm.register_fake
def _(x, weight, eps=1e-6):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


@torch.library.custom_op("internvit_fast::rms_norm_backward", mutates_args=())
def rms_norm_backward(x: torch.Tensor, weight: Optional[torch.Tensor], dh: Optional[torch.Tensor], eps: float,
                      dxn: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                      gamma: Optional[torch.Tensor] = None, rowscale: Optional[torch.Tensor] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dweight, dgamma) of rms_norm (``dxn`` None) or residual_rms_norm, through the
    backward kernel; absent gradients are empty tensors. A custom op, so backward graphs
    that torch.compile traces hold it whole."""
    if weight is not None and weight.dtype != x.dtype:
        raise NotImplementedError(f"rms_norm backward: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dy = torch.empty_like(dx) if dxn is not None else x.new_empty(0)
    dw, dg = rms_norm_bwd_launch(x, weight, dh.contiguous() if dh is not None else None, eps, dx,
                                 dxn=dxn.contiguous() if dxn is not None else None, y=y, gamma=gamma,
                                 rowscale=rowscale, dy=dy if dxn is not None else None)
    return (dx, dy, dw.to(weight.dtype) if weight is not None else x.new_empty(0),
            dg.to(gamma.dtype) if gamma is not None else x.new_empty(0))


@rms_norm_backward.register_fake
def _(x, weight, dh, eps, dxn=None, y=None, gamma=None, rowscale=None):
    return (x.new_empty(x.shape), x.new_empty(x.shape) if dxn is not None else x.new_empty(0),
            weight.new_empty(weight.shape) if weight is not None else x.new_empty(0),
            gamma.new_empty(gamma.shape) if gamma is not None else x.new_empty(0))


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_backward(ctx, dh):
    x, weight = ctx.saved_tensors
    dx, _, dw, _ = rms_norm_backward(x, weight, dh, ctx.eps)
    return dx, dw, None


rms_norm.register_autograd(_rms_backward, setup_context=_rms_setup)


# --- residual + LayerScale + RMSNorm ----------------------------------------------------


def residual_rms_norm_launch(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                             weight: Optional[torch.Tensor], eps: float, x_out: torch.Tensor,
                             h_out: Optional[torch.Tensor], config: Optional[dict] = None,
                             rowscale: Optional[torch.Tensor] = None, h_scale: Optional[torch.Tensor] = None) -> None:
    """Check the inputs, then write x_new into ``x_out`` and, with ``weight``, h into ``h_out``.
    ``rowscale`` (x.shape[:-1]) scales each row of gamma * y (drop path). ``h_scale``: h_out
    is e4m3, written with its 1 x 128 scales into h_scale (the op residual_rms_norm_fp8, whose
    launcher in kernels/fp8.py checks those two and calls this one)."""
    op = RES_OP if h_scale is None else RES_FP8_OP
    if rowscale is not None:
        check_tensors(op, ("rowscale", rowscale))
        if tuple(rowscale.shape) != tuple(x.shape[:-1]) or rowscale.dtype != x.dtype:
            raise ValueError(f"{op}: rowscale must be {tuple(x.shape[:-1])} {x.dtype}, "
                             f"got {tuple(rowscale.shape)} {rowscale.dtype}")
    if (weight is None) != (h_out is None):
        raise ValueError(f"{op}: pass weight and h_out together, or neither")
    named = [("x", x), ("y", y), ("x_out", x_out)]
    named += [] if gamma is None else [("gamma", gamma)]
    named += [] if weight is None else [("weight", weight)] + ([("h_out", h_out)] if h_scale is None else [])
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
    launch_rows(op, x2, y2, gamma.contiguous() if gamma is not None else None,
            weight.contiguous() if weight is not None else None, xo, ho, eps, config,
            rowscale.contiguous().reshape(-1) if rowscale is not None else None,
            h_scale.view(-1, h_scale.shape[-1]) if h_scale is not None else None)


@torch.library.custom_op("internvit_fast::residual_rms_norm", mutates_args=())
def residual_rms_norm(x: torch.Tensor, y: torch.Tensor, gamma: Optional[torch.Tensor],
                      weight: Optional[torch.Tensor], eps: float = 1e-6,
                      rowscale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x + s * gamma * y, RMSNorm(that) * weight); the second is empty without weight."""
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h_out = torch.empty_like(x_out) if weight is not None else x.new_empty(0)
    residual_rms_norm_launch(x, y, gamma, weight, eps, x_out, h_out if weight is not None else None,
                             rowscale=rowscale)
    return x_out, h_out


@residual_rms_norm.register_fake
def _(x, y, gamma, weight, eps=1e-6, rowscale=None):
    x_out = x.new_empty(x.shape)
    return x_out, (torch.empty_like(x_out) if weight is not None else x.new_empty(0))


def _res_setup(ctx, inputs, output):
    x, y, gamma, weight, eps, rowscale = inputs
    ctx.save_for_backward(output[0], y if gamma is not None else None, gamma, weight, rowscale)
    ctx.eps = eps


def residual_backward(x_new, y, gamma, weight, rowscale, eps, dx_new, dh):
    """Gradients (dx, dy, dgamma, dweight) of residual_rms_norm's outputs (x_new, h); None
    where a parameter is absent. Also the MLP op's last step (linear.py)."""
    dx_new = dx_new if dx_new is not None else torch.zeros_like(x_new)
    if weight is not None and dh is None:
        dh = torch.zeros_like(x_new)
    dx, dy, dw, dg = rms_norm_backward(x_new, weight, dh if weight is not None else None, eps, dx_new, y, gamma,
                                       rowscale)
    return dx, dy, dg if gamma is not None else None, dw if weight is not None else None


def _res_backward(ctx, dx_new, dh):
    x_new, y, gamma, weight, rowscale = ctx.saved_tensors
    return residual_backward(x_new, y, gamma, weight, rowscale, ctx.eps, dx_new, dh) + (None, None)


residual_rms_norm.register_autograd(_res_backward, setup_context=_res_setup)


# --- what the tools need to know (registry) ----------------------------------------------

def norm_candidates(arch: str):
    return [dict(num_warps=w) for w in ((4, 16) if arch == "smoke" else (4, 8, 16))]


def _row_metas(shape: Shape, names, dtypes=None) -> Dict[str, Meta]:
    m = Meta.contiguous((shape.rows, shape.width), shape.dtype)
    return {t: (m if t not in ("G", "W", "S") else Meta.contiguous((shape.width,), shape.dtype)) for t in names}


# The variants the fast path launches: the plain norm; residual + LayerScale with and without
# the next norm (the last block), with and without drop path's row scale (training); without
# LayerScale for a model built with init_values=0.
_FWD_VARIANTS = [dict(HAS_RESIDUAL=False, HAS_GAMMA=False, HAS_NORM=True, HAS_ROWSCALE=False, QUANT_H=False)] + [
    dict(HAS_RESIDUAL=True, HAS_GAMMA=g, HAS_NORM=n, HAS_ROWSCALE=r, QUANT_H=False)
    for g in (True, False) for n in (True, False) for r in (False, True)]


def _fwd_plans(flag_sets):
    def plans(target: Target):
        return [plan_rows(OP if not f["HAS_RESIDUAL"] else RES_OP, _row_metas(s, FWD_TENSORS), 1e-6, f, target)
                for s in registry.segmentation_shapes() for f in flag_sets]
    return plans


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


def _plan_for(flags):
    def plan_for(i: dict, target: Target) -> LaunchPlan:
        x = Meta.of(i["x"])
        return plan_rows(OP if not flags["HAS_RESIDUAL"] else RES_OP, {t: x for t in FWD_TENSORS}, i["eps"], flags,
                         target)
    return plan_for


SPEC = KernelSpec(
    name=OP,
    math="h = round(x / sqrt(mean(x^2) + eps)) * w",
    promises_rounding=True,
    loads_first=True,
    make_inputs=_rms_inputs,
    new_outputs=lambda i: {"h": registry.nan_like(i["x"])},
    launch=lambda i, o, cfg: rms_norm_launch(i["x"], i["weight"], i["eps"], o["h"], cfg),
    reference=lambda i: {"h": rms_norm_ref(i["x"], i["weight"], i["eps"])},
    plans=_fwd_plans(_FWD_VARIANTS[:1]),
    plan_for=_plan_for(_FWD_VARIANTS[0]),
    candidates=norm_candidates,
)

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
    plans=_fwd_plans(_FWD_VARIANTS[1:]),
    plan_for=_plan_for(_FWD_VARIANTS[1]),
    candidates=norm_candidates,
)

__all__ = ["rms_norm", "rms_norm_launch", "rms_norm_ref", "residual_rms_norm", "residual_rms_norm_launch",
           "SPEC", "RES_SPEC"]


# --- backward: what the tools need to know --------------------------------------------------

# The backward's variants: the plain norm's (rms_norm, qk_norm), and the residual op's with
# or without LayerScale, the next norm (not after the last block) and drop path.
_BWD_VARIANTS = [dict(HAS_NORM=True, HAS_RESIDUAL=False, HAS_GAMMA=False, HAS_ROWSCALE=False)] + [
    dict(HAS_NORM=n, HAS_RESIDUAL=True, HAS_GAMMA=g, HAS_ROWSCALE=r)
    for g in (True, False) for n in (True, False) for r in (False, True)]


def _bwd_metas(shape: Shape, sms: int) -> Dict[str, Meta]:
    metas = _row_metas(shape, _BWD_TENSORS)
    programs = _bwd_split(shape.rows, sms)[0]
    metas["DW_PART"] = metas["DG_PART"] = Meta.contiguous((programs, shape.width), torch.float32)
    return metas


def _bwd_plans(target: Target):
    return [plan_rows_bwd(_bwd_metas(s, target.sms), 1e-6, f, target)
            for s in registry.segmentation_shapes() for f in _BWD_VARIANTS]


def _bwd_inputs(shape: Shape, device) -> dict:
    inp = _res_inputs(shape, device)
    inp["rowscale"] = (torch.rand(shape.rows, device=device) > 0.3).to(shape.dtype) * 1.25
    inp["dx_new"] = registry.rand((shape.rows, shape.width), shape.dtype, device)
    inp["dh"] = registry.rand((shape.rows, shape.width), shape.dtype, device)
    return inp


def _bwd_reference(i: dict) -> dict:
    """Autograd through the plain-torch ops (their rounding points), the kernel's gradients."""
    with torch.inference_mode(False), torch.enable_grad():  # also when a benchmark runs in inference mode
        leaves = [t.detach().clone().requires_grad_() for t in (i["x"], i["y"], i["gamma"], i["weight"])]
        x_new, h = rms_norm_ref(leaves[0], leaves[3], i["eps"], leaves[1], leaves[2], i["rowscale"])
        grads = torch.autograd.grad((x_new, h), leaves, (i["dx_new"].clone(), i["dh"].clone()))
    return dict(zip(("dx", "dy", "dgamma", "dweight"), grads))


def _bwd_run(i: dict, o: dict, cfg) -> None:
    x_new, _ = rms_norm_ref(i["x"], i["weight"], i["eps"], i["y"], i["gamma"], i["rowscale"])
    dw, dg = rms_norm_bwd_launch(x_new, i["weight"], i["dh"], i["eps"], o["dx"], dxn=i["dx_new"], y=i["y"],
                                 gamma=i["gamma"], rowscale=i["rowscale"], dy=o["dy"], config=cfg)
    o["dgamma"].copy_(dg)
    o["dweight"].copy_(dw)


def _bwd_plan_for(i: dict, target: Target) -> LaunchPlan:
    return plan_rows_bwd(_bwd_metas(Shape(*i["x"].shape, dtype=i["x"].dtype), target.sms), i["eps"],
                         dict(HAS_NORM=True, HAS_RESIDUAL=True, HAS_GAMMA=True, HAS_ROWSCALE=True), target)


BWD_SPEC = KernelSpec(
    name=BWD_OP,
    training=True,
    math="gradients of residual_rms_norm (and of rms_norm and qk_norm: the same kernel without the residual)",
    promises_rounding=True,
    make_inputs=_bwd_inputs,
    new_outputs=lambda i: {"dx": registry.nan_like(i["x"]), "dy": registry.nan_like(i["x"]),
                           "dgamma": registry.nan_like(i["gamma"]), "dweight": registry.nan_like(i["weight"])},
    launch=_bwd_run,
    reference=_bwd_reference,
    plans=_bwd_plans,
    plan_for=_bwd_plan_for,
    candidates=norm_candidates,
)
