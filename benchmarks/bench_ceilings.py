"""The card's ceilings, measured in the same run as everything they judge: device-to-device
copy bandwidth (bytes read plus written) and a large bf16 matmul's rate. gpu_run divides
the other figures by these (fraction of copy bandwidth, fraction of the matmul ceiling)."""
import torch

from benchmarks import harness

COPY_BYTES = (1 << 30) if harness.CUDA else (1 << 22)
MATMUL_N = 8192 if harness.CUDA else 128


@harness.mark("ceilings", "kernel")
def test_copy(bench):
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=harness.DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    bench(lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    harness.record(bench, ceiling="copy", bytes=2 * COPY_BYTES)


@harness.mark("ceilings", "kernel")
def test_matmul(bench):
    n = MATMUL_N
    a = torch.randn(n, n, device=harness.DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=harness.DEVICE, dtype=torch.bfloat16)
    out = bench(lambda: a @ b)
    assert torch.isfinite(out).all()
    harness.record(bench, ceiling="matmul", flops=2 * n ** 3)
