"""FP8 attention (precision="fp8"): softmax(q k^T * scale) v on e4m3 q, k and v, for Hopper.

Inputs as qk_norm_fp8 (qk_norm.py) writes them from the qkv projection in one pass:
q and k (2, B, N, C) and v transposed per head (B, H, D, N padded to 16), all e4m3, with
one power-of-two scale per token and head, (3, B, N, H) fp32. Output (B, N, C) in the
activation dtype, in the layout proj takes, or (``quantized``) proj's FP8 input itself:
e4m3 with one scale per token and head, which for heads of 128 is the FP8 GEMMs' 1 x 128
group, so the attention output is never written in bf16 and never re-read to quantize.

The kernel is FlashAttention-2's forward (Triton's fused-attention tutorial's shape): a
program holds BLOCK_M queries of one head and streams the keys and values in tiles of
BLOCK_N with an online softmax in the exp2 domain. Per tile:

    S  = (q8 @ k8^T) * sk[n] * sq'[m]       e4m3 wgmma, fp32 accumulate; sq' = sq * scale * log2(e)
    P  = exp2(S - m_run)                      m_run: the running row maximum
    c  = max(c, the tile's largest v scale)   the largest so far (powers of two: exact ratios)
    P8 = e4m3(P * sv[n] * 256 / c)
    acc = acc * (alpha * c_old / c) + P8 @ v8^T   acc is kept in units of c / 256

v's per-token scales are folded into P before it is quantized (they multiply P's columns),
so P @ v runs on e4m3 operands with one scalar per tile; the 256 puts P's values near the
top of e4m3's range (P <= 1 would leave its smallest values subnormal). c only grows, so
the rescale never overflows (a tile of all-zero v has the smallest scale, 2^-126). The row
sum uses the unquantized P. The softmax scale is folded into q's scales once per program.

Numerics: against the statement (attention on the dequantized inputs, in float64) the only
errors are P's rounding to e4m3 (at most 2^-4 of P, or an absolute 2^-18 where P is tiny:
``error_bound`` states it, the tests assert it elementwise), fp32 sums and the output's
rounding; q, k and v's own quantization is qk_norm_fp8's, measured on the model (docs/fp8.md).

On sm_90 the tuned table decides per shape between this and bf16 attention (cuDNN first,
as the bf16 path runs it): ``takes`` says whether the FP8 kernel runs.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import launch, registry
from .common import (FLOAT_DTYPES, FP8, FP8_GROUP, cast, check_tensors, fp8_quantize_groups, fp8_round,
                     kernels_can_run_on, on_device)
from .fp8 import dequantize
from .gemm import ACT_CODES
from .launch import LaunchPlan, Meta, Target, lookup, table_key
from .qk_norm import (FP8_SPEC as QK_FP8_SPEC, fp8_inputs, fp8_layouts, head_dim_problem, qk_norm, qk_norm_fp8,
                      qk_norm_fp8_ref)
from .registry import Choice, KernelSpec, Shape

OP = "attention_fp8"
LOG2E = 1.4426950408889634
DEFAULT = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
INTERPRETER = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}  # fewer, larger numpy steps
SMOKE = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}  # the tuner's smoke run: ragged tiles
# SDPA's backend order on sm_90 for bf16 attention: cuDNN first (internvit_fast/attention.py
# says why); the alternative this kernel is timed against runs in the same order.
SM90_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


# --- the torch reference --------------------------------------------------------------------

def split(qk: torch.Tensor, vt: torch.Tensor, s: torch.Tensor, dtype=torch.float64):
    """The dequantized q, k, v (B, H, N, D) in ``dtype`` (exact in fp32 and float64)."""
    _, b, n, c = qk.shape
    h, d = vt.shape[1], vt.shape[2]
    q, k = (dequantize(qk[i], s[i], dtype, d).view(b, n, h, d).transpose(1, 2) for i in (0, 1))
    v = vt[..., :n].to(dtype).transpose(2, 3) * s[2].to(dtype).transpose(1, 2)[..., None]
    return q, k, v


def attention_fp8_ref(qk: torch.Tensor, vt: torch.Tensor, s: torch.Tensor, scale: float,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The statement: attention on the dequantized inputs, softmax in ``dtype`` (float64: no
    rounding but the inputs'); (B, N, C) in ``dtype``."""
    q, k, v = split(qk, vt, s, dtype)
    o = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    return o.transpose(1, 2).reshape(qk.shape[1], qk.shape[2], -1)


