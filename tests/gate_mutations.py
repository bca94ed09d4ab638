"""Kernel pieces that reintroduce a defect the compile gate must see (imported by test_tools'
gate script; Triton's JIT needs them in a file, not in ``python -c``)."""
import triton
import triton.language as tl


@triton.jit
def tma_operand_tile(X, off_m, off_n, M, N, stride_xm, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr):
    """The residual tile by TMA (the layout before #22): the load's barrier is waited on before
    the tile's main loop starts."""
    desc = tl.make_tensor_descriptor(X, shape=[M, N], strides=[stride_xm, 1], block_shape=[BLOCK_M, SUB_N])
    return desc.load([off_m, off_n])
