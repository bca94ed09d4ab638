"""What each kernel of the registry moves and computes at a shape: bytes and FLOPs.

Kept out of the kernel files: the benchmarks divide their times by these (GB/s, TFLOP/s),
the compile gate reports each kernel's bytes against its minimum. A GEMM's DRAM bytes
depend on its launch plan: under the grouped tile order a group's row-tiles of ``a`` stay
in L2 while it sweeps the column-tiles, so ``a`` is read once and the weight once per
group; the minimum reads each operand once.
"""
from __future__ import annotations

from typing import Optional, Tuple

import triton

from .kernels.registry import Shape


def _gemm_dims(spec_id: str, s: Shape) -> Tuple[int, int]:
    """(N, K) of a registry GEMM: fc1 and fc1's backward (hidden, width), proj (width, width),
    fc2 (width, hidden)."""
    if spec_id in ("linear_gelu", "linear_gelu_grad"):
        return s.hidden, s.width
    return (s.width, s.width) if spec_id == "linear_residual[proj]" else (s.width, s.hidden)


def counts(spec_id: str, s: Shape, plan=None) -> Tuple[int, int, int]:
    """(bytes moved, least bytes it must move, FLOPs) of one launch at ``s``."""
    el, rows, width = s.el, s.rows, s.width
    if spec_id == "rms_norm":
        b = 2 * rows * width * el + width * el
        return b, b, 0
    if spec_id == "residual_rms_norm":
        b = 4 * rows * width * el + 2 * width * el
        return b, b, 0
    if spec_id == "qk_norm":  # reads q and k, writes them; v stays in place
        b = 4 * rows * width * el + 2 * width * el
        return b, b, 0
    if spec_id == "gelu":
        b = 2 * rows * s.hidden * el
        return b, b, 0
    if spec_id == "rms_norm_backward":  # reads x_new, y, dx_new, dh; writes dx, dy
        b = 6 * rows * width * el
        return b, b, 0
    n, k = _gemm_dims(spec_id, s)
    out = rows * n * (2 if spec_id.startswith("linear_residual") else 1)  # residual: read x, write x_new
    extra = rows * n if spec_id == "linear_gelu_grad" else 0  # the pre-activation it reads
    least = (rows * k + n * k + out + extra + 2 * n) * el
    groups = _groups(rows, plan)
    return least + (groups - 1) * n * k * el, least, 2 * rows * n * k


def _groups(rows: int, plan: Optional[object]) -> int:
    c = plan.constexprs if plan is not None else dict(BLOCK_M=128, GROUP_M=8)
    return triton.cdiv(triton.cdiv(rows, c["BLOCK_M"]), c["GROUP_M"])
