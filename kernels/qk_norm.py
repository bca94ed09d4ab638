"""Fused QK-norm: RMS-normalise the q and k parts of the qkv projection, in attention's layout.

For each token row r of ``qkv = [q | k | v]`` (each C wide, head-major):

    out[0, r] = round(q / sqrt(mean(q^2) + eps)) * w_q     (over all C columns: upstream
    out[1, r] = round(k / sqrt(mean(k^2) + eps)) * w_k      normalises all heads together)

v is not touched: attention reads it in place as a strided view of ``qkv``. ``out`` is
(2, B, N, C) contiguous, so ``out[i].view(B, N, H, D).transpose(1, 2)`` is the (B, H, N, D)
tensor attention takes without a copy. Both rows are loaded before anything is stored
(a store could alias a later load, so the compiler would not reorder them itself);
built without FMA contraction, like every kernel that promises upstream's rounding.
Backward: rms_norm.py's backward kernel on the q and k columns (saved: qkv and the weights).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from typing import Dict, Optional

from . import registry
from .common import as_rows, cast, check_row_width, check_tensors, on_device, rms_scale_row, row_launch
from .launch import LaunchPlan, Meta, Target, lookup, table_key
from .registry import KernelSpec, Shape
from .rms_norm import FP_FUSION, norm_candidates, rms_norm_backward, rms_norm_ref

OP = "qk_norm"


def qk_norm_ref(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                eps: float = 1e-6) -> torch.Tensor:
    """Plain torch: (..., 3C) -> (2, ..., C), q and k RMS-normalised with upstream's rounding."""
    q, k, _ = qkv.chunk(3, dim=-1)
    return torch.stack([rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)])


