"""Timing, ceilings and result records shared by the benchmark suites.

GPU figures come from CUDA events after warm-up, the median of repeats, rotating
over several input buffers so the L2 cache does not flatter memory-bound work.
On CPU (the smoke run in CI) the same code runs at tiny shapes with a wall clock.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# The whole GPU run must fit its time box: a test that starts after the deadline is
# skipped with that reason (and reported as not measured), never silently dropped.
DEADLINE = float(os.environ.get("INTERNVIT_BENCH_DEADLINE", "inf"))
L2_BYTES = 64 << 20  # above the 50 MB L2 of an H100/H200


def seconds_left() -> float:
    return DEADLINE - time.time()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def buffers_for(nbytes: int) -> int:
    """How many input copies to rotate over so the working set exceeds L2 (CPU: 1)."""
    if not CUDA or nbytes <= 0:
        return 1
    return max(1, min(8, math.ceil(2 * L2_BYTES / nbytes)))


def median_ms(fn: Callable[[int], object], warmup: int = 3, repeats: int = 10) -> Dict[str, float]:
    """Median and spread of fn(i) in milliseconds; i counts calls (for buffer rotation)."""
    for i in range(warmup):
        fn(i)
    sync()
    times: List[float] = []
    for i in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(warmup + i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(warmup + i)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "repeats": repeats}


def copy_ceiling_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus written."""
    if not CUDA:
        nbytes = 1 << 24
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    t = median_ms(lambda i: dst.copy_(src), warmup=3, repeats=10 if CUDA else 3)["ms"]
    return 2 * nbytes / (t * 1e-3) / 1e9


def matmul_ceiling_tflops(n: int = 8192) -> float:
    """A large bf16 matmul's rate (2 n^3 FLOPs)."""
    if not CUDA:
        n = 256
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    t = median_ms(lambda i: a @ b, warmup=3, repeats=10 if CUDA else 3)["ms"]
    return 2 * n ** 3 / (t * 1e-3) / 1e12


def rotating(make: Callable[[], Sequence[torch.Tensor]], nbytes: int) -> List[Sequence[torch.Tensor]]:
    """Independent random input sets, enough to defeat L2 (see buffers_for)."""
    return [make() for _ in range(buffers_for(nbytes))]


def compile_fn(fn, mode: str):
    """torch.compile with a named mode; inductor on GPU, aot_eager for the CPU smoke run
    (inductor's C++ build would dominate CI time; the call path is the same)."""
    # dynamic=False: one static graph per batch size, as a user compiling for a fixed
    # batch gets (automatic dynamic shapes would switch to a symbolic batch on the 2nd size).
    if CUDA:
        return torch.compile(fn, mode=mode, dynamic=False)
    return torch.compile(fn, backend="aot_eager", dynamic=False)


def record(benchmark, **info) -> None:
    """Attach figures to a pytest-benchmark result (they land in --benchmark-json)."""
    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu (smoke)"
