"""FP8 (e4m3) inference: quantization with fine-grained power-of-two scales, and the block's
GEMMs on FP8 operands.

    q, s = quantize(x)     x (M, K): s[m, g] = scale of row m's g-th 128 columns, q = e4m3(x / s)
    w_q, w_s = quantize_weight(w)   w (N, K): one scale per 128 x 128 block
    y = (q s) @ (w_q w_s)^T + b     the GEMM's main loop applies the scales per 128 of K

Scales as DeepSeek-V3 quantizes for FP8 (1 x 128 activation groups along K, 128 x 128 weight
blocks), so an outlier channel costs precision only in its own group. Each scale is the
smallest power of two that brings the group's largest magnitude to at most e4m3's 448
(common.fp8_scale): multiplying by it and by its inverse is exact, so quantization is
reproducible bit for bit (the tests assert equality with the torch reference below) and the
only rounding is e4m3's. The residual stream and everything outside the GEMMs' inputs stay
in the activation dtype with upstream's rounding points.

The ops (inference only; the fast path calls them for an ``Fp8Linear``, internvit_fast/fp8.py):

  - ``rms_norm_fp8``: the rms_norm kernel writing e4m3 and scales instead of bf16 (norm1,
    norm2: the inputs of qkv and fc1), quantized in registers;
  - ``quantize_fp8``: the row kernel for the attention output (proj's input);
  - ``fp8_linear``: the GEMM (qkv), output in the activation dtype;
  - ``fp8_linear_gelu``: the GEMM with GELU whose epilogue writes e4m3 and its scales (fc1):
    the hidden activation never exists in bf16;
  - ``fp8_linear_residual_norm``: the GEMM with the residual epilogue, then ``rms_norm_fp8``
    of the new stream (proj, and fc2 with the next block's norm1).

Each GEMM op has an unfused alternative that the tuned table may pick per shape, as for
bf16: cuBLASLt's block-scaled GEMM (``scaled_mm``), then row kernels (fc1: GELU and the
quantizer; proj/fc2: ``residual_rms_norm_fp8``, the residual kernel writing e4m3).

``*_ref`` are the plain-torch statements: quantization by the same formula (torch's own
fp32 -> e4m3 conversion, which rounds to nearest even), and the GEMM on the dequantized
operands in fp32 or float64.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import launch, registry
from .common import (FLOAT_DTYPES, FP8, FP8_GROUP, as_rows, check_row_width, check_tensors, fp8_quantize_groups, groups, on_device,
                      rows_of)
from .gemm import linear_launch
from .launch import LaunchPlan, Meta, Target, lookup, table_key
from .registry import Choice, KernelSpec, Shape
from . import rms_norm as _rms

OP = "quantize_fp8"
DEFAULT = {"BLOCK_M": 32, "num_warps": 4}  # 32 rows x one 128-column group per program


# --- the torch reference --------------------------------------------------------------------

def scale_ref(amax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale) for fp32 group maxima, by the kernels' formula (common.fp8_scale)."""
    bits = amax.float().contiguous().view(torch.int32) & 0x7FFFFFFF
    e = (bits >> 23) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    e = e.clamp(-126, 127)
    return ((e + 127) << 23).view(torch.float32), ((127 - e) << 23).view(torch.float32)


