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

FP8 attention (precision="fp8", attention_fp8.py) takes q, k and v in e4m3 instead: the
same kernel's FP8 form (``qk_norm_fp8``) rounds the normalised q and k to the activation
dtype as above, then quantizes them, and v, with one power-of-two scale per token and head
(the grain of the GEMMs' 1 x 128 groups: a head is 128 wide), and writes v transposed per
head, (B, H, D, N): Hopper's e4m3 wgmma takes its B operand (v, in P @ v) only K-major,
with the tokens contiguous. One launch reads qkv once: programs below ``v_programs`` each
quantize 32 tokens of v (32 contiguous bytes a store in the transposed layout), the others
one token's q and k.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from typing import Dict, Optional, Tuple

from . import registry
from .common import (FLOAT_DTYPES, FP8, as_rows, cast, check_row_width, check_tensors, fp8_quantize_groups, on_device,
                     rms_scale_row, row_launch)
from .fp8 import quantize_ref
from .launch import LaunchPlan, Meta, Target, lookup, table_key
from .registry import KernelSpec, Shape
from .rms_norm import FP_FUSION, norm_candidates, rms_norm_backward, rms_norm_ref

OP = "qk_norm"
FP8_OP = "qk_norm_fp8"
V_ROWS = 32  # tokens of v per program of the FP8 form: 32-byte stores into the transposed copy


def qk_norm_ref(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                eps: float = 1e-6) -> torch.Tensor:
    """Plain torch: (..., 3C) -> (2, ..., C), q and k RMS-normalised with upstream's rounding."""
    q, k, _ = qkv.chunk(3, dim=-1)
    return torch.stack([rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)])


