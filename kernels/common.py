"""What every kernel file shares: the interpreter flag, input checks, the row-norm math."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterable, Optional

import torch
import triton
import triton.language as tl

# Read once at import, as triton.jit does: TRITON_INTERPRET=1 runs the kernels on
# CPU tensors through numpy. The interpreter mishandles bf16 arithmetic and
# tl.dot on bf16, so kernels upcast right after loading, and GEMM operands are
# upcast only under the interpreter (the GPU build keeps bf16 tensor-core MMAs).
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET = tl.constexpr(INTERPRETING)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Widest row a single-pass norm kernel holds in registers.
MAX_ROW = 16384
# Persistent kernels run this many programs under the interpreter: more than one tile
# per program, so the persistent loop itself is what the CPU tests exercise.
INTERPRETER_SMS = 3


def kernels_can_run_on(device: torch.device) -> bool:
    """CUDA always; CPU only when the Triton interpreter is on."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETING)


@triton.jit
def _interpreter_probe(X, n):
    # A loop bound taken from an integer argument: what triton 3.6's interpreter cannot do
    # with numpy >= 2.3 ("only 0-dimensional arrays can be converted to Python scalars").
    acc = 0.0
    for i in range(0, n):
        acc += tl.load(X + i)
    tl.store(X, acc)


@functools.lru_cache(maxsize=1)
def interpreter_problem() -> str:
    """Why Triton's interpreter cannot run the kernels here ('' when it can): found by
    running a probe kernel once, so a bad pair of versions gets one clear message instead
    of an InterpreterError deep inside a kernel."""
    import numpy
    x = torch.ones(3)
    try:
        _interpreter_probe[(1,)](x, 3)
    except Exception as e:  # noqa: BLE001 - InterpreterError and whatever it wraps
        return (f"Triton's interpreter cannot run here: triton {triton.__version__} with numpy "
                f"{numpy.__version__} fails ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:200]}). "
                "triton 3.6's interpreter needs numpy < 2.3 (pip install 'numpy<2.3'); "
                "triton 3.9's works with numpy 2.4")
    if x[0].item() != 3.0:
        return f"Triton's interpreter computed a wrong result (triton {triton.__version__})"
    return ""


