"""Exact (erf) GELU and its derivative; the elementwise kernel, in place allowed.

    y  = round(0.5 * x * (1 + erf(x / sqrt(2))))      (nn.GELU(), computed in fp32)
    y' = Phi(x) + x * phi(x)                          (torch's gelu_backward)

``gelu_value`` and ``gelu_grad`` are also the GEMM's epilogues (gemm.py): fc1's forward,
and fc1's input gradient in training. The kernel is the second half of fc1's unfused
alternative: cuBLAS's fc1 followed by this kernel over the hidden activation in place,
one read and one write of it. The tuned table says which of the two wins on a card.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import registry
from .common import cast, check_tensors, on_device
from .launch import LaunchPlan, Meta, Target, lookup, table_key
from .registry import KernelSpec, Shape

OP = "gelu"
DEFAULT = {"BLOCK": 2048, "num_warps": 8}  # elements per program: 8 per thread at 8 warps, 16-byte bf16 vectors


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


@triton.jit
def _erf(x):
    """erf of fp32 ``x`` as torch's CUDA GELU computes it: CUDA's libdevice ``erff`` (the
    same in CUDA 12.8 and 13.0, whose libdevice nvcc links into torch's cu130 build), without
    its branch.

    Not ``tl.erf``: that links the libdevice Triton bundles, and Triton 3.6's is older, with
    another polynomial for |x| >= 1.00296 (Triton 3.9's matches CUDA's); the coefficients
    here are read off CUDA 13.0's libdevice (nvidia-nvvm 13.0.88) through a probe's PTX.
    The same two polynomials, fma by fma: |x| < 1.00296 takes x + x q(x^2); beyond it
    sign(x) (1 - 2^(-|x| (1 + p(|x|)))). libdevice branches between them, which over a tile
    compiles to selecting seven coefficients per element (the MOVs of the #22 reading); both
    are evaluated here and the result selected once: 17% fewer SASS instructions in fc1's
    epilogue (tools.gate, sm_90, triton 3.6: 5234 -> 4341 per warp per tile). Triton's
    libdevice build flushes a subnormal x to zero; this keeps it, as torch's build does (in the
    GELU, 1 + erf(x) is 1 either way). That the GELU built on it gives the bits of one built
    on CUDA's libdevice for every bf16 and fp16 input (and fp32 sweeps) is the compile gate's
    to show (KernelSpec.same_bits: both compiled PTX programs run on CPU); the interpreter
    rounds ``tl.fma`` twice and cannot."""
    a = tl.abs(x)
    r = x * x
    q = tl.fma(8.483494457323104e-05, r, -0.0008213091641664505)
    q = tl.fma(q, r, 0.005213488824665546)
    q = tl.fma(q, r, -0.026868773624300957)
    q = tl.fma(q, r, 0.11284004896879196)
    q = tl.fma(q, r, -0.37612664699554443)
    q = tl.fma(q, r, 0.12837915122509003)
    small = tl.fma(q, x, x)
    p = tl.fma(0.00011219871521461755, a, -0.0013275252422317863)
    p = tl.fma(p, a, 0.00839653518050909)
    p = tl.fma(p, a, -0.04024658352136612)
    p = tl.fma(p, a, 0.15950430929660797)
    p = tl.fma(p, a, 0.9129176735877991)
    p = tl.fma(p, a, 0.6290600299835205)
    big = 1.0 - tl.exp2(tl.fma(p, -a, -a))
    big = tl.where(x < 0, -big, big)
    return tl.where(a >= 1.002959966659546, big, small)


@triton.jit
def _libdevice_gelu(h):
    """The GELU on ``tl.erf``: built against CUDA's libdevice, the reference of the gate's same-bits check."""
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def gelu_value(h):
    """The exact GELU of fp32 ``h``."""
    return 0.5 * h * (1.0 + _erf(h * 0.7071067811865476))


@triton.jit
def gelu_grad(x):
    """d GELU(x) / dx for the exact GELU: Phi(x) + x phi(x), in fp32 (torch's gelu_backward's
    formula, not its rounding: nvcc contracts torch's into an fma; the parity rule applies)."""
    return 0.5 * (1.0 + _erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _gelu_kernel(
    X,  # (n,) contiguous input
    Y,  # (n,) contiguous output; may be X itself
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, cast(gelu_value(x), Y.dtype.element_ty), mask=mask)


def gelu_launch(x: torch.Tensor, out: torch.Tensor, config: Optional[dict] = None) -> torch.Tensor:
    """Check the inputs, then write GELU(x) into ``out`` (``out`` may be ``x``: in place)."""
    check_tensors(OP, ("x", x), ("out", out))
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"{OP}: out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    for name, t in (("x", x), ("out", out)):
        if not t.is_contiguous():
            raise ValueError(f"{OP}: {name} must be contiguous, got strides {t.stride()}")
    if x.numel():
        plan = plan_gelu(Meta.of(x), Meta.of(out), Target.of(x.device), config)
        with on_device(x):
            plan.run(X=x, Y=out)
    return out


def plan_gelu(x: Meta, out: Meta, target: Target, config: Optional[dict] = None) -> LaunchPlan:
    n = 1
    for d in x.shape:
        n *= d
    key = table_key(OP, M=n, dtype=x.dtype)
    entry = lookup(target, key)
    cfg = dict(config or (entry or {}).get("config") or DEFAULT)
    return LaunchPlan(_gelu_kernel, (triton.cdiv(n, cfg["BLOCK"]),), dict(X=x, Y=out, n=n), dict(BLOCK=cfg["BLOCK"]),
                      dict(num_warps=cfg["num_warps"], num_stages=1, enable_fp_fusion=True), {}, key,
                      entry is not None, f"{OP} {n}")


@torch.library.custom_op("internvit_fast::gelu", mutates_args=())
def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) through the kernel, out of place (x contiguous)."""
    return gelu_launch(x, torch.empty_like(x))


@gelu.register_fake
def _(x):
    return torch.empty_like(x)


# --- what the tools need to know (registry) ----------------------------------------------

def _gelu_inputs(rng: np.random.Generator) -> np.ndarray:
    """What the GELU is evaluated at: every finite bf16 and fp16 value (fc1's output is
    rounded to the activation dtype first, so these are all its inputs); both signs of 4,096
    fp32 steps either side of where erf's argument crosses the polynomials' edge; zeros,
    subnormals, infinities, NaN; every 64th fp32 in [1/8, 4), where erf is far from +-1; and
    2^20 fresh random fp32 of every exponent up to 2^6."""
    bits = np.arange(65536, dtype=np.uint32)
    h16 = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    hbf = (bits << 16).view(np.float32)
    every = np.concatenate([h16, hbf])  # both signs already
    edge = np.float32(1.002959966659546 / 0.7071067811865476)
    near = (np.int64(edge.view(np.int32)) + np.arange(-4096, 4097)).astype(np.int32).view(np.float32)
    special = np.array([0.0, np.inf, np.nan, 1e-45, 1e-40, 1.1754942e-38, 1.1754944e-38], dtype=np.float32)
    dense = np.arange(0x3E000000, 0x40800000, 64, dtype=np.uint32).view(np.float32)  # every 64th in [1/8, 4)
    rand = np.exp2(rng.uniform(-149, 6, 1 << 20)).astype(np.float32)
    pos = np.concatenate([near, special, dense, rand])
    return np.concatenate([every[np.isfinite(every)], pos, -pos])


def _meta(shape: Shape) -> Meta:
    return Meta.contiguous((shape.rows, shape.hidden), shape.dtype)


SPEC = KernelSpec(
    name=OP,
    math="y = 0.5 x (1 + erf(x / sqrt 2)) over fc1's output, in place",
    promises_rounding=False,
    make_inputs=lambda s, device: {"x": registry.rand((s.rows, s.hidden), s.dtype, device, 2.0)},
    new_outputs=lambda i: {"y": registry.nan_like(i["x"])},
    launch=lambda i, o, cfg: gelu_launch(i["x"], o["y"], cfg),
    reference=lambda i: {"y": gelu_ref(i["x"])},
    plans=lambda target: [plan_gelu(_meta(s), _meta(s), target) for s in registry.segmentation_shapes()],
    plan_for=lambda i, target: plan_gelu(Meta.of(i["x"]), Meta.of(i["x"]), target),
    candidates=lambda arch: [dict(BLOCK=b, num_warps=w) for b, w in
                             (((256, 4), (1024, 4)) if arch == "smoke" else ((1024, 4), (2048, 8), (4096, 8)))],
    same_bits=lambda rng: [("exact GELU (the kernel's and fc1's epilogue's) vs one on CUDA's erff", gelu_value,
                            _libdevice_gelu, _gelu_inputs(rng))],
)
