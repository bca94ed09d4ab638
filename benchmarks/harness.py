"""What the benchmark suites share: the GPU-synchronised clock, CUDA-graph replay over
rotating inputs, the benchmark marks, cheap correctness checks, and the records a run keeps.

Timing is pytest-benchmark's, used as its authors intend: each benchmark is parametrised
with ``mark(group=...)`` (pytest's ``benchmark`` marker: its group, the clock
``synced_timer`` and the rounds/time settings), and the test calls ``benchmark(target)``
once. pytest-benchmark calibrates the iterations per round, warms up and runs its rounds;
``--benchmark-disable`` runs every target once as a plain test. A kernel call is replayed
from a CUDA graph captured per input set, several input sets in turn so the working set
exceeds L2 (memory-bound work is not flattered by the cache); with ``min_time`` a round
holds enough replays that the GPU, not the Python launch or the clock's synchronisation,
sets the pace. Figures derived from the times (GB/s, TFLOP/s, fractions of the card's
ceilings) are computed by gpu_run from the stats and the counts a test attaches
(``record``), so the tests themselves never read the stats.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import pytest

import torch

from internvit_fast.kernels import parity

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# A test that starts after the stage's deadline is skipped with that reason (and reported
# as not measured), never silently dropped.
DEADLINE = float(os.environ.get("INTERNVIT_BENCH_DEADLINE", "inf"))
# Where each finished benchmark and check is appended as one JSON line the moment it is
# done (gpu_run reads it while a stage runs): a run cut short keeps what it measured.
RECORDS = os.environ.get("INTERNVIT_BENCH_RECORDS")
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


# How long pytest-benchmark spends per kind of benchmark. min_time: a round lasts at least
# this (replays of short kernels are batched into one round); max_time: rounds stop after
# about this long (but at least min_rounds). On CPU (the smoke run) one round, no warm-up.
TIMING = {
    "kernel": dict(min_time=0.002, max_time=0.25, min_rounds=10, warmup=True, warmup_iterations=20),
    "forward": dict(min_time=0.0, max_time=1.0, min_rounds=5, warmup=True, warmup_iterations=2),
    "slow": dict(min_time=0.0, max_time=1.0, min_rounds=3, warmup=True, warmup_iterations=1),
}
CPU_TIMING = dict(min_time=0.0, max_time=0.0, min_rounds=1, warmup=False)


def mark(group: str, kind: str = "kernel"):
    """pytest-benchmark's marker for one benchmark: its group (the table that sets the
    alternatives side by side), the GPU-synchronised clock and the timing settings."""
    return pytest.mark.benchmark(group=group, timer=synced_timer, **(TIMING[kind] if CUDA else CPU_TIMING))


def params(cases, ids, group: Callable, kind: str = "kernel"):
    """``cases`` as pytest.param entries, each with its benchmark group and timing."""
    return [pytest.param(*c, id=i, marks=mark(group(*c), kind)) for c, i in zip(cases, ids)]


def buffers_for(nbytes: int) -> int:
    """How many input copies to rotate over so the working set exceeds L2 (CPU: 1)."""
    if not CUDA or nbytes <= 0:
        return 1
    return max(1, min(8, math.ceil(2 * L2_BYTES / nbytes)))


def rotating(make: Callable[[], object], nbytes: int) -> list:
    """Independent random input sets, enough to defeat L2 (see buffers_for)."""
    return [make() for _ in range(buffers_for(nbytes))]


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
    from internvit_fast.graphs import capture
    graphs, keep = [], []
    pool = torch.cuda.graph_pool_handle()
    for args in arg_sets:
        replay, out = capture(lambda a=args: fn(*a), DEVICE, pool=pool)
        graphs.append(replay)
        keep.append(out)  # outputs of the captured calls must outlive the graphs

    def target():
        graphs[state["i"] % len(graphs)]()
        state["i"] += 1
    target.keep = keep
    return target


def time_ms(target: Callable[[], None], rounds: int = 10, warmup_rounds: int = 2) -> float:
    """Median ms per call of ``target`` for the tuner, which runs outside pytest: rounds of
    enough calls to last about 2 ms of GPU time each, on the synchronised clock."""
    target()
    t0 = synced_timer()
    target()
    est = max((synced_timer() - t0) * 1e3, 1e-3)
    iterations = int(min(200, max(1, math.ceil(2.0 / est)))) if CUDA else 1
    times: List[float] = []
    for r in range(warmup_rounds + rounds):
        t0 = synced_timer()
        for _ in range(iterations):
            target()
        if r >= warmup_rounds:
            times.append((synced_timer() - t0) * 1e3 / iterations)
    return statistics.median(times)


# --- correctness inside a timed run: cheap ---------------------------------------------------

def check_rows(rows: int, block: int = 128) -> torch.Tensor:
    """The rows a timed run checks: the first tile and the last (partial) one."""
    last = rows % block or block
    idx = list(range(min(block, rows))) + list(range(max(0, rows - last), rows))
    return torch.tensor(sorted(set(idx)))


def _take(t, rows: int, idx: torch.Tensor):
    if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == rows:
        return t.index_select(0, idx.to(t.device))
    return t


def spec_ok(spec, inputs: dict, got: Dict[str, torch.Tensor], reference, rows: int,
            exact_cache: dict = None, judge=None) -> parity.Verdict:
    """Whether ``got`` (a kernel's outputs for ``inputs``) meets the parity rule, computed
    cheaply: outputs with one row per token are checked on ``check_rows`` against references
    computed from those rows alone (a GEMM's float64 reference on 256 rows instead of
    5188); other outputs (column sums of a backward) against a full reference, computed once
    per input set (``exact_cache``, keyed by the inputs' identity). ``judge``: an assertion
    over (outputs, inputs) instead (default: the spec's own, where ``reference`` is the spec's)."""
    from internvit_fast.kernels.registry import float64
    idx = check_rows(rows)
    sub = {k: _take(v, rows, idx) for k, v in inputs.items()}
    judge = judge or (spec.judge if reference is spec.reference else None)
    if judge is not None:  # FP8: the spec's own judge, on the rows
        try:
            judge({k: _take(v, rows, idx) for k, v in got.items()}, sub)
        except AssertionError as e:
            print(f"{spec.id}: {e}", file=sys.stderr)
            return parity.Verdict(False, float("inf"), 0.0, 0.0, True)
        return parity.Verdict(True, 0.0, 0.0, 0.0, True)
    names_rowwise = [n for n, t in got.items() if t.ndim >= 1 and t.shape[0] == rows]
    names_other = [n for n in got if n not in names_rowwise]
    outs, exacts, sames = [], [], []
    if names_rowwise:
        same, exact = reference(sub), reference(float64(sub))
        outs += [_take(got[n], rows, idx) for n in names_rowwise]
        exacts += [exact[n] for n in names_rowwise]
        sames += [same[n] for n in names_rowwise]
    if names_other:
        key = id(inputs)
        cache = exact_cache if exact_cache is not None else {}
        if key not in cache:
            cache[key] = (reference(inputs), reference(float64(inputs)))
        same, exact = cache[key]
        outs += [got[n] for n in names_other]
        exacts += [exact[n] for n in names_other]
        sames += [same[n] for n in names_other]
    return parity.check(outs, exacts, sames, atol=1e-3)


# --- what a benchmark keeps -----------------------------------------------------------------

def record(benchmark, **info) -> None:
    """Counts and labels for a benchmark's result (they land in --benchmark-json and in the
    run's records): batch, bytes_min, flops, path, ... gpu_run derives the rates."""
    benchmark.extra_info.update(info)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu (smoke)"


def write_record(entry: dict) -> None:
    """Append one finished measurement or check to the run's records file (when set)."""
    if not RECORDS:
        return
    with open(RECORDS, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def stats_of(benchmark) -> dict:
    """The summary of a finished benchmark, seconds per call (empty when pytest-benchmark
    is disabled). ``benchmark.stats`` is pytest-benchmark's Metadata: ``get`` reads its Stats."""
    meta = getattr(benchmark, "stats", None)
    if not meta:
        return {}
    return {k: meta.get(k) for k in ("min", "max", "mean", "median", "stddev", "rounds", "iterations")}


def compile_fn(fn, mode: str = "default"):
    """torch.compile with a named mode; inductor on GPU, aot_eager for the CPU smoke run
    (inductor's C++ build would dominate CI time; the call path is the same)."""
    # dynamic=False: one static graph per batch size, as a user compiling for a fixed
    # batch gets (automatic dynamic shapes would switch to a symbolic batch on the 2nd size).
    if CUDA:
        return torch.compile(fn, mode=mode, dynamic=False)
    return torch.compile(fn, backend="aot_eager", dynamic=False)


def attention_kernels(fn: Callable[[], object]) -> List[str]:
    """The attention kernels one call of ``fn`` launches (read from a profile): which SDPA
    backend a path really ran, compiled paths included. Empty on CPU."""
    if not CUDA:
        return []
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync()
    words = ("fmha", "flash", "attention", "attn", "cudnn", "sdpa")
    return sorted({e.key[:120] for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CUDA and any(w in e.key.lower() for w in words)})