def check_tensors(op: str, *named: tuple, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    """Raise a ValueError naming the op and argument for anything a kernel cannot take.

    ``named`` holds (name, tensor) pairs; all must share one device.
    """
    dtypes = tuple(dtypes)
    device = None
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected one of {dtypes}")
        if device is None:
            device = t.device
            if not kernels_can_run_on(device):
                raise ValueError(
                    f"{op}: {name} is on {device}; the Triton kernels need CUDA tensors "
                    "(or CPU tensors with TRITON_INTERPRET=1 set before import)")
            if device.type == "cpu" and interpreter_problem():
                raise RuntimeError(f"{op}: {interpreter_problem()}")
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")


def on_device(t: torch.Tensor):
    """Launch on the tensor's GPU: Triton launches on the *current* device, which need not
    be the one a tensor lives on (cuda:1 data with cuda:0 current would fault)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_row_width(op: str, name: str, n: int) -> None:
    if not 1 <= n <= MAX_ROW:
        raise ValueError(f"{op}: {name} rows are {n} wide; the kernel takes 1..{MAX_ROW}")


def as_rows(op: str, name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    """View ``t`` as (rows, width) with unit column stride, never copying."""
    if t.ndim == 0:
        raise ValueError(f"{op}: {name} is 0-d (a scalar); expected rows of width {width}")
    if t.shape[-1] != width:
        raise ValueError(f"{op}: {name} last dimension is {t.shape[-1]}, expected {width}")
    if t.stride(-1) != 1 and t.numel() > 0:
        raise ValueError(f"{op}: {name} must have unit stride in its last dimension, "
                         f"got strides {t.stride()}")
    try:
        return t.view(-1, width)
    except RuntimeError:
        raise ValueError(f"{op}: {name} with shape {tuple(t.shape)} and strides {t.stride()} "
                         "cannot be viewed as rows of one stride; pass a contiguous tensor") from None


def row_launch(n_cols: int, tuned: Optional[dict] = None) -> dict:
    """Block and warps for a kernel that keeps one whole row in registers.

    ``tuned`` (a tuned-table entry's config) may set num_warps; the block is always the row
    width rounded up to a power of two.
    """
    block = triton.next_power_of_2(n_cols)
    # About 8 values per thread: wide rows get more warps, not more registers (with
    # 16 per thread, ptxas spilled the fp32 qk_norm for sm_80 at width 3200).
    warps = max(1, min(16, block // 256))
    if tuned and "num_warps" in tuned:
        warps = int(tuned["num_warps"])
    return {"BLOCK_N": block, "num_warps": warps}


@triton.jit
def cast(x, DTYPE: tl.constexpr):
    """x.to(DTYPE) with round-to-nearest-even, also in the interpreter.

    The interpreter truncates fp32 -> bf16 (seen with triton 3.6); the GPU rounds.
    Rounding by hand there keeps CPU parity results faithful to the GPU's.
    """
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def rms_scale_row(x, w, n_cols, eps, ROUND_TO: tl.constexpr):
    """RMSNorm of one fp32 row ``x`` (zeros past n_cols) times fp32 weight ``w``.

    Matches upstream's rounding: the normalised row is rounded to the input
    dtype ROUND_TO before the weight multiply. Returns fp32.
    """
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    return cast(x * rstd, ROUND_TO).to(tl.float32) * w


# --- FP8 (e4m3) quantization, shared by the quantizing row kernel and the GEMM's epilogue ------

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
FP8_GROUP = 128  # activations are scaled per 1 x 128 group along a row, weights per 128 x 128 block


def groups(n: int) -> int:
    """Scale groups along n values (the last one may be partial)."""
    return -(-n // FP8_GROUP)


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """(..., K) as (rows, K) (a view where the layout allows)."""
    return t if t.ndim == 2 else t.reshape(-1, t.shape[-1])


@triton.jit
def fp8_scale(amax):
    """(scale, 1 / scale) for a group whose largest magnitude is ``amax`` (fp32, >= 0): the
    smallest power of two s with amax / s <= 448, found from amax's bits.

    A power of two makes x * (1/s) and the dequantising q * s exact, so the only rounding is
    e4m3's own and the torch reference reproduces the kernel bit for bit. Against amax / 448
    it gives up less than one binade at the bottom of e4m3's range, none of its precision.
    amax = m 2^E, m in [1, 2): s = 2^(E-8) if m <= 1.75 (448 = 1.75 2^8), else 2^(E-7); an
    all-zero (or subnormal) group gets 2^-126."""
    bits = amax.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    e = (bits >> 23).to(tl.int32) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    e = tl.minimum(tl.maximum(e, -126), 127)
    s = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return s, inv


@triton.jit
def fp8_round(v):
    """fp32 ``v`` (|v| <= 448) to e4m3, rounding to nearest even, also in the interpreter.

    The GPU's conversion (cvt.rn.satfinite.e4m3x2.f32, which the compile gate looks for)
    rounds; the interpreter's loses the carry into the exponent (1.94 -> 1.0, seen with
    triton 3.6 and 3.9) but converts representable values exactly, so there v is rounded by
    hand first: 3 mantissa bits for normals (|v| >= 2^-6), multiples of 2^-9 below."""
    if INTERPRET:
        bits = v.to(tl.uint32, bitcast=True)
        normal = ((bits + (((bits >> 20) & 1) + 0x7FFFF)) & 0xFFF00000).to(tl.float32, bitcast=True)
        sub = ((tl.abs(v) * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # 1.5 2^23: rint of |v| 2^9
        sub = (sub.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)  # -0 stays -0
        v = tl.where(tl.abs(v) >= 0.015625, normal, sub)
    return v.to(tl.float8e4nv)


@triton.jit
def fp8_quantize_groups(u):
    """A (rows, 128) fp32 tile, one group per row, to (e4m3 values, scales (rows,))."""
    s, inv = fp8_scale(tl.max(tl.abs(u), axis=1))
    return fp8_round(u * inv[:, None]), s
