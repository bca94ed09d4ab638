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

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import registry
from ._common import cast, check_tensors, on_device
from .launch import LaunchPlan, Meta, Target, lookup, table_key
from .registry import KernelSpec, Shape

OP = "gelu"
DEFAULT = {"BLOCK": 2048, "num_warps": 8}  # elements per program: 8 per thread at 8 warps, 16-byte bf16 vectors


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


@triton.jit
def gelu_value(h):
    """The exact GELU of fp32 ``h``."""
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def gelu_grad(x):
    """d GELU(x) / dx for the exact GELU: Phi(x) + x phi(x), in fp32 (torch's gelu_backward)."""
    return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


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
)