def _padded(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x (R, C) zero-padded to (rows, cols)."""
    return F.pad(x, (0, cols - x.shape[-1], 0, rows - x.shape[-2]))


def quantize_ref(x: torch.Tensor, group: int = FP8_GROUP) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) in any float dtype -> (e4m3 (..., K), fp32 scales (..., K/group rounded up)):
    one scale per ``group`` values along a row (128: the GEMMs' inputs; a head's width:
    attention's q, k and v)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    g = -(-k // group)
    xg = _padded(x2, x2.shape[0], g * group).view(-1, g, group)
    s, inv = scale_ref(xg.abs().amax(-1))
    q = (xg * inv[..., None]).to(FP8).view(-1, g * group)[:, :k]
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], g)


def quantize_weight(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """An (N, K) weight -> (e4m3 (N, K), fp32 scales (N/128, K/128)), one per 128 x 128 block
    (done once, when a model is converted or a checkpoint loads into one)."""
    n, k = w.shape
    gn, gk = groups(n), groups(k)
    wb = _padded(w.float(), gn * FP8_GROUP, gk * FP8_GROUP).view(gn, FP8_GROUP, gk, FP8_GROUP)
    s, inv = scale_ref(wb.abs().amax(dim=(1, 3)))
    q = (wb * inv[:, None, :, None]).to(FP8).view(gn * FP8_GROUP, gk * FP8_GROUP)[:n, :k]
    return q.contiguous(), s.contiguous()


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype=torch.float32, group: int = FP8_GROUP) -> torch.Tensor:
    """Activations (..., K) with (..., K/group) scales back to ``dtype`` (exact in fp32)."""
    k = q.shape[-1]
    return (q.to(dtype) * s.to(dtype).repeat_interleave(group, -1)[..., :k])


def dequantize_weight(q: torch.Tensor, s: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    n, k = q.shape
    full = s.to(dtype).repeat_interleave(FP8_GROUP, 0)[:n].repeat_interleave(FP8_GROUP, 1)[:, :k]
    return q.to(dtype) * full


def linear_ref(q: torch.Tensor, s: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: Optional[torch.Tensor],
               out_dtype: torch.dtype, compute=torch.float32) -> torch.Tensor:
    """The FP8 GEMM on quantized operands: exact products summed in ``compute``, bias added
    there, rounded once to ``out_dtype`` (nn.Linear's rounding point)."""
    h = dequantize(q, s, compute) @ dequantize_weight(wq, ws, compute).T
    if bias is not None:
        h = h + bias.to(compute)
    return h.to(out_dtype)


# --- the quantizing row kernel -------------------------------------------------------------------

@triton.jit
def _quantize_kernel(
    X,  # (M, K), unit column stride, row stride stride_xm
    Q,  # (M, K) e4m3, contiguous
    S,  # (M, cdiv(K, 128)) fp32, contiguous
    M, K, stride_xm,
    BLOCK_M: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1)
    rk = g * 128 + tl.arange(0, 128)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = fp8_quantize_groups(x)
    tl.store(Q + rm[:, None].to(tl.int64) * K + rk[None, :], q, mask=mask)
    tl.store(S + rm.to(tl.int64) * tl.cdiv(K, 128) + g, s, mask=rm < M)


def plan_quantize(x: Meta, target: Target, config: Optional[dict] = None) -> LaunchPlan:
    m, k = x.shape
    key = table_key(OP, M=m, K=k, dtype=x.dtype)
    entry = lookup(target, key)
    cfg = dict(config or (entry or {}).get("config") or DEFAULT)
    q, s = Meta.contiguous((m, k), FP8), Meta.contiguous((m, groups(k)), torch.float32)
    return LaunchPlan(_quantize_kernel, (triton.cdiv(m, cfg["BLOCK_M"]), groups(k)),
                      dict(X=x, Q=q, S=s, M=m, K=k, stride_xm=x.stride[0]), dict(BLOCK_M=cfg["BLOCK_M"]),
                      dict(num_warps=cfg["num_warps"], num_stages=1, enable_fp_fusion=True), {}, key,
                      entry is not None, f"{OP} {(m, k)}")


def quantize_launch(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, config: Optional[dict] = None) -> None:
    """Check the inputs, then write x's (M, K) e4m3 values into ``q`` and its scales into ``s``."""
    check_tensors(OP, ("x", x), ("q", q), ("s", s), dtypes=FLOAT_DTYPES + (FP8,))  # once: types, one device
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{OP}: x has dtype {x.dtype}; expected one of {FLOAT_DTYPES}")
    if x.ndim != 2 or x.stride(1) != 1 and x.numel() > 1:
        raise ValueError(f"{OP}: x must be 2-D with unit column stride, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    m, k = x.shape
    for name, t, dtype, shape in (("q", q, FP8, (m, k)), ("s", s, torch.float32, (m, groups(k)))):
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{OP}: {name} must be a contiguous {shape} {dtype} tensor, got {tuple(t.shape)} "
                             f"{t.dtype} strides {t.stride()}")
    if x.numel():
        plan = plan_quantize(Meta.of(x), Target.of(x.device), config)
        with on_device(x):
            plan.run(X=x, Q=q, S=s)


def empty_quantized(x: torch.Tensor, empty: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Buffers for x (..., K) quantized: e4m3 values of x's shape and fp32 scales (..., K/128);
    ``empty``: zero-size ones (an op's output that has nothing to hold)."""
    if empty:
        return x.new_empty(0, dtype=FP8), x.new_empty(0, dtype=torch.float32)
    return (torch.empty(x.shape, dtype=FP8, device=x.device),
            torch.empty((*x.shape[:-1], groups(x.shape[-1])), dtype=torch.float32, device=x.device))


@torch.library.custom_op("internvit_fast::quantize_fp8", mutates_args=())
def quantize_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (e4m3 (..., K), fp32 scales (..., K/128)) through the kernel."""
    x2 = rows_of(x)
    q, s = empty_quantized(x2)
    quantize_launch(x2, q, s)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


@quantize_fp8.register_fake
def _(x):
    return empty_quantized(x)


# --- the norm that writes e4m3, and the GEMM ops -----------------------------------------------

class Fp8Activation(NamedTuple):
    """An activation quantized for the next FP8 GEMM: e4m3 values (..., K), fp32 scales
    (..., K/128), and the dtype it was rounded to first (the GEMM's output dtype)."""
    q: torch.Tensor
    s: torch.Tensor
    dtype: torch.dtype


NORM_OP = "rms_norm_fp8"
RES_NORM_OP = _rms.RES_FP8_OP


def rms_norm_fp8_launch(x: torch.Tensor, weight: torch.Tensor, eps: float, q: torch.Tensor, s: torch.Tensor,
                        config: Optional[dict] = None, y: Optional[torch.Tensor] = None,
                        gamma: Optional[torch.Tensor] = None, x_out: Optional[torch.Tensor] = None) -> None:
    """Check the inputs, then write RMSNorm(x) * weight, rounded to x's dtype, as e4m3 into
    ``q`` (x's shape) with its 1 x 128 scales into ``s`` (..., N/128): the rms_norm kernel
    quantizing in registers what it would have stored. With ``y`` (and ``x_out``): first
    x_out = x + gamma * y at upstream's rounding points, then the norm of x_out (the
    residual kernel: the unfused alternative of the FP8 residual GEMMs)."""
    op = NORM_OP if y is None else RES_NORM_OP
    if (y is None) != (x_out is None) or (gamma is not None and y is None):
        raise ValueError(f"{op}: y and x_out go together (gamma with them)")
    check_tensors(op, ("x", x), ("weight", weight))
    if x.ndim == 0:
        raise ValueError(f"{op}: x is 0-d (a scalar); expected rows")
    n = x.shape[-1]
    for name, t, dtype, shape in (("q", q, FP8, tuple(x.shape)), ("s", s, torch.float32, (*x.shape[:-1], groups(n)))):
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{op}: {name} must be a contiguous {shape} {dtype} tensor on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    if y is not None:  # the residual kernel's own checks for x, y, gamma, weight and x_out
        _rms.residual_rms_norm_launch(x, y, gamma, weight, eps, x_out, q, config, h_scale=s)
        return
    if tuple(weight.shape) != (n,) or weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight must be ({n},) in x's dtype {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    check_row_width(op, "x", n)
    _rms.launch_rows(op, as_rows(op, "x", x, n), None, None, weight.contiguous(), None, q.view(-1, n), eps, config,
                 hs=s.view(-1, groups(n)))


@torch.library.custom_op("internvit_fast::rms_norm_fp8", mutates_args=())
def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x) * weight as e4m3 with 1 x 128 scales, in one pass over x."""
    q, s = empty_quantized(x)
    rms_norm_fp8_launch(x, weight, eps, q, s)
    return q, s


@rms_norm_fp8.register_fake
def _(x, weight, eps=1e-6):
    return empty_quantized(x)


@torch.library.custom_op("internvit_fast::fp8_linear", mutates_args=())
def fp8_linear(q: torch.Tensor, s: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: Optional[torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
    """(q s) @ (wq ws)^T + b in ``dtype`` for quantized activations q (..., K) (qkv)."""
    q2 = rows_of(q)
    if _picks_unfused("fp8_linear", q2, wq, dtype):
        return scaled_mm(q2, rows_of(s), wq, ws, bias, dtype).view(*q.shape[:-1], wq.shape[0])
    out = torch.empty((q2.shape[0], wq.shape[0]), dtype=dtype, device=q.device)
    linear_launch(q2, wq, bias, out, "none", a_scale=rows_of(s), w_scale=ws)
    return out.view(*q.shape[:-1], wq.shape[0])


@fp8_linear.register_fake
def _(q, s, wq, ws, bias, dtype):
    return torch.empty((*q.shape[:-1], wq.shape[0]), dtype=dtype, device=q.device)


@torch.library.custom_op("internvit_fast::fp8_linear_gelu", mutates_args=())
def fp8_linear_gelu(q: torch.Tensor, s: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                    bias: Optional[torch.Tensor], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """GELU((q s) @ (wq ws)^T + b), rounded to ``dtype``, as e4m3 with its 1 x 128 scales (fc1's
    output quantized in the GEMM's epilogue, ready for fc2)."""
    q2 = rows_of(q)
    m, n = q2.shape[0], wq.shape[0]
    if _picks_unfused("fp8_linear_gelu", q2, wq, dtype):
        out, out_s = gelu_unfused(q2, rows_of(s), wq, ws, bias, dtype)
    else:
        out = torch.empty((m, n), dtype=FP8, device=q.device)
        out_s = torch.empty((m, groups(n)), dtype=torch.float32, device=q.device)
        linear_launch(q2, wq, bias, out, "gelu", a_scale=rows_of(s), w_scale=ws, out_scale=out_s, act_dtype=dtype)
    return out.view(*q.shape[:-1], n), out_s.view(*q.shape[:-1], groups(n))


@fp8_linear_gelu.register_fake
def _(q, s, wq, ws, bias, dtype):
    n = wq.shape[0]
    return (torch.empty((*q.shape[:-1], n), dtype=FP8, device=q.device),
            torch.empty((*q.shape[:-1], groups(n)), dtype=torch.float32, device=q.device))


@torch.library.custom_op("internvit_fast::fp8_linear_residual_norm", mutates_args=())
def fp8_linear_residual_norm(q: torch.Tensor, s: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                             bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor], x: torch.Tensor,
                             norm_weight: Optional[torch.Tensor], eps: float = 1e-6
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_new, hq, hs): x_new = x + gamma * ((q s) @ (wq ws)^T + b) with upstream's rounding
    points; (hq, hs) = RMSNorm(x_new) * norm_weight as e4m3 with scales, for the next GEMM
    (empty without norm_weight)."""
    if _picks_unfused("fp8_linear_residual", rows_of(q), wq, x.dtype):
        return residual_unfused(q, s, wq, ws, bias, gamma, x, norm_weight, eps)
    return residual_fused(q, s, wq, ws, bias, gamma, x, norm_weight, eps)


@fp8_linear_residual_norm.register_fake
def _(q, s, wq, ws, bias, gamma, x, norm_weight, eps=1e-6):
    return (x.new_empty(x.shape), *empty_quantized(x, empty=norm_weight is None))


# --- the unfused alternative: cuBLASLt's block-scaled GEMM, then row kernels -------------------
#
# torch (2.9+) runs DeepSeek's scaling on cuBLASLt (F.scaled_mm with BlockWise1x128 x
# BlockWise128x128; sm_90 only, cuBLASLt >= 12.9). The tuned table picks it per shape where
# the tuner measured it faster (launch.choice), as cuBLAS is picked for bf16.

def cublas_fp8_ok(device: torch.device, n: int, k: int) -> bool:
    """Whether cuBLASLt's block-scaled GEMM can run here: torch's ``scaled_mm`` (2.9+) on an
    sm_90 card (torch refuses the scaling elsewhere), K and N multiples of 16 (cuBLASLt's
    FP8 rule). On a CPU the unfused path's GEMM is torch's plain product (see scaled_mm)."""
    if device.type != "cuda":
        return True
    return (hasattr(F, "scaled_mm") and torch.cuda.get_device_capability(device)[0] == 9
            and n % 16 == 0 and k % 16 == 0)


def _picks_unfused(name: str, q2: torch.Tensor, wq: torch.Tensor, dtype: torch.dtype) -> bool:
    """The tuned table's pick; the fused kernel wherever the alternative cannot run (a table
    made with another torch, or copied to another card, must not break inference)."""
    (m, k), n = q2.shape, wq.shape[0]
    return (launch.choice(name, Target.of(q2.device), M=m, N=n, K=k, dtype=dtype) == "unfused"
            and cublas_fp8_ok(q2.device, n, k))


def cublas_operands(q2: torch.Tensor, s2: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor):
    """F.scaled_mm's four operands for ours, in the layouts torch checks for this scaling
    (aten's ScaledBlas.cpp, _scaled_block1x128_block128x128): A (M, K) row-major; B = W^T
    (K, N) column-major (W as stored); A's scales (M, K/128) with strides (1, M); W's scales
    (round_up(K/128, 4), N/128) with strides (1, round_up(K/128, 4)): our (N/128, K/128) rows
    padded with ones to a multiple of 4 blocks, transposed."""
    kb = s2.shape[1]
    return q2, wq.t(), s2.t().contiguous().t(), F.pad(ws, (0, -kb % 4), value=1.0).t()


def scaled_mm(q2: torch.Tensor, s2: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: Optional[torch.Tensor],
              dtype: torch.dtype) -> torch.Tensor:
    """(q s) @ (wq ws)^T + b in ``dtype`` (M, N): cuBLASLt's block-scaled GEMM on CUDA. On a
    CPU torch has no block-wise scaling: there the same product in plain torch, so the row
    kernels around it are tested in the interpreter (and cublas_operands against torch's rules)."""
    if q2.device.type != "cuda":
        return linear_ref(q2, s2, wq, ws, bias, dtype)
    return cublas_scaled_mm(q2, s2, wq, ws, bias, dtype)


def cublas_scaled_mm(q2, s2, wq, ws, bias, dtype) -> torch.Tensor:
    """The cuBLASLt call. torch takes a bias only with a bf16/fp16 output (one rounding, as the
    fused kernel); with fp32 output it is added after, which rounds once too (the fp32 sum)."""
    a, b, sa, sb = cublas_operands(q2, s2, wq, ws)
    fused_bias = bias is not None and dtype != torch.float32
    out = F.scaled_mm(a, b, sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                      bias=bias if fused_bias else None, output_dtype=dtype)
    if bias is not None and not fused_bias:
        out += bias
    return out


def gelu_unfused(q2, s2, wq, ws, bias, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """fc1 unfused: the GEMM in ``dtype``, GELU in place, then the quantizer: three passes
    over the hidden activation that the fused epilogue does not make."""
    from .gelu import gelu_launch
    h = scaled_mm(q2, s2, wq, ws, bias, dtype)
    gelu_launch(h, h)
    return quantize_fp8(h)


def residual_fused(q, s, wq, ws, bias, gamma, x, norm_weight, eps, config=None):
    """The residual epilogue, then rms_norm_fp8 of the new stream."""
    x2 = rows_of(x)
    x_new = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    linear_launch(rows_of(q), wq, bias, x_new, "residual", gamma=gamma, residual=x2, a_scale=rows_of(s), w_scale=ws,
                  config=config)
    x_new = x_new.view(x.shape)
    if norm_weight is None:
        return (x_new, *empty_quantized(x, empty=True))
    return (x_new, *rms_norm_fp8(x_new, norm_weight, eps))


def residual_unfused(q, s, wq, ws, bias, gamma, x, norm_weight, eps):
    """The GEMM in x's dtype, then one row kernel: residual, LayerScale, the norm, quantized."""
    y = scaled_mm(rows_of(q), rows_of(s), wq, ws, bias, x.dtype).view(x.shape)
    if norm_weight is None:
        x_new, _ = _rms.residual_rms_norm(x, y, gamma, None, eps)
        return (x_new, *empty_quantized(x, empty=True))
    x_new = torch.empty_like(x)
    hq, hs = empty_quantized(x)
    rms_norm_fp8_launch(x, norm_weight, eps, hq, hs, y=y, gamma=gamma, x_out=x_new)
    return x_new, hq, hs


# --- what the tools need to know (registry) ----------------------------------------------

def fp8_targets(target: Target) -> bool:
    """Cards with FP8 tensor cores (sm_89 and later) and the interpreter."""
    if target.arch == "interpreter":
        return True
    return target.arch.startswith("sm") and target.arch[2:].isdigit() and int(target.arch[2:]) >= 89


def _quant_inputs(s: Shape, device) -> dict:
    # Rows of very different magnitudes and a few outlier columns: groups with their own scales.
    x = registry.rand((s.rows, s.width), s.dtype, device, 1.0)
    x = (x.float() * torch.logspace(-3, 2, s.rows, device=device)[:, None])
    x[:, :: max(1, s.width // 5)] *= 16  # (finite in fp16 too)
    x = x.to(s.dtype)
    return {"x": x}


def _quant_judge(got: dict, inputs: dict) -> None:
    """Equality: the kernel's values and scales are the reference's, bit for bit."""
    q, s = quantize_ref(inputs["x"])
    assert torch.equal(got["s"], s), f"{OP}: scales differ from the reference"
    assert torch.equal(got["q"].view(torch.uint8), q.view(torch.uint8)), f"{OP}: e4m3 values differ from the reference"


QUANT_SPEC = KernelSpec(
    name=OP,
    math="s = 2^ceil(log2(max|x_group| / 448)) per 1 x 128 group; q = e4m3(x / s)",
    promises_rounding=False,
    make_inputs=_quant_inputs,
    new_outputs=lambda i: {"q": torch.full(i["x"].shape, float("nan"), dtype=FP8, device=i["x"].device),
                           "s": registry.nan_like(i["x"].float(), (i["x"].shape[0], groups(i["x"].shape[1])))},
    launch=lambda i, o, cfg: quantize_launch(i["x"], o["q"], o["s"], cfg),
    reference=lambda i: dict(zip(("q", "s"), quantize_ref(i["x"]))),
    # the attention output (width) and, in fc1's unfused alternative, the hidden activation
    plans=lambda target: [plan_quantize(Meta.contiguous((s.rows, n), s.dtype), target)
                          for s in registry.segmentation_shapes() for n in (s.width, s.hidden)]
    if fp8_targets(target) else [],
    plan_for=lambda i, target: plan_quantize(Meta.of(i["x"]), target),
    candidates=lambda arch: [dict(BLOCK_M=b, num_warps=w) for b, w in
                             (((16, 4), (32, 4)) if arch == "smoke" else ((16, 4), (32, 4), (64, 8)))],
    judge=_quant_judge,
)


def _fp8_dims(epilogue: str, variant: str, s: Shape) -> Tuple[int, int]:
    """(N, K): qkv (3 width, width), fc1 (hidden, width), proj (width, width), fc2 (width, hidden)."""
    if epilogue == "none":
        return 3 * s.width, s.width
    if epilogue == "gelu":
        return s.hidden, s.width
    return (s.width, s.width) if variant == "proj" else (s.width, s.hidden)


def _plan_fp8(epilogue: str, variant: str, s: Shape, target: Target, gamma: bool = True,
              config: Optional[dict] = None, bias: bool = True) -> LaunchPlan:
    """The launch of this FP8 GEMM at a shape, with contiguous operands (the fast path's)."""
    from .gemm import plan_linear
    n, k = _fp8_dims(epilogue, variant, s)
    m = Meta.contiguous
    quant_out = epilogue == "gelu"
    vec = m((n,), s.dtype)
    return plan_linear(m((s.rows, k), FP8), m((n, k), FP8), m((s.rows, n), FP8 if quant_out else s.dtype), epilogue,
                       target, x=m((s.rows, n), s.dtype) if epilogue == "residual" else None,
                       bias=vec if bias else None,
                       gamma=vec if epilogue == "residual" and gamma else None, config=config,
                       a_scale=m((s.rows, groups(k)), torch.float32), w_scale=m((groups(n), groups(k)), torch.float32),
                       out_scale=m((s.rows, groups(n)), torch.float32) if quant_out else None, act_dtype=s.dtype)


def _fp8_plans(epilogue: str, variant: str):
    def plans(target: Target):
        if not fp8_targets(target):
            return []
        out = [_plan_fp8(epilogue, variant, s, target) for s in registry.segmentation_shapes()]
        if epilogue == "residual":  # a model without LayerScale
            out += [_plan_fp8(epilogue, variant, s, target, gamma=False) for s in registry.segmentation_shapes()]
        if epilogue == "none":  # upstream's qkv has no bias (qkv_bias=False)
            out += [_plan_fp8(epilogue, variant, s, target, bias=False) for s in registry.segmentation_shapes()]
        return out
    return plans


def _fp8_plan_for(epilogue: str, variant: str):
    def plan_for(i: dict, target: Target) -> LaunchPlan:
        rows, k = i["q"].shape
        n = i["wq"].shape[0]
        width = {"none": k, "gelu": k, "residual": n}[epilogue]
        hidden = n if epilogue == "gelu" else k if variant == "fc2" else 4 * width
        return _plan_fp8(epilogue, variant, Shape(rows, width, hidden, i["bias"].dtype), target)
    return plan_for


def _fp8_inputs(epilogue: str, variant: str):
    def make(s: Shape, device) -> dict:
        n, k = _fp8_dims(epilogue, variant, s)
        r = registry.rand
        q, sc = quantize_ref(r((s.rows, k), s.dtype, device, 2.0 if epilogue == "residual" else 1.0))
        wq, ws = quantize_weight(r((n, k), s.dtype, device, k ** -0.5))
        inp = dict(q=q, s=sc, wq=wq, ws=ws, bias=r((n,), s.dtype, device, 0.5))
        if epilogue == "residual":  # (norm_weight, eps: the op's norm, which the Choice runs)
            inp.update(gamma=r((n,), s.dtype, device, 0.3), x=r((s.rows, n), s.dtype, device, 3.0),
                       norm_weight=r((n,), s.dtype, device, 1.0, 1.0), eps=1e-6)
        return inp
    return make


def _fp8_run(epilogue: str):
    def launch(i: dict, o: dict, cfg: Optional[dict]) -> None:
        if epilogue == "gelu":
            linear_launch(i["q"], i["wq"], i["bias"], o["q"], "gelu", a_scale=i["s"], w_scale=i["ws"],
                          out_scale=o["s"], act_dtype=i["bias"].dtype, config=cfg)
        elif epilogue == "residual":
            linear_launch(i["q"], i["wq"], i["bias"], o["x_new"], "residual", gamma=i["gamma"], residual=i["x"],
                          a_scale=i["s"], w_scale=i["ws"], config=cfg)
        else:
            linear_launch(i["q"], i["wq"], i["bias"], o["y"], "none", a_scale=i["s"], w_scale=i["ws"], config=cfg)
    return launch


def _fp8_outputs(epilogue: str):
    def new(i: dict) -> dict:
        rows, n, dtype = i["q"].shape[0], i["wq"].shape[0], i["bias"].dtype
        if epilogue == "gelu":
            return {"q": torch.full((rows, n), float("nan"), dtype=FP8, device=i["q"].device),
                    "s": torch.full((rows, groups(n)), float("nan"), device=i["q"].device)}
        return {"x_new" if epilogue == "residual" else "y": torch.full((rows, n), float("nan"), dtype=dtype,
                                                                         device=i["q"].device)}
    return new


def gemm_ref(epilogue: str, i: dict, compute=torch.float32) -> dict:
    """The FP8 GEMM ops' statement in torch: the GEMM on the dequantized operands summed in
    ``compute``, then the bf16 path's epilogue at its rounding points; fc1's output quantized."""
    dtype = i["bias"].dtype
    h = linear_ref(i["q"], i["s"], i["wq"], i["ws"], i["bias"], dtype, compute)
    if epilogue == "gelu":
        return dict(zip(("q", "s"), quantize_ref(F.gelu(h.to(compute)).to(dtype))))
    if epilogue == "residual":
        gamma = i.get("gamma")
        return {"x_new": i["x"] + (h if gamma is None else (h.float() * gamma.float()).to(dtype))}
    return {"y": h}


def _fp8_judge(epilogue: str):
    def judge(got: dict, i: dict) -> None:
        """The parity rule against the GEMM summed in float64 (with fp32 sums as torch's own
        error); for fc1's e4m3 output, on the dequantized values (which a quantization that
        picked the wrong scale or rounded wrongly fails: the rule's slack is twice the
        reference's own quantization error)."""
        from . import parity
        if "hq" in got:  # the residual op's norm (Choice): exactly the quantized norm of its own x_new
            q, sc = quantize_ref(_rms.rms_norm_ref(got["x_new"], i["norm_weight"], i["eps"]))
            assert torch.equal(got["hs"], sc) and torch.equal(got["hq"].view(torch.uint8), q.view(torch.uint8)), \
                f"fp8 {epilogue}: the quantized norm of x_new differs from the reference's"
            got = {"x_new": got["x_new"]}
        exact, same = gemm_ref(epilogue, i, torch.float64), gemm_ref(epilogue, i, torch.float32)
        if epilogue == "gelu":
            got, exact, same = ({"u": dequantize(d["q"], d["s"])} for d in (got, exact, same))
        for name in got:
            verdict = parity.check(got[name], exact[name], same[name], 1e-3)
            assert verdict.ok, f"fp8 {epilogue} {name}: {verdict}"
    return judge


def _fp8_candidates(epilogue: str):
    def cands(arch: str):
        two = dict(CTAS_PER_SM=2)
        if arch == "smoke":
            rows = [(16, 128, 64, 1, 4, 1, 2, {}), (32, 128, 128, 1, 4, 1, 2, two)]
        else:
            rows = [(128, 128, 128, 1, 4, 3, 8, two), (128, 128, 128, 1, 8, 4, 8, {}),
                    (128, 128, 128, 1, 8, 4, 8, dict(STREAM_K=True)), (128, 128, 64, 1, 8, 4, 8, {}),
                    (128, 256, 128, 2, 8, 3, 8, {}), (64, 128, 128, 1, 4, 4, 8, two)]
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EPI_SPLIT=sp, num_warps=w, num_stages=st, GROUP_M=g, **x)
                for bm, bn, bk, sp, w, st, g, x in rows]
    return cands


def _fp8_choice(epilogue: str) -> Choice:
    """The fused op against cuBLASLt + row kernels (on a CPU: the torch GEMM + row kernels)."""
    def qs(i):
        return i["q"], i["s"], i["wq"], i["ws"], i["bias"]
    def fused(i, cfg=None):  # the spec's own launch (qkv, fc1)
        o = _fp8_outputs(epilogue)(i)
        _fp8_run(epilogue)(i, o, cfg)
        return o
    if epilogue == "none":
        return Choice(fused=fused, unfused=lambda i: {"y": scaled_mm(*qs(i), i["bias"].dtype)},
                      describe_unfused="cuBLASLt block-scaled GEMM (torch scaled_mm)")
    if epilogue == "gelu":
        return Choice(fused=fused, unfused=lambda i: dict(zip(("q", "s"), gelu_unfused(*qs(i), i["bias"].dtype))),
                      describe_unfused="cuBLASLt GEMM + in-place GELU kernel + quantize_fp8")
    names = ("x_new", "hq", "hs")
    rest = ("gamma", "x", "norm_weight", "eps")
    return Choice(
        fused=lambda i, cfg=None: dict(zip(names, residual_fused(*qs(i), *(i[k] for k in rest), config=cfg))),
        unfused=lambda i: dict(zip(names, residual_unfused(*qs(i), *(i[k] for k in rest)))),
        describe_unfused="cuBLASLt GEMM + residual_rms_norm_fp8 kernel (fused: residual epilogue + rms_norm_fp8)")


def _fp8_spec(epilogue: str, variant: str = "") -> KernelSpec:
    name = {"none": "fp8_linear", "gelu": "fp8_linear_gelu", "residual": "fp8_linear_residual"}[epilogue]
    return KernelSpec(
        name=name,
        variant=variant,
        math={"none": "y = round((q s) @ (wq ws)^T + b) (qkv)",
              "gelu": "(u, su) = quantize(round(GELU(round((q s) @ (wq ws)^T + b)))) (fc1)",
              "residual": "x_new = round(x + round(gamma * round((q s) @ (wq ws)^T + b))) (proj, fc2)"}[epilogue],
        promises_rounding=epilogue == "residual",
        make_inputs=_fp8_inputs(epilogue, variant),
        new_outputs=_fp8_outputs(epilogue),
        launch=_fp8_run(epilogue),
        reference=lambda i: gemm_ref(epilogue, i),
        plans=_fp8_plans(epilogue, variant),
        plan_for=_fp8_plan_for(epilogue, variant),
        candidates=_fp8_candidates(epilogue),
        judge=_fp8_judge(epilogue),
        choice=_fp8_choice(epilogue),
    )


QKV_SPEC = _fp8_spec("none")
GELU_SPEC = _fp8_spec("gelu")
PROJ_SPEC = _fp8_spec("residual", "proj")
FC2_SPEC = _fp8_spec("residual", "fc2")


def _norm_inputs(residual: bool):
    def make(s: Shape, device) -> dict:
        r = registry.rand
        x = r((s.rows, s.width), s.dtype, device, 3.0)
        w = r((s.width,), s.dtype, device, 1.0, 1.0)
        w[:: max(1, s.width // 3)] *= 50  # outlier channels: their groups get their own scales
        if not residual:
            return dict(x=x, weight=w, eps=1e-6)
        return dict(x=x, y=r((s.rows, s.width), s.dtype, device), gamma=r((s.width,), s.dtype, device, 0.3),
                    weight=w, eps=1e-6)
    return make


def _norm_ref(i: dict) -> dict:
    if "y" not in i:
        return dict(zip(("q", "s"), quantize_ref(_rms.rms_norm_ref(i["x"], i["weight"], i["eps"]))))
    x_new, h = _rms.rms_norm_ref(i["x"], i["weight"], i["eps"], residual=i["y"], gamma=i.get("gamma"))
    return dict(zip(("q", "s"), quantize_ref(h)), x_new=x_new)


def _norm_judge(got: dict, i: dict) -> None:
    """Equality: the new stream and the norm's bf16 row are upstream's bit for bit, and the
    row's quantization exact."""
    want = _norm_ref(i)
    op = NORM_OP if "y" not in i else RES_NORM_OP
    if "x_new" in want:
        assert torch.equal(got["x_new"], want["x_new"]), f"{op}: the new stream differs from the reference"
    assert torch.equal(got["s"], want["s"]), f"{op}: scales differ from the reference"
    assert torch.equal(got["q"].view(torch.uint8), want["q"].view(torch.uint8)), f"{op}: e4m3 values differ"


def _norm_plan(x: Meta, target: Target, residual: bool = False, gamma: bool = True) -> LaunchPlan:
    rows, n = x.shape
    metas = {t: x for t in _rms.FWD_TENSORS}
    metas.update(W=Meta.contiguous((n,), x.dtype), G=Meta.contiguous((n,), x.dtype),
                 H_OUT=Meta.contiguous((rows, n), FP8), HS=Meta.contiguous((rows, groups(n)), torch.float32))
    flags = dict(HAS_RESIDUAL=residual, HAS_GAMMA=residual and gamma, HAS_NORM=True, HAS_ROWSCALE=False,
                 QUANT_H=True)
    return _rms.plan_rows(RES_NORM_OP if residual else NORM_OP, metas, 1e-6, flags, target)


def _norm_outputs(i: dict) -> dict:
    x = i["x"]
    out = {"q": torch.full(x.shape, float("nan"), dtype=FP8, device=x.device),
           "s": torch.full((x.shape[0], groups(x.shape[1])), float("nan"), device=x.device)}
    if "y" in i:
        out["x_new"] = registry.nan_like(x)
    return out


def _norm_spec(residual: bool) -> KernelSpec:
    """rms_norm_fp8 (norm1, norm2 before FP8 GEMMs) and, with ``residual``, the residual +
    LayerScale + norm row kernel writing e4m3 (the FP8 residual GEMMs' unfused alternative)."""
    def plans(target: Target):
        if not fp8_targets(target):
            return []
        shapes = [Meta.contiguous((s.rows, s.width), s.dtype) for s in registry.segmentation_shapes()]
        out = [_norm_plan(x, target, residual) for x in shapes]
        if residual:  # a model without LayerScale
            out += [_norm_plan(x, target, residual, gamma=False) for x in shapes]
        return out

    def launch(i, o, cfg):
        rms_norm_fp8_launch(i["x"], i["weight"], i["eps"], o["q"], o["s"], cfg, y=i.get("y"), gamma=i.get("gamma"),
                            x_out=o.get("x_new"))
    return KernelSpec(
        name=RES_NORM_OP if residual else NORM_OP,
        math=("(x_new, q, s): x_new = round(x + round(gamma * y)), (q, s) = quantize(RMSNorm(x_new) * w)" if residual
              else "(q, s) = quantize(round(x / sqrt(mean(x^2) + eps)) * w) (norm1, norm2 before FP8 GEMMs)"),
        promises_rounding=True,
        loads_first=True,
        make_inputs=_norm_inputs(residual),
        new_outputs=_norm_outputs,
        launch=launch,
        reference=_norm_ref,
        plans=plans,
        plan_for=lambda i, target: _norm_plan(Meta.of(i["x"]), target, residual, i.get("gamma") is not None),
        candidates=lambda arch: [dict(num_warps=w) for w in ((2, 4) if arch == "smoke" else (4, 8, 16))],
        judge=_norm_judge,
    )


NORM_SPEC = _norm_spec(False)
RES_NORM_SPEC = _norm_spec(True)
