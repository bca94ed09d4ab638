"""GELU-MLP first layer: y = GELU(round(a @ w^T + b)), exact (erf) GELU in the GEMM epilogue.

    a: (M, K) activations, w: (N, K) nn.Linear weight, b: (N,) bias, y: (M, N)

The 4x-wide hidden activation is written once and never re-read for the
activation. The GEMM result is rounded to the activation dtype before the GELU,
as upstream's separate fc1 and nn.GELU do. (cuBLASLt's fused GELU epilogue is the
tanh approximation, which does not match nn.GELU.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import INTERPRET, INTERPRETING, cast, check_tensors, on_device
from .tuning import lookup

OP = "gelu_linear"


def gelu_linear_ref(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Plain torch: nn.GELU()(F.linear(a, weight, bias))."""
    return F.gelu(F.linear(a, weight, bias))


# Launch configurations by target, chosen so the compiled kernel does not spill
# (python -m internvit_fast.compile_check). sm90: 128x128x64 tiles over two
# warpgroups issue wgmma with a 4-stage cp.async pipeline; 128x256 spilled 48
# bytes in the GELU epilogue with triton 3.6. sm80: 128x128x32, 4 stages, fits the
# A100's shared memory. fp32 runs full-precision FMA ("ieee": torch's default is
# no TF32), with small tiles. The interpreter gets tiny tiles: it runs programs
# one by one. Untuned: the first GPU run (issue "Measure and tune") sweeps these.
CONFIGS = {
    "sm90": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    "sm80": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
    "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    "interpreter": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1),
}


def pick_config(dtype: torch.dtype, device: torch.device, m: int = 0, n: int = 0, k: int = 0) -> dict:
    """The measured configuration for this card and shape (kernels/tuned/), else the table above."""
    if INTERPRETING or device.type != "cuda":
        return CONFIGS["interpreter"]
    tuned = lookup(OP, device, M=m, N=n, K=k, dtype=dtype)
    if tuned:
        return tuned
    if dtype == torch.float32:
        return CONFIGS["fp32"]
    major, _ = torch.cuda.get_device_capability(device)
    return CONFIGS["sm90" if major == 9 else "sm80"]


@triton.jit
def _gelu_linear_kernel(
    A,  # (M, K) activations, row stride stride_am, unit column stride
    W,  # (N, K) weight, row stride stride_wn, unit column stride
    BIAS,  # (N,) bias (unused when not HAS_BIAS)
    Y,  # (M, N) output, row stride stride_ym
    M, N, K,
    stride_am, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-tiles per group: consecutive programs share W tiles in L2
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask in the main loop
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row-tiles sweep the same column-tiles together, so a
    # weight tile is fetched from DRAM once per group instead of once per row-tile.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrap out-of-range rows/columns onto valid ones for the loads (results there are
    # discarded by the store mask): M = 1297 x batch needs no padding copy and no
    # load mask in the inner loop.
    ram = rm % M
    rbn = rn % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + ram[:, None].to(tl.int64) * stride_am + rk[None, :]
    w_ptrs = W + rbn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N) of w^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if INTERPRET:  # the interpreter's bf16 dot is wrong; the GPU keeps bf16 MMAs
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(BIAS + rbn).to(tl.float32)[None, :]
    ty = Y.dtype.element_ty
    h = cast(acc, ty).to(tl.float32)  # fc1's output in the activation dtype, as upstream
    y = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], cast(y, ty), mask=mask)


def gelu_linear_launch(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       out: torch.Tensor, config: Optional[dict] = None) -> torch.Tensor:
    """Check the inputs, then write GELU(a @ weight^T + bias) into ``out``."""
    named = [("a", a), ("weight", weight), ("out", out)] + ([] if bias is None else [("bias", bias)])
    check_tensors(OP, *named)
    for name, t in named[1:]:
        if t.dtype != a.dtype:
            raise ValueError(f"{OP}: {name} dtype {t.dtype} differs from a dtype {a.dtype}")
    if weight.ndim != 2:
        raise ValueError(f"{OP}: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if a.ndim != 2 or a.shape[1] != k:
        raise ValueError(f"{OP}: a must be 2-D (M, {k}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(a.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{OP}: bias must have shape ({n},), got {tuple(bias.shape)}")
    m = a.shape[0]
    if out.shape != (m, n):
        raise ValueError(f"{OP}: out must have shape ({m}, {n}), got {tuple(out.shape)}")
    for name, t in (("a", a), ("weight", weight), ("out", out)):
        if t.stride(1) != 1 and t.numel() > 1:
            raise ValueError(f"{OP}: {name} must have unit column stride, got strides {t.stride()}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError(f"{OP}: K = 0 (empty reduction) is not supported")
    cfg = dict(config or pick_config(a.dtype, a.device, m, n, k))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    with on_device(a):
        _gelu_linear_kernel[grid](
            a, weight, bias if bias is not None else weight, out, m, n, k,
            a.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0,
            DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **cfg)
    return out


@torch.library.custom_op("internvit_fast::gelu_linear", mutates_args=())
def gelu_linear(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU(a @ weight^T + bias) for a of shape (..., K); the Triton GEMM with GELU epilogue."""
    a2 = a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a
    out = torch.empty((a2.shape[0], weight.shape[0]), dtype=a.dtype, device=a.device)
    gelu_linear_launch(a2, weight, bias, out)
    return out.view(*a.shape[:-1], weight.shape[0])


@gelu_linear.register_fake
def _(a, weight, bias):
    return a.new_empty((*a.shape[:-1], weight.shape[0]))
