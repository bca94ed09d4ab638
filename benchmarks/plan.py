"""The GPU run's plan: its stages in the order of what they are worth, each with an estimate
of its seconds on a card, so the plan can be checked on a CPU before a GPU is lent.

    python -m benchmarks.gpu_run --plan --card h100 [--json]

A GPU window is ~15 minutes of device time and 10 minutes per command: the run must
bring back the backbone comparison first and keep everything it measured if it is cut
short. Estimates come from FLOP and byte counts at the card's rates, and from the fixed
costs below (process start, model build, Triton's JIT per kernel variant, torch.compile of
the 48-block backbone). The fixed costs are assumptions until a GPU run measures them:
each stage's real seconds are recorded beside its estimate in the results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

# The cards' ceilings (matmul, copy, fp64 rates) with their sources: one table for the plan
# and the compile gate's cost model.
from tools.costs import CARDS
from internvit_fast.segmentation.presets import PRESETS, flops_per_image

# Fixed costs, seconds (assumptions: the first GPU run records what they really are).
PROCESS_START = 8.0     # python, torch, triton imports, CUDA context, pytest collection
                        # (collection alone took 3.3 s on the 2-core CPU machine, 2026-11-30)
MODEL_BUILD = 6.0       # the 6B bf16 model built and initialised on the GPU
TRITON_JIT = 2.5        # one kernel variant compiled by Triton (cold cache)
COMPILE_REFERENCE = 75.0  # torch.compile (inductor, default mode) of the 48-block reference
COMPILE_FAST = 45.0     # the same for the fast model: its blocks are mostly opaque custom ops
EAGER_EFFICIENCY = 0.6  # a whole eager forward's fraction of the matmul ceiling
BENCH_OVERHEAD = 0.5    # pytest-benchmark's calibration and warm-up around a short benchmark
FORWARD_CALLS = 10      # calls per timed forward: compile call, calibration, warm-up, rounds (>= 5)
FAST_VARIANTS = 6       # kernel variants the fast path's inference forward compiles
TRAIN_VARIANTS = 6      # more for the training step (the backward kernels)
# Boxes the run gives to open-ended work (budgets, not estimates).
TESTS_BOX = 60.0        # the CUDA test files, -x, in this box
TUNE_BOX = 60.0         # the tuner at batch 4, GEMMs first; it checks the box before every candidate


def forward_s(card: dict, config: str, batch: int) -> float:
    return flops_per_image(PRESETS[config]) * batch / (card["matmul_tflops"] * 1e12 * EAGER_EFFICIENCY)


@dataclass
class Stage:
    """One step of the run: a pytest selection (or a command), its time box and estimate.

    Consecutive pytest stages run in one pytest process (a session), in order, sharing the
    model; the first stage of a session pays the process start, the first that needs the
    6B model pays its build."""
    name: str
    what: str
    estimate: Callable[[dict], float]
    pytest: List[str] = field(default_factory=list)  # node ids / arguments; empty for a command
    command: Optional[str] = None  # "tune" or "tests"
    needs_model: bool = True
    box_factor: float = 2.0  # the stage's box: its estimate times this, cut to what is left


def selections(smoke: bool) -> Dict[str, List[str]]:
    """The pytest node ids of each measuring stage (smoke: the CPU run's small preset at batch 1)."""
    cfg, b4 = ("small", "b1") if smoke else ("upernet", "b4")
    kernels = "benchmarks/bench_kernels.py::test_kernel"
    backbone = "benchmarks/bench_backbone.py::test_backbone"
    rows = [f"{kernels}[{k}-{b4}-triton]" for k in ("rms_norm", "residual_rms_norm", "qk_norm", "gelu")]
    return {
        "backbone": [f"{backbone}[{cfg}-{b4}-{p}]" for p in ("reference", "compile-default", "fast", "compile-fast")]
        + ["benchmarks/bench_kernels.py::test_attention"],
        "choices": [f"{kernels}[{k}-{b4}-{impl}]" for k in GEMM_CHOICES for impl in ("fused", "unfused")] + rows,
        "tuned": [f"{backbone}[{cfg}-{b4}-fast]"],
        # (fast-fp8-bf16-attn, FP8 GEMMs with bf16 attention, does not fit the window beside it:
        # the tuner times FP8 attention against bf16 SDPA op by op at batch 4)
        "fp8": [f"{backbone}[{cfg}-{b4}-fast-fp8]", "benchmarks/bench_backbone.py::test_fp8_features"],
        # smoke: the paths that give the shares (the interpreter makes each fast path ~15 s)
        "segmentation": [f"benchmarks/bench_segmentation.py::test_slide_inference[56x84-{p}]" for p in
                         ("sequential-reference", "batched-fast", "batched-fast-backbone-only",
                          "batched-fast-head-only")] if smoke else ["benchmarks/bench_segmentation.py"],
    }


ROW_KERNELS = 4  # row-kernel benchmarks in the fused-vs-unfused stage (4 kernels at batch 4)
# The fused GEMM ops measured against their unfused alternatives (cuBLAS / cuBLASLt + row
# kernels): the bf16 ones and the FP8 ones with an epilogue (whose cuBLASLt side no CPU can
# run; FP8 qkv, with nothing fused, is left to the tuner).
GEMM_CHOICES = ("linear_gelu", "linear_residual[proj]", "linear_residual[fc2]", "fp8_linear_gelu",
                "fp8_linear_residual[proj]", "fp8_linear_residual[fc2]")


def _backbone_b4(card):
    t = forward_s(card, "upernet", 4)
    paths = 4 * (FORWARD_CALLS * t + BENCH_OVERHEAD) + 4 * t  # + one profiled call each
    return (paths + COMPILE_REFERENCE + COMPILE_FAST + FAST_VARIANTS * TRITON_JIT
            + 4 * (BENCH_OVERHEAD + 0.3))  # the attention backends


def _parity(card):
    # an fp32 model (24 GB) built beside the bf16 one; fp32 runs at ~1/4 of the bf16 rate
    return 2 * MODEL_BUILD + 3 * forward_s(card, "upernet", 1) + 4 * forward_s(card, "upernet", 1)


def _fp8(card):
    # The FP8 copy built and quantized beside the bf16 model, its kernels compiled, the GEMMs
    # (85% of the block) at up to twice the bf16 rate, with FP8 attention (6 kernels); then one
    # bf16 and two FP8 forwards at batch 1 (FP8 attention and bf16 attention: the quantizer
    # more, bf16 qk_norm is the fast path's, built before).
    t = forward_s(card, "upernet", 4) * 0.6
    return MODEL_BUILD + 7 * TRITON_JIT + FORWARD_CALLS * t + BENCH_OVERHEAD + 3 * forward_s(card, "upernet", 1)


def _choices(card):
    # each fused op's kernel compiles once (the FP8 unfused sides add the GELU and residual-norm
    # row kernels; the quantizer is the fp8 stage's, in Triton's cache by then)
    gemm = 2 * len(GEMM_CHOICES) * (BENCH_OVERHEAD + 0.3) + (len(GEMM_CHOICES) + 2) * TRITON_JIT
    rows = ROW_KERNELS * (BENCH_OVERHEAD + 0.3) + 4 * TRITON_JIT
    check = 2 * len(GEMM_CHOICES) * 256 * 12800 * 3200 * 2 / (card["fp64_tflops"] * 1e12)  # float64 rows, each side
    return gemm + rows + check


def _tuned(card):
    return FAST_VARIANTS * TRITON_JIT + FORWARD_CALLS * forward_s(card, "upernet", 4) + BENCH_OVERHEAD


def _profile(card):
    return 4 * forward_s(card, "upernet", 4) + 4.0  # + the profiler's own work


def _segmentation(card):
    # 512x683: 4 windows; 1024x2048: 18; 512x512: 1. Each path: a warm call + ~5 rounds.
    # UPerHead (1536 channels on four 3200-channel levels) adds ~30% to a window's FLOPs.
    from internvit_fast.segmentation.segmentor import head_flops
    windows = 4 + 18 + 1
    head = head_flops("upernet") / flops_per_image(PRESETS["upernet"])
    per_path = 6 * windows * forward_s(card, "upernet", 1) * (1 + head) * 1.3  # batch-1 windows: below the batch-4 rate
    return 6 * per_path + 2 * 3 * 1.0  # six paths (the backbone alone, the head alone), + graph captures


def _training(card):
    step = 3 * forward_s(card, "upernet", 2) * 1.33  # forward + backward, with_cp recomputes the forward
    return 2 * (6 * step + BENCH_OVERHEAD) + TRAIN_VARIANTS * TRITON_JIT


def stages(tune: bool = True, skip_tests: bool = False, smoke: bool = False) -> List[Stage]:
    sel = selections(smoke)
    out = [
        Stage("ceilings", "device copy bandwidth and bf16 matmul rate",
              lambda c: 4.0, ["benchmarks/bench_ceilings.py"], needs_model=False),
        Stage("backbone-b4", "504x504 UPerNet batch 4: reference, torch.compile of it, fast, torch.compile of fast; "
              "SDPA backends on the fast path's layout", _backbone_b4, sel["backbone"], box_factor=1.6),
        Stage("parity", "full-size parity of the reference (SDPA, naive) and fast paths against fp32", _parity,
              ["benchmarks/bench_backbone.py::test_full_size_parity"]),
        Stage("fp8-b4", "precision='fp8': the fast FP8 backbone at batch 4, and its features against bf16",
              _fp8, sel["fp8"]),
        Stage("fused-vs-unfused-b4", "each fused GEMM (bf16 and FP8) against its unfused alternative, row kernels",
              _choices, sel["choices"], needs_model=False),
    ]
    if tune:
        out += [
            Stage("tune", "launch configurations at batch 4, GEMMs first (writes kernels/tuned/<arch>.json)",
                  lambda c: TUNE_BOX, command="tune", needs_model=False, box_factor=1.0),
            Stage("backbone-b4-tuned", "the fast path again with the tuned table", _tuned, sel["tuned"]),
        ]
    out += [
        Stage("profile", "top kernels of one reference and one fast forward", _profile,
              ["benchmarks/bench_backbone.py::test_profile"]),
        Stage("segmentation", "whole-image slide inference (512x683, 512x512, 1024x2048)", _segmentation,
              sel["segmentation"]),
        Stage("training", "one training step, reference and fast (with_cp, batch 2)", _training,
              ["benchmarks/bench_backbone.py::test_training_step[reference]",
               "benchmarks/bench_backbone.py::test_training_step[fast]"]),
    ]
    if not skip_tests:
        out.append(Stage("tests", "the kernel, model and graph tests under CUDA", lambda c: TESTS_BOX,
                         command="tests", needs_model=False, box_factor=1.0))
    return out


def sessions(all_stages: List[Stage]) -> List[List[Stage]]:
    """Consecutive pytest stages share one process; a command stage is a session of its own."""
    out: List[List[Stage]] = []
    for st in all_stages:
        if st.pytest and out and out[-1][0].pytest:
            out[-1].append(st)
        else:
            out.append([st])
    return out


def estimates(card_name: str, all_stages: List[Stage]) -> Dict[str, float]:
    """Seconds per stage on the card, with the fixed costs of its session where it pays them."""
    card = CARDS[card_name]
    out = {}
    for session in sessions(all_stages):
        built = False
        for i, st in enumerate(session):
            sec = st.estimate(card)
            if st.pytest and i == 0:
                sec += PROCESS_START
            if st.needs_model and not built:
                sec += MODEL_BUILD
                built = True
            out[st.name] = float(math.ceil(sec))
    return out


def plan(card_name: str, tune: bool = True, skip_tests: bool = False) -> Dict:
    """The stages in run order with their estimated start and seconds on ``card_name``."""
    all_stages = stages(tune, skip_tests)
    est = estimates(card_name, all_stages)
    rows, t = [], 0.0
    for st in all_stages:
        rows.append({"name": st.name, "what": st.what, "start_s": t, "seconds": est[st.name]})
        t += est[st.name]
    return {"card": card_name, "stages": rows, "total_s": t,
            "assumptions": {"process_start_s": PROCESS_START, "model_build_s": MODEL_BUILD,
                            "triton_jit_s": TRITON_JIT, "compile_reference_s": COMPILE_REFERENCE,
                            "compile_fast_s": COMPILE_FAST, "eager_efficiency": EAGER_EFFICIENCY,
                            "tune_box_s": TUNE_BOX, "tests_box_s": TESTS_BOX}}