def _weights(qk, vt, s, scale):
    """In float64: v (B, H, N, D), P = exp(S - max_n S) (B, H, N, N), its row sums l and v's
    scales (B, H, N): what error_bound and rounded_once start from."""
    q, k, v = split(qk, vt, s)
    logits = (q @ k.transpose(-1, -2)) * scale
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    return v, p, p.sum(-1, keepdim=True), s[2].double().transpose(1, 2)


def error_bound(qk: torch.Tensor, vt: torch.Tensor, s: torch.Tensor, scale: float, out_dtype: torch.dtype
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(exact, bound) (B, N, C) in float64: the statement and the kernel's largest error from it.

    With P = exp(S - max_n S) (<= 1) and l = sum_n P: the kernel quantizes P relative to the
    running row maximum (P_run >= P) as e4m3(P_run * sv * 256 / c), c <= T = the sequence's
    largest v scale. Where that is a normal e4m3 value (>= 2^-6) it is off by at most 2^-4 of
    itself; below, by at most half the subnormal spacing, 2^-10, i.e. 2^-18 T / sv in P
    (fp32's underflow of exp2 is inside that too). A key can be below only where
    P < 2^-14 T / sv. So

        |o - exact| <= (2^-4 sum_n P |v| + 2^-18 T sum_{n: P < 2^-14 T / sv} |v / sv|) / l
                       + the output's rounding.
    """
    v, p, l, sv = _weights(qk, vt, s, scale)
    _, b, n, c = qk.shape
    big = sv.amax(dim=-1, keepdim=True)[..., None]  # T per (b, h)
    small = p < 2.0 ** -14 * big / sv[:, :, None, :]
    exact = (p @ v) / l
    bound = (2.0 ** -4 * (p @ v.abs()) + 2.0 ** -18 * big * (small.double() @ (v / sv[..., None]).abs())) / l
    ulp = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[out_dtype]
    bound = bound + ulp * exact.abs() * 2  # (the rounding of a value up to 2^-4 off: 2 half-ulps of slack)
    flat = lambda t: t.transpose(1, 2).reshape(b, n, c)  # noqa: E731
    return flat(exact), flat(bound)


def rounded_once(qk: torch.Tensor, vt: torch.Tensor, s: torch.Tensor, scale: float, out_dtype: torch.dtype
                 ) -> torch.Tensor:
    """(B, N, C) float64: attention with P rounded once, to nearest, in e4m3 as the kernel scales
    it (P <= 1 times sv * 256 / T, T the sequence's largest v scale), then the output rounded to
    ``out_dtype``. The error a kernel that rounds P once should have: judge holds the kernel's
    RMS error to this one's (measured 0.7-1.0x; P rounded toward zero: 1.6-2.2x)."""
    v, p, l, sv = _weights(qk, vt, s, scale)
    _, b, n, c = qk.shape
    sv = sv[:, :, None, :]  # (B, H, 1, N)
    t = sv.amax(-1, keepdim=True)
    p8 = (p * sv * (256 / t)).float().to(FP8).double() * (t / 256) / sv  # (sv: powers of two, exact)
    o = (p8 @ v) / l
    return o.to(out_dtype).double().transpose(1, 2).reshape(b, n, c)


# --- the kernel -----------------------------------------------------------------------------

@triton.jit
def _attention_fp8_kernel(
    QK,  # (2, B * N, C) e4m3: q then k
    VT,  # (B, H, D, NP) e4m3
    S,  # (3, B * N, H) fp32: q, k, v scales per token and head
    O,  # (B * N, C): the activation dtype, or e4m3 (QUANT_OUT)
    OS,  # (B * N, H) fp32: the output's scales (QUANT_OUT; else O, unused)
    rows, N, NP, C, H, qk_scale,  # qk_scale: the softmax scale times log2(e)
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT_OUT: tl.constexpr,
    ACT: tl.constexpr,  # QUANT_OUT: the activation dtype rounded to first, by its code (gemm.ACT_CODES)
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_m = (b * N + offs_m).to(tl.int64)
    q = tl.load(QK + row_m[:, None] * C + h * D + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    sq = tl.load(S + row_m * H + h, mask=offs_m < N, other=0.0) * qk_scale
    k_base = QK + rows.to(tl.int64) * C + h * D
    vt_base = VT + bh.to(tl.int64) * D * NP
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    c_acc = 0.0  # the largest v scale so far: acc's unit is c_acc / 256 (see the module's docstring)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        live = offs_n < N
        row_n = (b * N + offs_n).to(tl.int64)
        k = tl.load(k_base + row_n[:, None] * C + offs_d[None, :], mask=live[:, None], other=0.0)
        sk = tl.load(S + (rows + row_n) * H + h, mask=live, other=0.0)
        sv = tl.load(S + (2 * rows + row_n) * H + h, mask=live, other=0.0)
        vt = tl.load(vt_base + offs_d[:, None] * NP + offs_n[None, :], mask=live[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sk[None, :] * sq[:, None]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        c_new = tl.maximum(c_acc, tl.max(sv, 0))  # a power of two (every live token's scale is one)
        # 1 / c_new from its exponent: exact, and finite where c_new is 2^-126 (an all-zero v
        # group's scale), where 256 / c_new would overflow
        inv = ((254 - (c_new.to(tl.uint32, bitcast=True) >> 23)).to(tl.int32) << 23).to(tl.float32, bitcast=True)
        p8 = fp8_round(p * ((sv * inv) * 256.0)[None, :])  # sv / c_new <= 1: exact (or 0 past fp32's range)
        acc = acc * (alpha * (c_acc * inv))[:, None]  # (c_acc <= c_new: no overflow)
        acc = tl.dot(p8, tl.trans(vt), acc)
        c_acc = c_new
        m_i = m_new
    o = acc * (c_acc / l_i)[:, None] * 0.00390625
    live_m = offs_m < N
    dst = O + row_m[:, None] * C + h * D + offs_d[None, :]
    if QUANT_OUT:  # rounded to the activation dtype first, as the bf16 path's output is
        if ACT == 1:
            o = cast(o, tl.bfloat16).to(tl.float32)
        elif ACT == 2:
            o = cast(o, tl.float16).to(tl.float32)
        o8, so = fp8_quantize_groups(o)
        tl.store(dst, o8, mask=live_m[:, None])
        tl.store(OS + row_m * H + h, so, mask=live_m)
    else:
        tl.store(dst, cast(o, O.dtype.element_ty), mask=live_m[:, None])


def plan_attention(metas: Dict[str, Meta], batch: int, heads: int, scale: float, act: torch.dtype, target: Target,
                   config: Optional[dict] = None) -> LaunchPlan:
    """A program per BLOCK_M queries of one head of one sequence: (cdiv(N, BLOCK_M), B * H)."""
    _, rows, c = metas["QK"].shape
    n, d = rows // batch, c // heads
    quant = metas["O"].dtype == FP8
    key = table_key(OP, M=batch, N=n, H=heads, D=d, dtype=act)
    entry = lookup(target, key)
    cfg = dict(config or (entry or {}).get("config") or (INTERPRETER if target.arch in ("interpreter", "cpu") else DEFAULT))
    args = dict(metas, rows=rows, N=n, NP=metas["VT"].shape[-1], C=c, H=heads, qk_scale=float(scale) * LOG2E)
    return LaunchPlan(_attention_fp8_kernel, (triton.cdiv(n, cfg["BLOCK_M"]), batch * heads), args,
                      dict(D=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], QUANT_OUT=quant, ACT=ACT_CODES[act]),
                      dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True),
                      dict(SCALED=True, QUANT_OUT=quant), key, entry is not None,
                      f"{OP} {(batch, n, c)} heads {heads}{' e4m3 out' if quant else ''}")


def _check(qk, vt, s, out, out_scale, act) -> Tuple[int, int, int, int]:
    check_tensors(OP, ("qk", qk), ("vt", vt), ("s", s), ("out", out), *((("out_scale", out_scale),) if out_scale
                                                                       is not None else ()),
                  dtypes=FLOAT_DTYPES + (FP8,))
    if act not in FLOAT_DTYPES:
        raise ValueError(f"{OP}: the activation dtype {act} is not one of {FLOAT_DTYPES}")
    if qk.ndim != 4 or qk.shape[0] != 2 or vt.ndim != 4:
        raise ValueError(f"{OP}: qk must be (2, B, N, C) and vt (B, H, D, N'), got {tuple(qk.shape)}, "
                         f"{tuple(vt.shape)}")
    _, b, n, c = qk.shape
    heads = vt.shape[1]
    problem = head_dim_problem(c, heads)
    if problem:
        raise ValueError(f"{OP}: {problem}")
    want = dict(zip(("qk", "vt", "s"), fp8_layouts(b, n, c, heads)))
    want["out"] = ((b, n, c), FP8 if out_scale is not None else act)
    given = dict(qk=qk, vt=vt, s=s, out=out)
    if out_scale is not None:
        if heads * FP8_GROUP != c:
            raise ValueError(f"{OP}: a quantized output needs heads of {FP8_GROUP} (proj's groups), got {c // heads}")
        want["out_scale"], given["out_scale"] = ((b, n, heads), torch.float32), out_scale
    for name, t in given.items():
        shape, dtype = want[name]
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            layout = "" if t.is_contiguous() else f" with strides {t.stride()}"
            raise ValueError(f"{OP}: {name} must be contiguous {shape} {dtype} ({heads} heads, as vt has), got "
                             f"{tuple(t.shape)} {t.dtype}{layout}")
    return b, n, c, heads


def attention_fp8_launch(qk: torch.Tensor, vt: torch.Tensor, s: torch.Tensor, scale: float, out: torch.Tensor,
                         out_scale: Optional[torch.Tensor] = None, act: Optional[torch.dtype] = None,
                         config: Optional[dict] = None) -> None:
    """Check the inputs, then write attention's output into ``out`` (B, N, C): in ``act`` (default
    out's dtype), or with ``out_scale`` (B, N, H) e4m3 values rounded to ``act`` first."""
    act = act or out.dtype
    b, n, c, heads = _check(qk, vt, s, out, out_scale, act)
    if not out.numel():
        return
    tensors = dict(QK=qk.view(2, b * n, c), VT=vt, S=s.view(3, b * n, heads), O=out.view(b * n, c),
                   OS=out_scale.view(b * n, heads) if out_scale is not None else out.view(b * n, c))
    plan = plan_attention({k: Meta.of(v) for k, v in tensors.items()}, b, heads, scale, act, Target.of(qk.device),
                          config)
    with on_device(qk):
        plan.run(**tensors)


def _fallback(qk, vt, s, scale, act, quantized):
    """Where the kernel cannot run (a CPU without the interpreter, a GPU before sm_89): the
    statement in fp32 (no quantization of P)."""
    from .fp8 import quantize_ref
    o = attention_fp8_ref(qk, vt, s, scale, torch.float32).to(act)
    if quantized:  # one scale per token and head, as the kernel writes them (heads of 128: proj's groups)
        return quantize_ref(o, vt.shape[2])
    return o, o.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("internvit_fast::attention_fp8", mutates_args=())
def attention_fp8(qk: torch.Tensor, vt: torch.Tensor, s: torch.Tensor, scale: float, act: torch.dtype,
                  quantized: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, out_scale): attention of qk_norm_fp8's outputs, (B, N, C) in ``act`` (out_scale
    empty), or ``quantized``: e4m3 with (B, N, H) scales, proj's FP8 input."""
    if not kernels_can_run_on(qk.device) or not fp8_tensor_cores(qk.device):
        return _fallback(qk, vt, s, scale, act, quantized)
    out, out_scale = _empty(qk, vt, act, quantized)
    attention_fp8_launch(qk, vt, s, scale, out, out_scale if quantized else None, act)
    return out, out_scale


def _empty(qk, vt, act, quantized):
    _, b, n, c = qk.shape
    if quantized:
        return (torch.empty((b, n, c), dtype=FP8, device=qk.device),
                torch.empty((b, n, vt.shape[1]), dtype=torch.float32, device=qk.device))
    return torch.empty((b, n, c), dtype=act, device=qk.device), qk.new_empty(0, dtype=torch.float32)


@attention_fp8.register_fake
def _(qk, vt, s, scale, act, quantized):
    return _empty(qk, vt, act, quantized)


# --- when the fast path runs it, and its alternative --------------------------------------

def fp8_tensor_cores(device: torch.device) -> bool:
    """A GPU with e4m3 MMA (sm_89 and later); True off CUDA (the interpreter has them all)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def takes(qkv: torch.Tensor, heads: int, table: bool = True) -> bool:
    """Whether FP8 attention runs for this qkv (B, N, 3C) on the fast path: heads it takes, a
    card with FP8 tensor cores (or the interpreter), and (``table``) the tuned table's pick at
    this shape ("fused": the FP8 kernel, also where nothing was measured)."""
    c = qkv.shape[-1] // 3
    if qkv.ndim != 3 or head_dim_problem(c, heads):
        return False
    if not fp8_tensor_cores(qkv.device):
        return False
    b, n = qkv.shape[:2]
    return not table or launch.choice(OP, Target.of(qkv.device), M=b, N=n, H=heads, D=c // heads, dtype=qkv.dtype) == "fused"


def attend_fp8(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, heads: int,
               scale: float, quantized: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The FP8 path from the qkv projection: qk_norm_fp8, then the kernel (see attention_fp8)."""
    qk, vt, s = qk_norm_fp8(qkv, q_weight, k_weight, eps, heads)
    return attention_fp8(qk, vt, s, scale, qkv.dtype, quantized)


def bf16_attention(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, heads: int,
                   scale: float) -> torch.Tensor:
    """The alternative: qk_norm in the activation dtype, then SDPA (cuDNN first on sm_90), as the
    bf16 fast path attends; (B, N, C)."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    q, k = qk_norm(qkv, q_weight, k_weight, eps).unbind(0)
    q, k, v = (t.view(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, qkv[..., 2 * c:]))
    if qkv.is_cuda and torch.cuda.get_device_capability(qkv.device)[0] == 9:
        with sdpa_kernel(SM90_PRIORITY, set_priority=True):
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return o.transpose(1, 2).reshape(b, n, c)


# --- what the tools need to know (registry) ----------------------------------------------

def _inputs(shape: Shape, device) -> dict:
    """qk_norm_fp8's inputs and, quantized by its reference, the kernel's; norm weights near 1,
    without qk_norm_fp8's outlier channels (which make nearly every row one-hot): logits of
    unit spread, diffuse attention, where the rounding of P's many small values shows."""
    i = fp8_inputs(shape, device)
    c = i["q_weight"].shape[0]
    for name in ("q_weight", "k_weight"):
        i[name] = registry.rand((c,), i["qkv"].dtype, device, 0.3, 1.0)
    qk, vt, s = qk_norm_fp8_ref(i["qkv"], i["q_weight"], i["k_weight"], i["eps"], i["heads"])
    d = i["qkv"].shape[-1] // 3 // i["heads"]
    return dict(i, qk=qk, vt=vt, s=s, scale=d ** -0.5)


def _new(i: dict) -> dict:
    b, n, c = i["qk"].shape[1:]
    return {"o": torch.full((b, n, c), float("nan"), dtype=i["qkv"].dtype, device=i["qk"].device)}


def judge(got: dict, i: dict) -> None:
    """Against the float64 statement on the same e4m3 inputs: error_bound elementwise; the
    RMS error at most 1.3x rounded_once's (P rounded once, to nearest: the kernel measured
    0.7-1.0x, a P rounded toward zero 1.6-2.2x); and no bias: the least-squares gain of the
    output on the statement within 1e-3 + 4 noise of 1, noise the gain's standard error over
    rows and heads (the kernel measured within 1.5 noise; a row sum or rescale 0.3% off
    fails it at 40 tokens and more)."""
    o = got["o"].double()
    exact, bound = error_bound(i["qk"], i["vt"], i["s"], i["scale"], got["o"].dtype)
    assert torch.isfinite(o).all(), f"{OP}: NaN or inf in the output"
    err = (o - exact).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert worst <= 1.0, f"{OP}: error {worst:.3g} x the bound (attention_fp8.error_bound)"
    once = rounded_once(i["qk"], i["vt"], i["s"], i["scale"], got["o"].dtype)
    rms, rms_once = (e.pow(2).mean().sqrt().item() for e in (err, once - exact))
    # (the floor, far below e4m3's rounding, only for inputs where P rounds exactly: one token)
    floor = 2.0 ** -16 * exact.pow(2).mean().sqrt().item()
    assert rms <= 1.3 * rms_once + floor, (f"{OP}: RMS error {rms:.3g}, {rms / max(rms_once, 1e-300):.3g}x that "
                                           f"of P rounded once to nearest in e4m3 (> 1.3x)")
    # the gain's noise: P's rounding errors are shared along a row of a head, independent across
    g = ((o - exact) * exact).view(*o.shape[:2], i["vt"].shape[1], -1).sum(-1)  # (B, N, H)
    norm = max((exact ** 2).sum().item(), 1e-300)
    bias, noise = g.sum().item() / norm, g.pow(2).sum().sqrt().item() / norm
    assert abs(bias) <= 1e-3 + 4 * noise, (f"{OP}: the output is biased by {bias:.3g} against the statement "
                                           f"(its noise {noise:.2g})")


def judge_bf16(got: dict, i: dict) -> None:
    """The alternative (bf16 attention of the unquantized q, k, v): the parity rule against
    float64 attention of qk_norm's output, with plain torch attention as the yardstick."""
    from . import parity
    from .qk_norm import qk_norm_ref
    qkv, heads = i["qkv"], i["heads"]
    b, n, c3 = qkv.shape
    c = c3 // 3

    def attn(dtype):
        q, k = qk_norm_ref(qkv.to(dtype), i["q_weight"].to(dtype), i["k_weight"].to(dtype), i["eps"]).unbind(0)
        q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, qkv[..., 2 * c:].to(dtype)))
        p = torch.softmax((q @ k.transpose(-1, -2)).float() * i["scale"], -1).to(dtype)
        return (p @ v).transpose(1, 2).reshape(b, n, c)
    verdict = parity.check(got["o"], attn(torch.float64), attn(qkv.dtype), 1e-3)
    assert verdict.ok, f"{OP} bf16 alternative: {verdict}"


def _plans(target: Target):
    if not (target.arch == "interpreter" or target.hopper or target.arch == "sm89"):
        return []
    out = []
    for s in registry.segmentation_shapes():
        (b, n), (h, d) = s.sequences(), s.heads()
        for quant in (True, False):
            out.append(_plan(b, n, h, h * d, s.dtype, quant, target))
    return out


def _plan(b, n, h, c, act, quant, target, config=None) -> LaunchPlan:
    qk, vt, s = (Meta.contiguous(sh, dt) for sh, dt in fp8_layouts(b, n, c, h))
    m = Meta.contiguous
    o = m((b * n, c), FP8 if quant else act)
    return plan_attention(dict(QK=m((2, b * n, c), FP8), VT=vt, S=m((3, b * n, h), torch.float32), O=o,
                               OS=m((b * n, h), torch.float32) if quant else o), b, h, (c // h) ** -0.5, act, target,
                          config)


def _candidates(arch: str):
    if arch == "smoke":
        return [dict(SMOKE), dict(SMOKE, BLOCK_M=16, BLOCK_N=32)]
    # those whose sm_90 builds (triton 3.6) spill nothing, bf16 and e4m3 output alike; 128 x 128
    # tiles (the tutorial's) spill 80-216 bytes here, 128 rows on 4 warps 16 with e4m3 output
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st) for bm, bn, w, st in
            ((128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 2), (64, 32, 4, 4),
             (64, 128, 4, 2))]


def _choice() -> Choice:
    args = ("qkv", "q_weight", "k_weight", "eps", "heads", "scale")

    def fused(i, cfg=None):
        qk, vt, s = qk_norm_fp8(*(i[k] for k in args[:5]))
        o = torch.empty(i["qkv"].shape[:2] + (qk.shape[-1],), dtype=i["qkv"].dtype, device=qk.device)
        attention_fp8_launch(qk, vt, s, i["scale"], o, config=cfg)
        return {"o": o}
    return Choice(fused=fused, unfused=lambda i: {"o": bf16_attention(*(i[k] for k in args))},
                  describe_unfused="qk_norm + bf16 SDPA (cuDNN first on sm_90)", unfused_judge=judge_bf16)


SPEC = KernelSpec(
    name=OP,
    math="o = softmax((q8 sq)(k8 sk)^T * scale) (v8 sv), P in e4m3 per tile (precision='fp8')",
    promises_rounding=False,
    make_inputs=_inputs,
    new_outputs=_new,
    launch=lambda i, o, cfg: attention_fp8_launch(i["qk"], i["vt"], i["s"], i["scale"], o["o"], config=cfg),
    reference=lambda i: {"o": attention_fp8_ref(i["qk"], i["vt"], i["s"], i["scale"]).to(i["qkv"].dtype)},
    plans=_plans,
    plan_for=lambda i, target: _plan(*i["qkv"].shape[:2], i["heads"], i["qk"].shape[-1], i["qkv"].dtype, False,
                                     target),
    candidates=_candidates,
    choice=_choice(),
    judge=judge,
)

SPECS = [QK_FP8_SPEC, SPEC]
