"""Per-kernel benchmarks: each Triton kernel beside the torch ops it replaces (eager) and
torch.compile of those ops, at the segmentation shapes (rows 1297 x batch, width 3200,
fc1 to 12800). GB/s for the norms, TFLOP/s for the GEMM, next to the measured ceilings.
On CPU: the same code at tiny shapes through the interpreter (a smoke run).
"""
import pytest
import torch

from benchmarks import harness
from internvit_fast.kernels import (gelu_linear, gelu_linear_ref, qk_norm, qk_norm_ref, residual_rms_norm,
                                    residual_rms_norm_ref, rms_norm, rms_norm_ref)

if harness.CUDA:
    TOKENS, WIDTH, HIDDEN, BATCHES = 1297, 3200, 12800, [1, 2, 4, 8]
else:
    TOKENS, WIDTH, HIDDEN, BATCHES = 17, 96, 384, [1]
DT = torch.bfloat16
IMPLS = ["triton", "eager", "compiled"]


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=harness.DEVICE) * scale).to(DT)


# name -> (make inputs, triton op, torch ops, bytes moved or None, flops or None)
def _cases(batch):
    m, c, hid = TOKENS * batch, WIDTH, HIDDEN
    el = torch.finfo(DT).bits // 8
    w, g = _rand(c) + 1, _rand(c, scale=0.1)
    fc1_w, fc1_b = _rand(hid, c, scale=c ** -0.5), _rand(hid)
    return {
        "rms_norm": (lambda: (_rand(m, c),), lambda x: rms_norm(x, w, 1e-6), lambda x: rms_norm_ref(x, w, 1e-6),
                     2 * m * c * el, None),
        "qk_norm": (lambda: (_rand(m, 3 * c),), lambda t: qk_norm(t, w, w, 1e-6),
                    lambda t: qk_norm_ref(t, w, w, 1e-6), 6 * m * c * el, None),
        "residual_rms_norm": (lambda: (_rand(m, c), _rand(m, c)),
                              lambda x, y: residual_rms_norm(x, y, g, w, 1e-6),
                              lambda x, y: residual_rms_norm_ref(x, y, g, w, 1e-6), 4 * m * c * el, None),
        "gelu_linear": (lambda: (_rand(m, c),), lambda a: gelu_linear(a, fc1_w, fc1_b),
                        lambda a: gelu_linear_ref(a, fc1_w, fc1_b), None, 2 * m * c * hid),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kernel", ["rms_norm", "qk_norm", "residual_rms_norm", "gelu_linear"])
def test_kernel(benchmark, ceilings, kernel, batch, impl):
    make, ours, ref, nbytes, flops = _cases(batch)[kernel]
    # torch.compile's default mode: max-autotune's GEMM search would cost minutes of the run's box.
    fn = {"triton": ours, "eager": ref, "compiled": harness.compile_fn(ref, "default")}[impl]
    sets = harness.rotating(make, nbytes or 0)

    def measure():
        return harness.median_ms(lambda i: fn(*sets[i % len(sets)]))

    with torch.inference_mode():
        stats = benchmark.pedantic(measure, rounds=1, iterations=1)
    info = dict(stats, kernel=kernel, impl=impl, batch=batch, rows=TOKENS * batch, width=WIDTH, **ceilings)
    sec = stats["ms"] * 1e-3
    if nbytes:
        info["gbs"] = nbytes / sec / 1e9
        info["frac_copy"] = info["gbs"] / ceilings["copy_gbs"]
    if flops:
        info["tflops"] = flops / sec / 1e12
        info["frac_matmul"] = info["tflops"] / ceilings["matmul_tflops"]
    harness.record(benchmark, **info)
    assert stats["ms"] > 0
