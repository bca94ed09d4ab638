"""Timing, ceilings and result records shared by the benchmark suites and the tuner.

How a figure is timed (GPU): pytest-benchmark's own rounds, warm-up rounds and
iterations, with its clock synchronised to the GPU (``synced_timer``: every reading
waits for queued GPU work). A kernel call is replayed from a CUDA graph captured per
input set, several input sets in turn so the working set exceeds L2 (memory-bound work
is not flattered by the cache), and a round runs enough replays that the GPU, not the
Python launch, sets the pace. pytest-benchmark's table then shows the time of one call.
The tuner (no pytest) uses the same target and clock through ``time_ms``. On CPU (the
smoke run in CI) the same code runs at tiny shapes with plain calls.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, List, Sequence

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


def synced_timer() -> float:
    """pytest-benchmark's clock for GPU work: a reading waits for everything queued."""
    sync()
    return time.perf_counter()


def buffers_for(nbytes: int) -> int:
    """How many input copies to rotate over so the working set exceeds L2 (CPU: 1)."""
    if not CUDA or nbytes <= 0:
        return 1
    return max(1, min(8, math.ceil(2 * L2_BYTES / nbytes)))


def replays(fn: Callable, arg_sets: Sequence[Sequence]) -> Callable[[], None]:
    """A no-argument target that runs ``fn`` on the next input set at each call.

    GPU: each input set's call is captured once into a CUDA graph (after warm-up on a side
    stream, as torch's graph docs prescribe) and the target replays them in turn, so one
    call costs one graph launch however many kernels it holds. CPU: plain calls.
    """
    state = {"i": 0}
    if not CUDA:
        def target():
            fn(*arg_sets[state["i"] % len(arg_sets)])
            state["i"] += 1
        return target
    graphs = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in arg_sets:
            for _ in range(2):
                fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    keep = []  # outputs of the captured calls must outlive the graphs
    for args in arg_sets:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            keep.append(fn(*args))
        graphs.append(g)

    def target():
        graphs[state["i"] % len(graphs)].replay()
        state["i"] += 1
    target.keep = keep
    return target


def iterations_for(est_ms: float) -> int:
    """Replays per round so a round lasts about 2 ms of GPU time (1 on CPU)."""
    if not CUDA:
        return 1
    return int(min(200, max(1, math.ceil(2.0 / max(est_ms, 1e-3)))))


def estimate_ms(target: Callable[[], None]) -> float:
    target()
    t0 = synced_timer()
    for _ in range(3):
        target()
    return (synced_timer() - t0) * 1e3 / 3


def time_ms(target: Callable[[], None], rounds: int = 20, warmup_rounds: int = 3,
            iterations: int = 0) -> float:
    """Median ms per call of ``target``, timed as pytest-benchmark times it (for the tuner)."""
    iterations = iterations or iterations_for(estimate_ms(target))
    for _ in range(warmup_rounds):
        for _ in range(iterations):
            target()
    times: List[float] = []
    for _ in range(rounds):
        t0 = synced_timer()
        for _ in range(iterations):
            target()
        times.append((synced_timer() - t0) * 1e3 / iterations)
    return statistics.median(times)


def parity_ok(got: dict, inputs: dict, reference) -> bool:
    """The tests' rule on every output: error vs float64 at most twice torch's own, plus atol."""
    from internvit_fast.kernels.registry import float64
    same, exact = reference(inputs), reference(float64(inputs))
    for name, out in got.items():
        if not torch.isfinite(out).all():
            return False
        err = (out.double() - exact[name]).abs().max().item()
        base = (same[name].double() - exact[name]).abs().max().item()
        if err > 2 * base + 1e-3:
            return False
    return True


def copy_ceiling_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus written."""
    if not CUDA:
        nbytes = 1 << 24
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), rounds=10 if CUDA else 3, warmup_rounds=2, iterations=1)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_ceiling_tflops(n: int = 8192) -> float:
    """A large bf16 matmul's rate (2 n^3 FLOPs)."""
    if not CUDA:
        n = 256
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, rounds=10 if CUDA else 3, warmup_rounds=2, iterations=1)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def rotating(make: Callable[[], object], nbytes: int) -> list:
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


def median_ms(benchmark) -> float:
    """The median of a finished pytest-benchmark run, per call, in ms."""
    return benchmark.stats.stats.median * 1e3


def record(benchmark, **info) -> None:
    """Attach figures to a pytest-benchmark result (they land in --benchmark-json)."""
    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu (smoke)"