@triton.jit
def _normed_row(QKV, WQ, WK, row, stride_qkv, C, eps, ty: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token ``row``'s q and k RMS-normalised in fp32 with upstream's rounding up to the final
    cast to ``ty`` (the caller's, as it stores them or quantizes them); the columns and mask."""
    cols = tl.arange(0, BLOCK_N)
    mask = cols < C
    src = QKV + row * stride_qkv
    q = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(src + C + cols, mask=mask, other=0.0).to(tl.float32)
    wq = tl.load(WQ + cols, mask=mask, other=0.0).to(tl.float32)
    wk = tl.load(WK + cols, mask=mask, other=0.0).to(tl.float32)
    return rms_scale_row(q, wq, C, eps, ty), rms_scale_row(k, wk, C, eps, ty), cols, mask


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
    ty = OUT.dtype.element_ty
    q, k, cols, mask = _normed_row(QKV, WQ, WK, row, stride_qkv, C, eps, ty, BLOCK_N)
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


# --- the FP8 form: q, k and v in e4m3 for FP8 attention ------------------------------------

def padded_tokens(n: int) -> int:
    """The row pitch of v's transposed copy: tokens rounded up to 16 (16-byte rows)."""
    return -(-n // 16) * 16


def qk_norm_fp8_ref(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch: qkv (B, N, 3C) -> (qk (2, B, N, C) e4m3, vt (B, H, D, N padded to 16) e4m3,
    scales (3, B, N, H) fp32): q and k as qk_norm_ref rounds them, then q, k and v quantized per
    token and head; vt[b, h, :, n] is token n's head h of v (zeros past N)."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    qk = qk_norm_ref(qkv, q_weight, k_weight, eps)
    (qk8, qks), (v8, vs) = quantize_ref(qk, d), quantize_ref(qkv[..., 2 * c:], d)
    vt = torch.zeros((b, heads, d, padded_tokens(n)), dtype=FP8, device=qkv.device)
    vt[..., :n] = v8.view(b, n, heads, d).permute(0, 2, 3, 1)
    return qk8, vt, torch.cat([qks, vs[None]])


@triton.jit
def _qk_norm_fp8_kernel(
    QKV,  # (B * N, 3C), row stride stride_qkv, unit column stride
    WQ, WK,  # (C,)
    QK,  # (2, B * N, C) e4m3
    VT,  # (B, H, D, NP) e4m3
    S,  # (3, B * N, H) fp32
    stride_qkv, rows, N, NP, C, H, eps, v_programs,
    BLOCK_N: tl.constexpr,  # power of two >= C
    D: tl.constexpr,  # head dim, a power of two dividing C
    V_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    ty = QKV.dtype.element_ty
    if pid < v_programs:  # V_ROWS tokens of v, head by head
        blocks = tl.cdiv(N, V_ROWS)
        b = pid // blocks
        tok = (pid % blocks) * V_ROWS + tl.arange(0, V_ROWS)
        d = tl.arange(0, D)
        tok_rows = (b * N + tok).to(tl.int64)
        v_src = QKV + tok_rows[:, None] * stride_qkv + 2 * C + d[None, :]
        for h in range(0, H):
            v = tl.load(v_src + h * D, mask=tok[:, None] < N, other=0.0).to(tl.float32)
            v8, vs = fp8_quantize_groups(v)
            dst = VT + (b * H + h).to(tl.int64) * D * NP + d[None, :] * NP + tok[:, None]
            tl.store(dst, v8, mask=tok[:, None] < NP)  # zeros in the padding past N
            tl.store(S + 2 * rows * H + tok_rows * H + h, vs, mask=tok < N)
    else:  # one token's q and k: qk_norm's math, then quantized per head
        row = (pid - v_programs).to(tl.int64)
        q, k, cols, mask = _normed_row(QKV, WQ, WK, row, stride_qkv, C, eps, ty, BLOCK_N)
        q = cast(q, ty).to(tl.float32)  # the bf16 q attention would take
        k = cast(k, ty).to(tl.float32)
        q8, qs = fp8_quantize_groups(tl.reshape(q, (BLOCK_N // D, D)))
        k8, ks = fp8_quantize_groups(tl.reshape(k, (BLOCK_N // D, D)))
        heads = tl.arange(0, BLOCK_N // D)
        tl.store(QK + row * C + cols, tl.reshape(q8, (BLOCK_N,)), mask=mask)
        tl.store(QK + (rows + row) * C + cols, tl.reshape(k8, (BLOCK_N,)), mask=mask)
        tl.store(S + row * H + heads, qs, mask=heads < H)
        tl.store(S + (rows + row) * H + heads, ks, mask=heads < H)


def fp8_layouts(b: int, n: int, c: int, heads: int):
    """(shape, dtype) of qk, vt and the scales for B sequences of N tokens, width C."""
    return [((2, b, n, c), FP8), ((b, heads, c // heads, padded_tokens(n)), FP8), ((3, b, n, heads), torch.float32)]


def fp8_outputs(qkv: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (qk, vt, scales) for qkv (B, N, 3C) as qk_norm_fp8 writes them."""
    b, n, c3 = qkv.shape
    return tuple(torch.empty(shape, dtype=dt, device=qkv.device) for shape, dt in fp8_layouts(b, n, c3 // 3, heads))


def head_dim_problem(c: int, heads: int) -> str:
    """Why heads of C / heads columns cannot be quantized and attended to in FP8 ('' when they can)."""
    if heads < 1 or c % heads:
        return f"{heads} heads do not divide the width {c}"
    d = c // heads
    # (Hopper's e4m3 wgmma needs K >= 32: 16 does not build for sm_90; 256 spills in the main loop)
    if d & (d - 1) or not 32 <= d <= 128:
        return f"head dim {d} is not 32, 64 or 128"
    return ""


def qk_norm_fp8_launch(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, heads: int,
                       qk: torch.Tensor, vt: torch.Tensor, s: torch.Tensor, config: Optional[dict] = None) -> None:
    """Check the inputs, then write qk_norm_fp8_ref's three outputs into qk, vt and s."""
    check_tensors(FP8_OP, ("qkv", qkv), ("q_weight", q_weight), ("k_weight", k_weight), ("qk", qk), ("vt", vt),
                  ("s", s), dtypes=FLOAT_DTYPES + (FP8,))
    if qkv.dtype not in FLOAT_DTYPES or qkv.ndim != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"{FP8_OP}: qkv must be (B, N, 3C) in {FLOAT_DTYPES}, got {tuple(qkv.shape)} {qkv.dtype}")
    b, n, c3 = qkv.shape
    c = c3 // 3
    problem = head_dim_problem(c, heads)
    if problem:
        raise ValueError(f"{FP8_OP}: {problem}")
    check_row_width(FP8_OP, "q/k", c)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if tuple(w.shape) != (c,) or w.dtype != qkv.dtype:
            raise ValueError(f"{FP8_OP}: {name} must be ({c},) {qkv.dtype}, got {tuple(w.shape)} {w.dtype}")
    for name, t, (shape, dtype) in zip(("qk", "vt", "s"), (qk, vt, s), fp8_layouts(b, n, c, heads)):
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{FP8_OP}: {name} must be contiguous {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
    rows = as_rows(FP8_OP, "qkv", qkv, c3)
    if not rows.shape[0]:
        return
    tensors = dict(QKV=rows, WQ=q_weight.contiguous(), WK=k_weight.contiguous(), QK=qk, VT=vt, S=s)
    plan = plan_qk_norm_fp8({k: Meta.of(v) for k, v in tensors.items()}, b, heads, eps, Target.of(qkv.device), config)
    with on_device(qkv):
        plan.run(**tensors)


def plan_qk_norm_fp8(metas: Dict[str, Meta], batch: int, heads: int, eps: float, target: Target,
                     config: Optional[dict] = None) -> LaunchPlan:
    """``batch`` x cdiv(N, V_ROWS) programs for v, then one per token row of ``metas['QKV']``."""
    rows, c3 = metas["QKV"].shape
    c, n = c3 // 3, rows // batch
    key = table_key(FP8_OP, M=rows, N=c, dtype=metas["QKV"].dtype)
    entry = lookup(target, key)
    launch = row_launch(c, config or (entry or {}).get("config"))
    v_programs = batch * triton.cdiv(n, V_ROWS)
    args = dict(metas, stride_qkv=metas["QKV"].stride[0], rows=rows, N=n, NP=metas["VT"].shape[-1], C=c, H=heads,
                eps=float(eps), v_programs=v_programs)
    return LaunchPlan(_qk_norm_fp8_kernel, (v_programs + rows,), args,
                      dict(BLOCK_N=launch["BLOCK_N"], D=c // heads, V_ROWS=V_ROWS),
                      dict(num_warps=launch["num_warps"], num_stages=1, enable_fp_fusion=FP_FUSION),
                      dict(QUANT_OUT=True), key, entry is not None, f"{FP8_OP} {(batch, n, c)} heads {heads}")


@torch.library.custom_op("internvit_fast::qk_norm_fp8", mutates_args=())
def qk_norm_fp8(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3C) -> (qk (2, B, N, C), vt (B, H, D, N padded), scales (3, B, N, H)): FP8
    attention's inputs, in one pass over qkv (inference only: no backward)."""
    out = fp8_outputs(qkv, heads)
    qk_norm_fp8_launch(qkv, q_weight, k_weight, eps, heads, *out)
    return out


@qk_norm_fp8.register_fake
def _(qkv, q_weight, k_weight, eps, heads):
    return fp8_outputs(qkv, heads)


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


def _fp8_shape(shape: Shape) -> Tuple[int, int, int, int]:
    """(batch, tokens, heads, width) the FP8 form runs at for a registry shape."""
    batch, tokens = shape.sequences()
    heads, d = shape.heads()
    return batch, tokens, heads, heads * d


def _fp8_metas(b: int, n: int, h: int, c: int, dtype: torch.dtype) -> Dict[str, Meta]:
    w = Meta.contiguous((c,), dtype)
    outs = {k: Meta.contiguous(sh, dt) for k, (sh, dt) in zip(("QK", "VT", "S"), fp8_layouts(b, n, c, h))}
    return dict(QKV=Meta.contiguous((b * n, 3 * c), dtype), WQ=w, WK=w, **outs)


def fp8_inputs(shape: Shape, device) -> dict:
    """qkv (B, N, 3C) and the norms' weights at a registry shape, with heads of very different
    magnitudes (each gets its own scales) and outlier channels in the norm weights."""
    b, n, h, c = _fp8_shape(shape)
    r = registry.rand
    qkv = r((b, n, 3 * c), torch.float32, device, 2.0)
    qkv = qkv * torch.logspace(-2, 1, 3 * h, device=device).repeat_interleave(c // h)  # (finite in fp16)
    w = [r((c,), torch.float32, device, 0.5, 1.0) for _ in range(2)]
    for x in w:
        x[:: max(1, c // 3)] *= 30
    return dict(qkv=qkv.to(shape.dtype), q_weight=w[0].to(shape.dtype), k_weight=w[1].to(shape.dtype), eps=1e-6,
                heads=h)


def _fp8_new(i: dict) -> dict:
    qk, vt, s = fp8_outputs(i["qkv"], i["heads"])
    return dict(qk=torch.full_like(qk, float("nan")), vt=torch.full_like(vt, float("nan")),
                s=torch.full_like(s, float("nan")))


def _fp8_judge(got: dict, i: dict) -> None:
    """Equality: the e4m3 values and scales are the reference's bit for bit (qk_norm's
    rounding, then exact power-of-two quantization), v's padding zeros included."""
    want = dict(zip(("qk", "vt", "s"), qk_norm_fp8_ref(i["qkv"], i["q_weight"], i["k_weight"], i["eps"], i["heads"])))
    for name in ("qk", "vt"):
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), \
            f"{FP8_OP}: {name}'s e4m3 values differ from the reference"
    assert torch.equal(got["s"], want["s"]), f"{FP8_OP}: scales differ from the reference"


def _fp8_plans(target: Target):
    if not (target.arch == "interpreter" or target.hopper or target.arch == "sm89"):
        return []  # FP8 attention is for cards with FP8 tensor cores
    return [plan_qk_norm_fp8(_fp8_metas(*_fp8_shape(s), s.dtype), s.sequences()[0], s.heads()[0], 1e-6, target)
            for s in registry.segmentation_shapes()]


FP8_SPEC = KernelSpec(
    name=FP8_OP,
    math="qk_norm's q, k, then q, k, v quantized per token and head (e4m3, power-of-two scales); v transposed",
    promises_rounding=True,
    make_inputs=fp8_inputs,
    new_outputs=_fp8_new,
    launch=lambda i, o, cfg: qk_norm_fp8_launch(i["qkv"], i["q_weight"], i["k_weight"], i["eps"], i["heads"], o["qk"],
                                                o["vt"], o["s"], cfg),
    reference=lambda i: dict(zip(("qk", "vt", "s"), qk_norm_fp8_ref(i["qkv"], i["q_weight"], i["k_weight"], i["eps"],
                                                                    i["heads"]))),
    plans=_fp8_plans,
    plan_for=lambda i, target: plan_qk_norm_fp8(
        _fp8_metas(*i["qkv"].shape[:2], i["heads"], i["qkv"].shape[2] // 3, i["qkv"].dtype), i["qkv"].shape[0],
        i["heads"], i["eps"], target),
    candidates=norm_candidates,
    judge=_fp8_judge,
)
