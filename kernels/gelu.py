"""Exact (erf) GELU, elementwise, in place allowed: the second half of fc1's unfused alternative.

    y = round(0.5 * x * (1 + erf(x / sqrt(2))))      (nn.GELU(), computed in fp32)

fc1's fused kernel (linear.py) applies the same GELU in its GEMM epilogue; its
alternative is cuBLAS's fc1 followed by this kernel over the hidden activation in place,
one read and one write of it. The tuned table says which of the two wins on a card.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import registry
from ._common import cast, check_tensors, on_device
from .registry import CompileSpec, KernelSpec, Shape
from .tuning import lookup

OP = "gelu"
BLOCK = 2048  # elements per program: 8 per thread at 8 warps, 16-byte bf16 vectors
DEFAULT = {"BLOCK": BLOCK, "num_warps": 8}


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


@triton.jit
def gelu_value(h):
    """The exact GELU of fp32 ``h`` (also the GEMM epilogue's, in linear.py)."""
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


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
    n = x.numel()
    if n:
        cfg = dict(config or lookup(OP, x.device, M=n, dtype=x.dtype) or DEFAULT)
        with on_device(x):
            _gelu_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](x, out, n, **cfg)
    return out


@torch.library.custom_op("internvit_fast::gelu", mutates_args=())
def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU(x) through the kernel, out of place (x contiguous)."""
    return gelu_launch(x, torch.empty_like(x))


@gelu.register_fake
def _(x):
    return torch.empty_like(x)


# --- what the tools need to know (registry) ----------------------------------------------

def _specs(arch: int):
    out = []
    for shape in registry.segmentation_shapes():
        n = shape.rows * shape.hidden
        p = registry.POINTER[shape.dtype]
        out.append(CompileSpec(OP, _gelu_kernel, dict(X=p, Y=p, n=n), {"BLOCK": BLOCK},
                               dict(num_warps=DEFAULT["num_warps"], num_stages=1), shape.label()))
    return out


def _traffic(s: Shape, cfg=None):
    b = 2 * s.rows * s.hidden * s.el
    return b, b


SPEC = KernelSpec(
    name=OP,
    math="y = 0.5 x (1 + erf(x / sqrt 2)) over fc1's output, in place",
    promises_rounding=False,
    make_inputs=lambda s, device: {"x": registry.rand((s.rows, s.hidden), s.dtype, device, 2.0)},
    new_outputs=lambda i: {"y": registry.nan_like(i["x"])},
    launch=lambda i, o, cfg: gelu_launch(i["x"], o["y"], cfg),
    reference=lambda i: {"y": gelu_ref(i["x"])},
    eager=lambda i: gelu_ref(i["x"]),
    compile_specs=_specs,
    candidates=lambda arch: [dict(BLOCK=b, num_warps=w) for b, w in
                             (((256, 4), (1024, 4)) if arch == "smoke" else ((1024, 4), (2048, 8), (4096, 8)))],
    tuned_shape=lambda s: {"M": s.rows * s.hidden, "dtype": registry.DTYPE_NAMES[s.dtype]},
    traffic=_traffic,
)
