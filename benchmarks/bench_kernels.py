"""Per-kernel benchmarks, looping over the kernel registry: each Triton kernel beside the
eager torch ops it replaces and torch.compile of those ops, and each fused op against its
unfused alternative, at the segmentation shapes (rows 1297 x batch, width 3200, MLP 12800).
One pytest-benchmark group per kernel and batch sets the implementations side by side.
Also SDPA on the fast path's q/k/v layout under each attention backend. Every timed
implementation is checked against the float64 reference on the first and last row tiles.
On CPU: the same code at tiny shapes through the interpreter (a smoke run).
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import harness
from internvit_fast import attention
from tools import costs
from internvit_fast.kernels import REGISTRY
from internvit_fast.kernels.registry import Shape, smoke_shape

if harness.CUDA:
    BATCHES = [4, 8, 1, 2]

    def shape_for(batch):
        return Shape(1297 * batch)
else:
    BATCHES = [1]

    def shape_for(batch):
        return smoke_shape()

# triton: the kernel alone; fused / unfused: a fused op and its alternative (what the tuner
# chooses between); eager: the torch ops the kernel replaces; compiled: torch.compile of those.
CASES = [(spec, b, impl) for b in BATCHES for spec in REGISTRY
         for impl in ("triton", "eager", "compiled") + (("fused", "unfused") if spec.choice else ())]


def _fn(spec, impl):
    if impl == "triton":
        return lambda inputs, outputs: spec.launch(inputs, outputs, None)
    if impl == "fused":
        return lambda inputs, outputs: spec.choice.fused(inputs)
    if impl == "unfused":
        return lambda inputs, outputs: spec.choice.unfused(inputs)
    if impl == "eager":
        return lambda inputs, outputs: spec.reference(inputs)
    # torch.compile's default mode: max-autotune's GEMM search would cost minutes of the run.
    compiled = harness.compile_fn(spec.reference, "default")
    return lambda inputs, outputs: compiled(inputs)


@pytest.mark.parametrize("spec, batch, impl", harness.params(
    CASES, [f"{s.id}-b{b}-{i}" for s, b, i in CASES], group=lambda s, b, i: f"{s.id} b{b}"))
def test_kernel(bench, spec, batch, impl):
    shape = shape_for(batch)
    least = costs.counts(spec.id, shape)[1]
    sets = harness.rotating(lambda: spec.make_inputs(shape, harness.DEVICE), least)
    sets = [(inputs, spec.new_outputs(inputs)) for inputs in sets]
    fn = _fn(spec, impl)
    # no_grad, not inference_mode: the backward kernels' references run autograd inside
    with torch.no_grad():
        target = harness.replays(fn, sets)  # the first calls compile (Triton JIT, torch.compile)
        bench(target)
        # What was timed computes the op: the kernel and both alternatives meet the parity rule.
        if impl in ("triton", "fused", "unfused"):
            inputs, outputs = sets[0]
            if impl == "triton":
                spec.launch(inputs, outputs, None)
                got, ref = outputs, spec.reference
            else:
                got, ref = getattr(spec.choice, impl)(inputs), spec.choice_reference or spec.reference
            judge = spec.choice.unfused_judge if impl == "unfused" else None  # (bf16 attention's own numerics)
            verdict = harness.spec_ok(spec, inputs, got, ref, shape.rows, judge=judge)
            assert verdict.ok, f"{spec.id} {impl}: {verdict}"
    harness.record(bench, kernel=spec.id, impl=impl, batch=batch, rows=shape.rows, width=shape.width,
                   bytes_min=least, flops=costs.counts(spec.id, shape)[2])


ATTN_BACKENDS = ["priority", "cudnn_attention", "flash_attention", "efficient_attention"] if harness.CUDA else \
    ["priority"]


@pytest.mark.parametrize("backend", harness.params([(b,) for b in ATTN_BACKENDS], ATTN_BACKENDS,
                                                   group=lambda b: "attention b4"))
def test_attention(bench, backend):
    """SDPA on the fast path's layout (q, k from one (2, B, N, C) buffer, v a view of qkv) at
    504x504 batch 4: the backend our priority picks, and each backend forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b, n, heads, d = (4, 1297, 25, 128) if harness.CUDA else (1, 17, 3, 32)
    c = heads * d
    qkv = torch.randn(b, n, 3 * c, device=harness.DEVICE, dtype=torch.bfloat16)
    qk = torch.randn(2, b, n, c, device=harness.DEVICE, dtype=torch.bfloat16)
    q, k, v = (t.view(b, n, heads, d).transpose(1, 2) for t in (qk[0], qk[1], qkv[..., 2 * c:]))
    scale = d ** -0.5
    if backend == "priority":
        def fn():
            return attention.attend(q, k, v, scale, True)
    else:
        ctx = getattr(SDPBackend, backend.upper())

        def fn():
            with sdpa_kernel([ctx]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
    with torch.inference_mode():
        try:
            fn()
        except RuntimeError as e:  # a backend that does not take these inputs on this card
            pytest.skip(f"not measured: {backend} refused the inputs ({str(e)[:120]})")
        chosen = attention.sdpa_backend(q, k, v, scale)  # after a first call: cuDNN may have failed (attention.attend)
        bench(harness.replays(fn, [()]))
        out = fn().float()
        want = attention.naive_attention(q.float(), k.float(), v.float(), scale)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    harness.record(bench, kernel="attention", impl=backend, chosen=chosen, batch=b,
                   flops=4 * b * heads * n * n * d)