@triton.jit
def _qk_norm_kernel(
    QKV,  # (rows, 3C) qkv projection output, row stride stride_qkv, unit column stride
    WQ, WK,  # (C,) q_norm and k_norm weights
    OUT,  # (2, rows, C) contiguous
    stride_qkv,
    rows, C,
    eps,
    BLOCK_N: tl.constexpr,  # power of two >= C
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < C
    src = QKV + row * stride_qkv
    q = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(src + C + cols, mask=mask, other=0.0).to(tl.float32)
    wq = tl.load(WQ + cols, mask=mask, other=0.0).to(tl.float32)
    wk = tl.load(WK + cols, mask=mask, other=0.0).to(tl.float32)
    ty = OUT.dtype.element_ty
    q = rms_scale_row(q, wq, C, eps, ty)
    k = rms_scale_row(k, wk, C, eps, ty)
    dst = OUT + row * C
    tl.store(dst + cols, cast(q, ty), mask=mask)
    tl.store(dst + rows.to(tl.int64) * C + cols, cast(k, ty), mask=mask)


def qk_norm_launch(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                   eps: float, out: torch.Tensor, config: dict = None) -> torch.Tensor:
    """Check the inputs, then write the normalised q and k of ``qkv`` into ``out`` (2, ..., C)."""
    check_tensors(OP, ("qkv", qkv), ("out", out), ("q_weight", q_weight), ("k_weight", k_weight))
    if qkv.shape[-1] % 3:
        raise ValueError(f"{OP}: qkv last dimension {qkv.shape[-1]} is not 3 * C")
    c = qkv.shape[-1] // 3
    check_row_width(OP, "q/k", c)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (c,):
            raise ValueError(f"{OP}: {name} must have shape ({c},), got {tuple(w.shape)}")
        if w.dtype != qkv.dtype:
            raise ValueError(f"{OP}: {name} dtype {w.dtype} differs from qkv dtype {qkv.dtype}")
    want = (2,) + tuple(qkv.shape[:-1]) + (c,)
    if tuple(out.shape) != want or out.dtype != qkv.dtype or not out.is_contiguous():
        raise ValueError(f"{OP}: out must be contiguous {want} {qkv.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    rows = as_rows(OP, "qkv", qkv, 3 * c)
    if rows.shape[0]:
        tensors = dict(QKV=rows, WQ=q_weight.contiguous(), WK=k_weight.contiguous(), OUT=out)
        plan = plan_qk_norm({k: Meta.of(v) for k, v in tensors.items()}, eps, Target.of(qkv.device), config)
        with on_device(qkv):
            plan.run(**tensors)
    return out


def plan_qk_norm(metas: Dict[str, Meta], eps: float, target: Target, config: Optional[dict] = None) -> LaunchPlan:
    """One program per token row of ``metas['QKV']`` (rows, 3C)."""
    rows, c3 = metas["QKV"].shape
    c = c3 // 3
    key = table_key(OP, M=rows, N=c, dtype=metas["QKV"].dtype)
    entry = lookup(target, key)
    launch = row_launch(c, config or (entry or {}).get("config"))
    args = dict(metas, stride_qkv=metas["QKV"].stride[0], rows=rows, C=c, eps=float(eps))
    return LaunchPlan(_qk_norm_kernel, (rows,), args, dict(BLOCK_N=launch["BLOCK_N"]),
                      dict(num_warps=launch["num_warps"], num_stages=1, enable_fp_fusion=FP_FUSION), {}, key,
                      entry is not None, f"{OP} {(rows, c)}")


@torch.library.custom_op("internvit_fast::qk_norm", mutates_args=())
def qk_norm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
            eps: float = 1e-6) -> torch.Tensor:
    """(..., 3C) -> (2, ..., C): q and k RMS-normalised; v stays where it is, in ``qkv``."""
    out = torch.empty((2,) + tuple(qkv.shape[:-1]) + (qkv.shape[-1] // 3,), dtype=qkv.dtype,
                      device=qkv.device)
    return qk_norm_launch(qkv, q_weight, k_weight, eps, out)


@qk_norm.register_fake
def _(qkv, q_weight, k_weight, eps=1e-6):
    return qkv.new_empty((2,) + tuple(qkv.shape[:-1]) + (qkv.shape[-1] // 3,))


def _setup(ctx, inputs, output):
    qkv, q_weight, k_weight, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight)
    ctx.eps = eps


def _backward(ctx, dout):
    """The RMSNorm backward kernel on the q and k columns of qkv; v's columns get zeros here
    (attention's gradient for v reaches qkv through its view)."""
    qkv, q_weight, k_weight = ctx.saved_tensors
    c = qkv.shape[-1] // 3
    dq, _, dwq, _ = rms_norm_backward(qkv[..., :c], q_weight, dout[0], ctx.eps)
    dk, _, dwk, _ = rms_norm_backward(qkv[..., c:2 * c], k_weight, dout[1], ctx.eps)
    return torch.cat([dq, dk, torch.zeros_like(dq)], dim=-1), dwq, dwk, None


qk_norm.register_autograd(_backward, setup_context=_setup)


# --- what the tools need to know (registry) ----------------------------------------------

def _metas(shape: Shape) -> Dict[str, Meta]:
    w = Meta.contiguous((shape.width,), shape.dtype)
    return dict(QKV=Meta.contiguous((shape.rows, 3 * shape.width), shape.dtype), WQ=w, WK=w,
                OUT=Meta.contiguous((2, shape.rows, shape.width), shape.dtype))


def _inputs(shape: Shape, device) -> dict:
    r = registry.rand
    return dict(qkv=r((shape.rows, 3 * shape.width), shape.dtype, device, 2.0),
                q_weight=r((shape.width,), shape.dtype, device, 1.0, 1.0),
                k_weight=r((shape.width,), shape.dtype, device, 1.0, 1.0), eps=1e-6)


SPEC = KernelSpec(
    name=OP,
    math="q, k = RMSNorm(q) * w_q, RMSNorm(k) * w_k over all heads; v read in place",
    promises_rounding=True,
    loads_first=True,
    make_inputs=_inputs,
    new_outputs=lambda i: {"qk": registry.nan_like(i["qkv"], (2, i["qkv"].shape[0], i["qkv"].shape[1] // 3))},
    launch=lambda i, o, cfg: qk_norm_launch(i["qkv"], i["q_weight"], i["k_weight"], i["eps"], o["qk"], cfg),
    reference=lambda i: {"qk": qk_norm_ref(i["qkv"], i["q_weight"], i["k_weight"], i["eps"])},
    plans=lambda target: [plan_qk_norm(_metas(s), 1e-6, target) for s in registry.segmentation_shapes()],
    plan_for=lambda i, target: plan_qk_norm(_metas(Shape(i["qkv"].shape[0], i["qkv"].shape[1] // 3,
                                                         dtype=i["qkv"].dtype)), i["eps"], target),
    candidates=norm_candidates,
)
