"""Per-kernel benchmarks, looping over the kernel registry: each Triton kernel beside the
eager torch ops it replaces and torch.compile of those ops, and each fused op against its
unfused alternative, at the segmentation shapes (rows 1297 x batch, width 3200, MLP 12800).
GB/s for memory-bound kernels, TFLOP/s for GEMMs, next to the ceilings measured in the
same run. Also SDPA with the fast path's q/k/v layout under each attention backend.
On CPU: the same code at tiny shapes through the interpreter (a smoke run).
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from internvit_fast import attention
from internvit_fast.kernels import REGISTRY
from internvit_fast.kernels import registry
from internvit_fast.kernels.registry import Shape, smoke_shape

if harness.CUDA:
    BATCHES = [1, 2, 4, 8]

    def shape_for(batch):
        return Shape(1297 * batch)
else:
    BATCHES = [1]

    def shape_for(batch):
        return smoke_shape()

# triton: the kernel alone; fused / unfused: a fused op and its alternative (what the tuner
# chooses between); eager: the torch ops the kernel replaces; compiled: torch.compile of those.
CASES = [(spec, b, impl) for spec in REGISTRY for b in BATCHES
         for impl in ("triton", "eager", "compiled") + (("fused", "unfused") if spec.choice else ())]


def _fn(spec, impl):
    if impl == "triton":
        return lambda inputs, outputs: spec.launch(inputs, outputs, None)
    if impl == "fused":
        return lambda inputs, outputs: spec.choice.fused(inputs)
    if impl == "unfused":
        return lambda inputs, outputs: spec.choice.unfused(inputs)
    if impl == "eager":
        return lambda inputs, outputs: spec.eager(inputs)
    # torch.compile's default mode: max-autotune's GEMM search would cost minutes of the box.
    compiled = harness.compile_fn(spec.eager, "default")
    return lambda inputs, outputs: compiled(inputs)


@pytest.mark.parametrize("spec, batch, impl", CASES, ids=[f"{s.id}-b{b}-{i}" for s, b, i in CASES])
def test_kernel(bench, ceilings, spec, batch, impl):
    shape = shape_for(batch)
    moved, least = spec.traffic(shape, None)
    flops = spec.flops(shape)
    sets = harness.rotating(lambda: spec.make_inputs(shape, harness.DEVICE), least)
    sets = [(inputs, spec.new_outputs(inputs)) for inputs in sets]
    fn = _fn(spec, impl)
    # no_grad, not inference_mode: the backward kernels' references run autograd inside
    with torch.no_grad():
        target = harness.replays(fn, sets)
        iterations = harness.iterations_for(harness.estimate_ms(target))
        bench.pedantic(target, rounds=20 if harness.CUDA else 2, warmup_rounds=3 if harness.CUDA else 1,
                       iterations=iterations)
    # What was timed computes the op: the kernel and both alternatives meet the parity rule.
    if impl in ("triton", "fused", "unfused"):
        inputs, outputs = sets[0]
        got = registry.run(spec, inputs) if impl == "triton" else getattr(spec.choice, impl)(inputs)
        ref = spec.reference if impl == "triton" else (spec.choice_reference or spec.reference)
        assert harness.parity_ok(got, inputs, ref), f"{spec.id} {impl}: wrong result"
    ms = harness.median_ms(bench)
    info = dict(kernel=spec.id, impl=impl, batch=batch, rows=shape.rows, width=shape.width, ms=ms,
                iterations=iterations, bytes_min=least, **ceilings)
    if flops:
        info["tflops"] = flops / (ms * 1e-3) / 1e12
        info["frac_matmul"] = info["tflops"] / ceilings["matmul_tflops"]
    else:
        info["gbs"] = least / (ms * 1e-3) / 1e9
        info["frac_copy"] = info["gbs"] / ceilings["copy_gbs"]
    harness.record(bench, **info)


ATTN_BACKENDS = ["priority", "cudnn_attention", "flash_attention", "efficient_attention"] if harness.CUDA else \
    ["priority"]


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention(bench, ceilings, backend):
    """SDPA on the fast path's layout (q, k from one (2, B, N, C) buffer, v a view of qkv) at
    504x504 batch 4: the backend our priority picks, and each backend forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b, n, heads, d = (4, 1297, 25, 128) if harness.CUDA else (1, 17, 3, 32)
    c = heads * d
    qkv = torch.randn(b, n, 3 * c, device=harness.DEVICE, dtype=torch.bfloat16)
    qk = torch.randn(2, b, n, c, device=harness.DEVICE, dtype=torch.bfloat16)
    q, k, v = (t.view(b, n, heads, d).transpose(1, 2) for t in (qk[0], qk[1], qkv[..., 2 * c:]))
    scale = d ** -0.5
    chosen = attention.sdpa_backend(q, k, v, scale)
    if backend == "priority":
        def fn():
            return attention.attend(q, k, v, scale, True)
    else:
        ctx = getattr(SDPBackend, backend.upper())

        def fn():
            with sdpa_kernel([ctx]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
    try:
        with torch.inference_mode():
            fn()
            target = harness.replays(lambda: fn(), [()])
            bench.pedantic(target, rounds=20 if harness.CUDA else 2, warmup_rounds=2, iterations=10 if harness.CUDA
                           else 1)
    except RuntimeError as e:  # a backend that does not take these inputs on this card
        pytest.skip(f"not measured: {backend} refused the inputs ({str(e)[:120]})")
    with torch.inference_mode():
        out = fn().float()
        want = attention.naive_attention(q.float(), k.float(), v.float(), scale)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    ms = harness.median_ms(bench)
    flops = 4 * b * heads * n * n * d
    harness.record(bench, kernel="attention", impl=backend, chosen=chosen, batch=b, ms=ms,
                   tflops=flops / (ms * 1e-3) / 1e12, **ceilings)
