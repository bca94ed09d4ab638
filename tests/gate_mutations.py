"""Kernel pieces that reintroduce a defect the compile gate must see (imported by test_tools'
gate script; Triton's JIT needs them in a file, not in ``python -c``)."""
import triton
import triton.language as tl

from internvit_fast.kernels.gemm import meet_partial


@triton.jit
def tma_operand_tile(X, off_m, off_n, M, N, stride_xm, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr):
    """The residual tile by TMA (the layout before #22): the load's barrier is waited on before
    the tile's main loop starts."""
    desc = tl.make_tensor_descriptor(X, shape=[M, N], strides=[stride_xm, 1], block_shape=[BLOCK_M, SUB_N])
    return desc.load([off_m, off_n])


@triton.jit
def partial_then_count(P, COUNTERS, WORKSPACE, BLOCK: tl.constexpr, FENCE: tl.constexpr):
    """A tile's partial stored by every thread, then counted in by one thread's atomic, with and
    without the CTA barrier between (nothing else here uses shared memory, so Triton inserts
    no barrier of its own: in the GEMM one may happen to stand there for a layout conversion)."""
    offs = tl.arange(0, BLOCK)
    pid = tl.program_id(0)
    acc = tl.load(P + pid * BLOCK + offs)
    tl.store(WORKSPACE + pid * BLOCK + offs, acc)
    if FENCE:
        tl.debug_barrier()
    if tl.atomic_add(COUNTERS + pid // 2, 1, sem="acq_rel", scope="gpu") == 1:
        tl.store(P + pid * BLOCK + offs, acc + tl.load(WORKSPACE + (pid ^ 1) * BLOCK + offs, cache_modifier=".cg"))


@triton.jit
def meet_partial_relaxed(acc, WORKSPACE, COUNTERS, slot, mine, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stream-K's meeting with a relaxed counter: nothing orders the partial before the count."""
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    base = WORKSPACE + slot.to(tl.int64) * (2 * BLOCK_M * BLOCK_N)
    tl.store(base + mine * (BLOCK_M * BLOCK_N) + offs, acc)
    tl.debug_barrier()
    second = tl.atomic_add(COUNTERS + slot, 1, sem="relaxed", scope="gpu") == 1
    if second:
        acc += tl.load(base + (1 - mine) * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
    return acc, second


@triton.jit
def libdevice_erf(x):
    """libdevice's erff as tl.erf builds it: what test_tools checks the PTX runner against math.erf with."""
    return tl.erf(x)


@triton.jit
def meet_partial_start_poisons(acc, WORKSPACE, COUNTERS, slot, mine, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stream-K's meeting, except that a tile finished by its starting piece (mine == 0) comes
    out NaN: shows a test which piece finished each cut tile."""
    acc, second = meet_partial(acc, WORKSPACE, COUNTERS, slot, mine, BLOCK_M, BLOCK_N)
    return tl.where(second & (mine == 0), float("nan"), acc), second
