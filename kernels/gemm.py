"""The block's linear layers as one persistent GEMM with a fused epilogue.

    y = epilogue(round(a @ w^T + b))            a: (M, K), w: (N, K) nn.Linear weight, b: (N,)

    EPI_GELU       (fc1):       y = round(GELU(h)),                  exact erf GELU
    EPI_RESIDUAL   (proj, fc2): y = round(x + round(gamma * h))      the new residual stream
    EPI_GELU_GRAD  (fc1's input gradient in training): y = round(h * GELU'(x)), w given (K, N)
    EPI_NONE:                   y = h

``round`` is to the activation dtype at the points where upstream's eager ops round:
nn.Linear's output (bias added in fp32, as cuBLAS's epilogue does), LayerScale's product,
the residual sum. The residual epilogue therefore gives the reference path's residual
stream bit for bit for the same GEMM result; it is built without FMA contraction.

How it runs, as Triton's tutorial 09 (persistent matmul) builds it on sm_90: one program
per SM loops over output tiles; operands arrive through TMA tensor descriptors into a
software pipeline of ``num_stages`` and feed ``wgmma``; bias, gamma and the residual tile
are loaded before each tile's main loop; the epilogue works on ``EPI_SPLIT`` column
sub-tiles to keep register pressure below spilling. Tiles are visited in groups of about
GROUP_M row-tiles that sweep the column-tiles together (their weight tiles are shared
through L2); the groups are balanced, so no last group of one row-tile re-streams the
whole weight alone. sm_80 (and operands TMA cannot take: rows not 16-byte aligned) runs
the same kernel with pointer loads, which Triton pipelines with cp.async.

FP8 (``SCALED``, kernels/fp8.py): a and w are e4m3 with fp32 power-of-two scales, a's per
1 x 128 group along K (A_SCALE (M, K/128)), w's per 128 x 128 block (W_SCALE (N/128, K/128)).
Each main-loop step's product is accumulated separately and added to the fp32 accumulator
times its two scales, once per 128 of K at the most (DeepSeek-V3's promotion: the tensor
cores' own FP8 accumulation keeps about 14 bits). ``QUANT_OUT`` (fc1): the epilogue's
output, rounded to the activation dtype first, is written as e4m3 with its 1 x 128 scales
(Y_SCALE), exactly as the quantizing row kernel would write it; a 128-column group is one
epilogue sub-tile.

``plan_linear`` is the launch decision (configuration from the tuned table or the
defaults below, TMA or pointers, grid); ``linear_launch`` checks the inputs and runs it.
The ops that use it (fc1 + GELU, proj/fc2 + residual + the next norm) are in block_ops.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import FLOAT_DTYPES, FP8, FP8_GROUP, INTERPRET, groups, cast, check_tensors, fp8_quantize_groups, on_device
from .gelu import gelu_grad, gelu_value
from .launch import Desc, LaunchPlan, Meta, Target, lookup, table_key

EPI_NONE = tl.constexpr(0)
EPI_GELU = tl.constexpr(1)
EPI_RESIDUAL = tl.constexpr(2)
EPI_GELU_GRAD = tl.constexpr(3)
EPILOGUES = {"none": EPI_NONE.value, "gelu": EPI_GELU.value, "residual": EPI_RESIDUAL.value,
             "gelu_grad": EPI_GELU_GRAD.value}
# The tuned table's name for each epilogue's GEMM.
TABLE_NAME = {"gelu": "linear_gelu", "residual": "linear_residual", "none": "linear",
              "gelu_grad": "linear_gelu_grad"}

# Launch configurations before tuning, chosen so the sm_90 build keeps its main loop free
# of spills (python -m tools.gate). sm_90, fc1 and proj/fc2: two CTAs per
# SM, each 4 warps (one warpgroup) on 128x128x64 tiles with 3 stages (112 KB of shared
# memory, 255 registers: two fit an SM exactly, which the gate checks), so one CTA's
# epilogue runs under the other's main loop. The cost model (costs.gemm_us, from the
# builds' SASS) predicts this 15% faster for fc1 and 9% for proj than one 8-warp CTA per
# SM (128x256 for fc1, whose GELU epilogue would otherwise stall the tensor cores ~15% of
# each tile); the tuner measures both. Stream-K on top (at 504x504 batch 4, fc1's 4100 tiles
# are 15.5 rounds of 264 programs, proj's and fc2's 1025 are 3.9: round-robin, the last
# round leaves 3% of the SMs' time idle; the model: fc1 and fc2 547 us instead of 561 on an
# H100); the tuner measures it against the same tiles without. sm_80: 128x128x32, 4 stages,
# fits the A100's shared memory. fp32 runs full-precision FMA ("ieee": torch's default has no TF32) with small
# tiles and pointer loads (through TMA the FMA loop spilled 368 bytes on sm_90). The
# interpreter gets tiny tiles (it runs programs one by one), split epilogues, small groups
# and stream-K, so the CPU tests cover them.
CONFIGS = {
    ("sm90", "gelu"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SPLIT=2, num_warps=4,
                           num_stages=3, CTAS_PER_SM=2, STREAM_K=True),
    ("sm90", "residual"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SPLIT=2, num_warps=4,
                               num_stages=3, CTAS_PER_SM=2, STREAM_K=True),
    ("sm80", "gelu"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=2, num_warps=8,
                           num_stages=4),
    ("sm80", "residual"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=2, num_warps=8,
                               num_stages=4),
    ("fp32", "gelu"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=1, num_warps=4,
                           num_stages=3, USE_TMA=False),
    ("fp32", "residual"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=1, num_warps=4,
                               num_stages=3, USE_TMA=False),
    ("interpreter", "gelu"): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, EPI_SPLIT=2, num_warps=4,
                                  num_stages=1, STREAM_K=True),
    ("interpreter", "residual"): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, EPI_SPLIT=2,
                                      num_warps=4, num_stages=1, STREAM_K=True),
}
for _arch in ("interpreter", "sm90", "sm80", "fp32"):  # a plain GEMM and fc1's backward: fc1's shapes
    CONFIGS[_arch, "none"] = CONFIGS[_arch, "gelu_grad"] = CONFIGS[_arch, "gelu"]
# fc1's backward (GELU's derivative in the epilogue, its operand a second tile): at 128x256
# the sm_90 build spilled 184 bytes after the main loop, two CTAs of 4 warps 96 bytes; one
# 8-warp CTA of 128x128 does not spill.
CONFIGS["sm90", "gelu_grad"] = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SPLIT=2, num_warps=8,
                                    num_stages=4)


def linear_ref(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], epilogue: str = "none",
               gamma: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch: the eager ops the kernel replaces (nn.Linear, then nn.GELU or LayerScale + add)."""
    h = F.linear(a, weight, bias)
    if epilogue == "gelu":
        return F.gelu(h)
    if epilogue == "residual":
        return residual + (h if gamma is None else (h.float() * gamma.float()).to(h.dtype))
    return h


# --- the kernel --------------------------------------------------------------------------

@triton.jit
def tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row-tile, column-tile) of ``tile`` in grouped order with balanced groups.

    The row-tiles are cut into cdiv(num_pid_m, GROUP_M) groups whose sizes differ by at
    most one (41 row-tiles in groups of at most 8: 7,7,7,7,7,6, not 8,8,8,8,8,1). Inside a
    group, consecutive tiles walk down the group's rows, then to the next column-tile:
    the programs running at one time share weight tiles in L2.
    """
    n_groups = tl.cdiv(num_pid_m, GROUP_M)
    small = num_pid_m // n_groups  # rows of the smaller groups; the first n_big have one more
    n_big = num_pid_m - small * n_groups
    big_tiles = n_big * (small + 1) * num_pid_n
    in_big = tile < big_tiles
    size = tl.where(in_big, small + 1, small)
    t = tl.where(in_big, tile, tile - big_tiles)
    g = t // (size * num_pid_n)
    first = tl.where(in_big, g * (small + 1), n_big * (small + 1) + g * small)
    local = t - g * size * num_pid_n
    return first + local % size, local // size


@triton.jit
def _vector(P, cols, N):
    """A (cols,) slice of an (N,) parameter, in fp32."""
    return tl.load(P + cols, mask=cols < N, other=0.0).to(tl.float32)


@triton.jit
def operand_tile(X, off_m, off_n, M, N, stride_xm, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr):
    """A (BLOCK_M, SUB_N) tile of X in its own dtype, by pointer loads. Issued before the main
    loop, nothing waits for them until the epilogue reads them; a TMA load would first wait on
    its barrier, a DRAM round trip before the tile's first MMA (the gate counts such waits)."""
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, SUB_N)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    return tl.load(X + rm[:, None].to(tl.int64) * stride_xm + rn[None, :], mask=mask, other=0.0)


@triton.jit
def _scaled_product(acc, a, b, A_SCALE, W_SCALE, off_m, off_n, k0, M, N, K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + (a @ b) * scale_a * scale_w for the K-step at k0 of an FP8 GEMM (BLOCK_K divides
    128: the step lies in one scale group). The scales are powers of two: the multiply is
    exact, the add rounds once; an explicit fma (one instruction per element where a
    multiply and an add would be two: the residual epilogue's build has contraction off)."""
    g = k0 // 128
    k_groups = tl.cdiv(K, 128)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    sa = tl.load(A_SCALE + rm.to(tl.int64) * k_groups + g, mask=rm < M, other=0.0)
    sw = tl.load(W_SCALE + (rn // 128) * k_groups + g, mask=rn < N, other=0.0)
    return tl.fma(tl.dot(a, b), sa[:, None] * sw[None, :], acc)


@triton.jit
def _finish(acc, x, bias, gamma, Y, Y_SCALE, off_m, off_n, M, N, stride_ym, BLOCK_M: tl.constexpr,
            SUB_N: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
            USE_TMA: tl.constexpr, QUANT_OUT: tl.constexpr, ACT: tl.constexpr):
    """The epilogue of one (BLOCK_M, SUB_N) sub-tile: bias, rounding, GELU or residual, store
    (QUANT_OUT: SUB_N = 128, one scale group per row, stored as e4m3 and scales)."""
    if QUANT_OUT:  # the activation dtype by its code (ACT_CODES): what the output rounds to first
        if ACT == 1:
            ty = tl.bfloat16
        elif ACT == 2:
            ty = tl.float16
        else:
            ty = tl.float32
    elif USE_TMA:
        ty = Y.dtype
    else:
        ty = Y.dtype.element_ty
    h = acc
    if HAS_BIAS:
        h += bias[None, :]
    h = cast(h, ty).to(tl.float32)  # nn.Linear's output in the activation dtype
    if EPILOGUE == EPI_GELU:
        y = gelu_value(h)
    elif EPILOGUE == EPI_GELU_GRAD:
        y = h * gelu_grad(x.to(tl.float32))  # x: the pre-activation tile
    elif EPILOGUE == EPI_RESIDUAL:
        if HAS_GAMMA:
            h = cast(h * gamma[None, :], ty).to(tl.float32)  # LayerScale rounds its product
        y = x.to(tl.float32) + h
    else:
        y = h
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, SUB_N)
    if QUANT_OUT:
        # Columns past N (the pointer path wraps them onto real ones) stay out of the group's max.
        u = tl.where(rn[None, :] < N, cast(y, ty).to(tl.float32), 0.0)
        out, scale = fp8_quantize_groups(u)
        # A sub-tile wholly past N (the second half of a last column tile) stores no scale. (The
        # column test as a tensor: triton 3.9's interpreter refuses a scalar-and-tensor mask.)
        tl.store(Y_SCALE + rm.to(tl.int64) * tl.cdiv(N, 128) + off_n // 128, scale,
                 mask=(rm < M) & (rm * 0 + off_n < N))
    else:
        out = cast(y, ty)
    if USE_TMA:
        Y.store([off_m, off_n], out)
    else:
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], out, mask=mask)


@triton.jit
def _epilogue(acc, x0, x1, bias0, bias1, gamma0, gamma1, X, Y, Y_SCALE, off_m, off_n, M, N, stride_xm, stride_ym,
              BLOCK_M: tl.constexpr, SUB_N: tl.constexpr, EPI_SPLIT: tl.constexpr, EPILOGUE: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, USE_TMA: tl.constexpr, QUANT_OUT: tl.constexpr,
              ACT: tl.constexpr):
    """A finished tile's epilogue over its EPI_SPLIT column sub-tiles (x, bias, gamma per
    sub-tile; the gelu_grad operand is loaded here, one sub-tile at a time: loaded before the
    main loop it spilled)."""
    if EPILOGUE == EPI_GELU_GRAD:
        x0 = operand_tile(X, off_m, off_n, M, N, stride_xm, BLOCK_M, SUB_N)
    if EPI_SPLIT == 2:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
        if EPILOGUE == EPI_GELU_GRAD:
            x1 = operand_tile(X, off_m, off_n + SUB_N, M, N, stride_xm, BLOCK_M, SUB_N)
        _finish(acc0, x0, bias0, gamma0, Y, Y_SCALE, off_m, off_n, M, N, stride_ym, BLOCK_M, SUB_N, EPILOGUE,
                HAS_BIAS, HAS_GAMMA, USE_TMA, QUANT_OUT, ACT)
        _finish(acc1, x1, bias1, gamma1, Y, Y_SCALE, off_m, off_n + SUB_N, M, N, stride_ym, BLOCK_M, SUB_N,
                EPILOGUE, HAS_BIAS, HAS_GAMMA, USE_TMA, QUANT_OUT, ACT)
    else:
        _finish(acc, x0, bias0, gamma0, Y, Y_SCALE, off_m, off_n, M, N, stride_ym, BLOCK_M, SUB_N, EPILOGUE,
                HAS_BIAS, HAS_GAMMA, USE_TMA, QUANT_OUT, ACT)


def cuts_tiles(tiles: int, programs: int, k: int, block_k: int) -> bool:
    """Whether stream-K cuts a tile (stream_k_ranges): more tiles than programs, not a whole
    number of rounds of them, and more than one K-step per tile (else every program's range
    is whole tiles). Where it does not, the kernel never touches the workspace or counters."""
    return tiles > programs and tiles % programs != 0 and k > block_k


@triton.jit
def stream_k_ranges(num_tiles, k_tiles, pid, PROGRAMS: tl.constexpr):
    """Program pid's share of the tiles under stream-K: (dp_tiles, dp_units, sk_lo, sk_hi, units).

    When the tiles are not a whole number of rounds of the grid, the last
    (num_tiles mod PROGRAMS) + PROGRAMS of them are dealt out as equal contiguous ranges of
    their K-steps, [sk_lo, sk_hi) for program pid: each range holds at least one tile's steps,
    so a tile has at most two pieces, whose edge is the edge between two programs' ranges.
    The tiles before them (dp_tiles, whole rounds) go round-robin as without stream-K:
    dp_units of them to this program; ``units`` counts its whole tiles and pieces."""
    rem = num_tiles % PROGRAMS
    split = (rem != 0) & (num_tiles > PROGRAMS)
    dp_tiles = tl.where(split, num_tiles - rem - PROGRAMS, num_tiles)
    steps = tl.where(split, rem + PROGRAMS, 0).to(tl.int64) * k_tiles
    sk_lo = (pid * steps // PROGRAMS).to(tl.int32)
    sk_hi = ((pid + 1) * steps // PROGRAMS).to(tl.int32)
    dp_units = tl.cdiv(dp_tiles - pid, PROGRAMS)
    units = dp_units + tl.where(sk_hi > sk_lo, (sk_hi - 1) // k_tiles - sk_lo // k_tiles + 1, 0)
    return dp_tiles, dp_units, sk_lo, sk_hi, units


@triton.jit
def work_unit(u, pid, dp_units, sk_lo, sk_hi, dp_tiles, k_tiles, PROGRAMS: tl.constexpr):
    """Stream-K: (tile, first K-step, end K-step) of a program's u-th unit of work. The first
    ``dp_units`` are whole tiles, pid + u * PROGRAMS (the data-parallel rounds); then the
    program's contiguous range [sk_lo, sk_hi) of the remaining tiles' K-steps, numbered tile
    after tile, cut at tile edges: a whole tile, or a piece of one whose other piece is the
    neighbouring program's."""
    t_sk = sk_lo // k_tiles + (u - dp_units)
    dp = u < dp_units
    tile = tl.where(dp, pid + u * PROGRAMS, dp_tiles + t_sk)
    k_lo = tl.where(dp, 0, tl.maximum(sk_lo - t_sk * k_tiles, 0))
    k_hi = tl.where(dp, k_tiles, tl.minimum(sk_hi - t_sk * k_tiles, k_tiles))
    return tile, k_lo, k_hi


@triton.jit
def meet_partial(acc, WORKSPACE, COUNTERS, slot, mine, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A piece of a split tile: store its fp32 partial sum in its half of the tile's workspace
    slot and count it in. Returns (acc plus the other piece's, True) to the piece counted
    second, which finishes the tile; (acc, False) to the first. Nothing waits for the other
    program, so no order of running programs can deadlock; fp32 addition commutes, so the sum
    is the same bits whichever piece comes second."""
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    base = WORKSPACE + slot.to(tl.int64) * (2 * BLOCK_M * BLOCK_N)
    tl.store(base + mine * (BLOCK_M * BLOCK_N) + offs, acc)
    # The counter's atomic is one thread's: without a CTA barrier, the other threads' stores
    # above need not be visible when its release is (the gate checks the barrier is there).
    tl.debug_barrier()
    second = tl.atomic_add(COUNTERS + slot, 1, sem="acq_rel", scope="gpu") == 1
    if second:  # (.cg: from L2, past this SM's L1)
        acc += tl.load(base + (1 - mine) * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
    return acc, second


@triton.jit
def _linear_kernel(
    A,  # (M, K) activations: TMA descriptor, block [BLOCK_M, BLOCK_K]; or pointer, row stride stride_am
    W,  # (N, K) weight: descriptor, block [BLOCK_N, BLOCK_K]; or pointer, row stride stride_wn.
        # W_KN: (K, N) instead (a weight used transposed, as in a backward), block [BLOCK_K, BLOCK_N]
    X,  # (M, N) residual stream (EPILOGUE 2) or pre-activation (EPILOGUE 3): descriptor,
        # block [BLOCK_M, BLOCK_N // EPI_SPLIT]; or pointer
    Y,  # (M, N) output: descriptor like X; or pointer, row stride stride_ym
    BIAS,  # (N,) (HAS_BIAS)
    GAMMA,  # (N,) LayerScale (HAS_GAMMA)
    A_SCALE,  # SCALED: (M, cdiv(K, 128)) fp32, contiguous
    W_SCALE,  # SCALED: (cdiv(N, 128), cdiv(K, 128)) fp32, contiguous
    Y_SCALE,  # QUANT_OUT: (M, cdiv(N, 128)) fp32, contiguous
    WORKSPACE,  # STREAM_K: (PROGRAMS, 2, BLOCK_M * BLOCK_N) fp32, the split tiles' partial sums
    COUNTERS,  # STREAM_K: (PROGRAMS,) int32, zeros: pieces of each split tile counted in
    M, N, K,
    stride_am, stride_wn, stride_xm, stride_ym,  # pointer path only; unit column strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-tiles per group (see tile_coords)
    EPI_SPLIT: tl.constexpr,  # 1 or 2 column sub-tiles in the epilogue
    PROGRAMS: tl.constexpr,  # the persistent grid (SMs x CTAS_PER_SM): program p runs tiles p, p + PROGRAMS, ...
    FLATTEN: tl.constexpr,  # let Triton's pipeliner flatten the tile loop into the main loop (next tile's loads overlap the epilogue)
    EPILOGUE: tl.constexpr,  # EPI_NONE, EPI_GELU, EPI_RESIDUAL or EPI_GELU_GRAD (times GELU' at X)
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    USE_TMA: tl.constexpr,
    EVEN_K: tl.constexpr,  # pointer path: K % BLOCK_K == 0, no mask in the main loop
    DOT_PRECISION: tl.constexpr,
    W_KN: tl.constexpr = False,
    SCALED: tl.constexpr = False,  # FP8 operands with group scales
    QUANT_OUT: tl.constexpr = False,  # e4m3 output with 1 x 128 scales (SUB_N == 128)
    ACT: tl.constexpr = 0,  # QUANT_OUT: the activation dtype rounded to before quantizing (ACT_CODES)
    STREAM_K: tl.constexpr = False,  # the last round and a half of tiles shared out by K-steps (see plan_linear)
    REVERSE_PROGRAMS: tl.constexpr = False,  # tests: program p does program (grid - 1 - p)'s work
):
    SUB_N: tl.constexpr = BLOCK_N // EPI_SPLIT
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    pid = tl.program_id(0)
    if REVERSE_PROGRAMS:  # (the interpreter runs programs in order: this makes split tiles' pieces meet the other way)
        pid = tl.num_programs(0) - 1 - pid
    if STREAM_K:
        dp_tiles, dp_units, sk_lo, sk_hi, units = stream_k_ranges(num_tiles, k_tiles, pid, PROGRAMS)
    else:
        units = tl.cdiv(num_tiles - pid, PROGRAMS)
    for u in tl.range(0, units, flatten=FLATTEN):
        if STREAM_K:
            tile, k_lo, k_hi = work_unit(u, pid, dp_units, sk_lo, sk_hi, dp_tiles, k_tiles, PROGRAMS)
            whole = (k_lo == 0) & (k_hi == k_tiles)
        else:
            tile = pid + u * PROGRAMS
            k_lo = 0
            k_hi = k_tiles
            whole = True
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # The epilogue's operands first: their loads complete while the main loop runs.
        # (An absent operand is stood in for by `cols`, which its flag keeps unread. Both
        # pieces of a cut tile load them, not knowing which will finish it: a load after the
        # meeting would put a DRAM round trip before the finishing piece's epilogue.)
        cols = off_n + tl.arange(0, SUB_N)
        bias0, gamma0, x0 = cols, cols, cols
        bias1, gamma1, x1 = cols, cols, cols
        if HAS_BIAS:
            bias0 = _vector(BIAS, cols, N)
        if HAS_GAMMA:
            gamma0 = _vector(GAMMA, cols, N)
        if EPILOGUE == EPI_RESIDUAL:  # (the gelu_grad operand waits for the epilogue)
            x0 = operand_tile(X, off_m, off_n, M, N, stride_xm, BLOCK_M, SUB_N)
        if EPI_SPLIT == 2:
            if HAS_BIAS:
                bias1 = _vector(BIAS, cols + SUB_N, N)
            if HAS_GAMMA:
                gamma1 = _vector(GAMMA, cols + SUB_N, N)
            if EPILOGUE == EPI_RESIDUAL:
                x1 = operand_tile(X, off_m, off_n + SUB_N, M, N, stride_xm, BLOCK_M, SUB_N)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            # Out-of-range rows, columns and K are zero-filled by the copy engine.
            for ki in range(k_lo, k_hi):
                a = A.load([off_m, ki * BLOCK_K])
                if W_KN:
                    b = W.load([ki * BLOCK_K, off_n])
                else:
                    b = W.load([off_n, ki * BLOCK_K]).T
                if INTERPRET:  # the interpreter's bf16 dot is wrong; the GPU keeps bf16 MMAs
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if SCALED:
                    acc = _scaled_product(acc, a, b, A_SCALE, W_SCALE, off_m, off_n, ki * BLOCK_K, M, N, K,
                                          BLOCK_M, BLOCK_N)
                else:
                    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            # Out-of-range rows/columns wrap onto valid ones for the loads (their results are
            # never stored): no padding copy and no row mask in the main loop.
            rm = (off_m + tl.arange(0, BLOCK_M)) % M
            rn = (off_n + tl.arange(0, BLOCK_N)) % N
            rk = tl.arange(0, BLOCK_K)
            a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + (k_lo * BLOCK_K + rk)[None, :]
            if W_KN:
                w_ptrs = W + (k_lo * BLOCK_K + rk)[:, None].to(tl.int64) * stride_wn + rn[None, :]
                w_step = BLOCK_K * stride_wn  # (BLOCK_K, BLOCK_N) of w per step
            else:
                w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + (k_lo * BLOCK_K + rk)[:, None]
                w_step = BLOCK_K  # (BLOCK_K, BLOCK_N) of w^T per step
            for ki in range(k_lo, k_hi):
                if EVEN_K:
                    a = tl.load(a_ptrs)
                    b = tl.load(w_ptrs)
                else:
                    k_left = K - ki * BLOCK_K
                    a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
                    b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
                if INTERPRET:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                if SCALED:
                    acc = _scaled_product(acc, a, b, A_SCALE, W_SCALE, off_m, off_n, ki * BLOCK_K, M, N, K,
                                          BLOCK_M, BLOCK_N)
                else:
                    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K
                w_ptrs += w_step

        if STREAM_K:
            finish = whole
            if not whole:
                # The piece that starts the tile ends program pid's range: slot pid (the edge
                # between programs pid and pid + 1); the one that ends it starts the range: slot pid - 1.
                mine = (k_lo > 0).to(tl.int32)
                acc, finish = meet_partial(acc, WORKSPACE, COUNTERS, pid - mine, mine, BLOCK_M, BLOCK_N)
            if finish:
                _epilogue(acc, x0, x1, bias0, bias1, gamma0, gamma1, X, Y, Y_SCALE, off_m, off_n, M, N, stride_xm,
                          stride_ym, BLOCK_M, SUB_N, EPI_SPLIT, EPILOGUE, HAS_BIAS, HAS_GAMMA, USE_TMA, QUANT_OUT, ACT)
        else:
            _epilogue(acc, x0, x1, bias0, bias1, gamma0, gamma1, X, Y, Y_SCALE, off_m, off_n, M, N, stride_xm,
                      stride_ym, BLOCK_M, SUB_N, EPI_SPLIT, EPILOGUE, HAS_BIAS, HAS_GAMMA, USE_TMA, QUANT_OUT, ACT)


# --- the launch plan and the launcher ------------------------------------------------------------

# FP8 (e4m3 operands, BLOCK_K dividing the 128-wide scale groups; fc1's quantized output
# needs 128-column epilogue sub-tiles). sm_90: 128x128x128 tiles, 8 warps, 4 stages (128 KB
# of operand buffers), one CTA per SM: each step's product is a second 128x128 fp32 tile
# beside the accumulator, and one warpgroup holding both spilled 99 instructions' worth in
# the main loop (the gate's reading, triton 3.6). The interpreter: a 128-wide
# tile for the quantized output, 64-deep K steps so two share a scale group.
FP8_CONFIGS = {
    "sm90": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, EPI_SPLIT=1, num_warps=8, num_stages=4),
    # fp32 activations: the residual tile in fp32 beside the two accumulators spilled 208 bytes
    # at 128 rows; 64 rows do not spill.
    "sm90_fp32": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, EPI_SPLIT=1, num_warps=4, num_stages=4),
    "sm89": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SPLIT=1, num_warps=8, num_stages=3),
    "interpreter": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=2, EPI_SPLIT=1, num_warps=4, num_stages=1),
}
# The activation dtype's code for the kernel's ACT (what a quantized output rounds to first).
ACT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def default_config(target: Target, epilogue: str, dtype: torch.dtype, act_dtype: Optional[torch.dtype] = None) -> dict:
    if dtype == FP8:
        if target.arch == "interpreter":
            return FP8_CONFIGS["interpreter"]
        if target.hopper:
            return FP8_CONFIGS["sm90_fp32" if act_dtype == torch.float32 else "sm90"]
        return FP8_CONFIGS["sm89"]
    if target.arch == "interpreter":
        return CONFIGS["interpreter", epilogue]
    if dtype == torch.float32:
        return CONFIGS["fp32", epilogue]
    return CONFIGS["sm90" if target.hopper else "sm80", epilogue]


def plan_linear(a: Meta, w: Meta, out: Meta, epilogue: str, target: Target, x: Optional[Meta] = None,
                bias: Optional[Meta] = None, gamma: Optional[Meta] = None, weight_kn: bool = False,
                config: Optional[dict] = None, a_scale: Optional[Meta] = None, w_scale: Optional[Meta] = None,
                out_scale: Optional[Meta] = None, act_dtype: Optional[torch.dtype] = None) -> LaunchPlan:
    """The GEMM's launch for a (M, K) @ w (N, K) (or (K, N) when ``weight_kn``) into out
    (M, N), ``x`` the residual stream or pre-activation of the epilogue. The configuration:
    ``config`` (the tuner's), else the card's tuned table, else the defaults above; TMA where
    the card and every operand allow it; CTAS_PER_SM programs per SM (1 unless tuned; 2 lets
    one CTA's epilogue run under the other's main loop), striding over the tiles. PROGRAMS is
    fixed by the card, not the shape, so every shape shares one build. FP8: ``a_scale`` and
    ``w_scale`` given (a and w e4m3), ``out_scale`` for an e4m3 output, ``act_dtype`` the
    activation dtype (the epilogue's rounding points). An FP8 GEMM's table key carries the
    activation dtype (its operands are e4m3 whatever the model's dtype): fp32 activations
    need their own tiles."""
    m, k = a.shape
    n = w.shape[1] if weight_kn else w.shape[0]
    scaled, quant_out = a_scale is not None, out_scale is not None
    key = table_key(("fp8_" if scaled else "") + TABLE_NAME[epilogue], M=m, N=n, K=k,
                    dtype=(act_dtype or out.dtype) if scaled else a.dtype)
    entry = lookup(target, key)
    cfg = dict(config or (entry or {}).get("config") or default_config(target, epilogue, a.dtype,
                                                                                    act_dtype or out.dtype))
    want_tma = cfg.pop("USE_TMA", True)
    operands = [a, w, out] + ([x] if x is not None else [])
    tma_card = target.hopper or target.arch == "interpreter"  # the interpreter emulates descriptors
    use_tma = bool(want_tma) and tma_card and all(o.tma_ok() for o in operands)
    bm, bn, bk, split = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("EPI_SPLIT")
    warps, stages, group = cfg.pop("num_warps"), cfg.pop("num_stages"), cfg.pop("GROUP_M")
    ctas, flatten = cfg.pop("CTAS_PER_SM", 1), cfg.pop("FLATTEN", False)
    stream_k, reverse = cfg.pop("STREAM_K", False), cfg.pop("REVERSE_PROGRAMS", False)
    if cfg:
        raise ValueError(f"linear: unknown launch settings {sorted(cfg)}")
    if stream_k and flatten:
        raise ValueError("linear: STREAM_K and FLATTEN are not built together")
    if scaled and FP8_GROUP % bk:
        raise ValueError(f"linear: an FP8 GEMM's BLOCK_K must divide the {FP8_GROUP}-wide scale groups, got {bk}")
    if quant_out and bn // split != FP8_GROUP:
        raise ValueError(f"linear: a quantized output needs {FP8_GROUP}-column epilogue sub-tiles, "
                         f"got BLOCK_N={bn} / EPI_SPLIT={split}")
    x_slot = x if x is not None else out
    if use_tma:
        tensors = dict(A=Desc(a, (bm, bk)), W=Desc(w, (bk, bn) if weight_kn else (bn, bk)),
                       X=x_slot, Y=Desc(out, (bm, bn // split)))
    else:
        tensors = dict(A=a, W=w, X=x_slot, Y=out)
    flags = dict(EPILOGUE=EPILOGUES[epilogue], HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None,
                 W_KN=weight_kn, SCALED=scaled, QUANT_OUT=quant_out)
    flags["ACT"] = ACT_CODES[act_dtype] if quant_out else 0  # (every constexpr given: triton 3.9's AOT signature)
    # Stream-K's workspace: a slot per edge between neighbouring programs' ranges (the one tile
    # that may straddle it), each with both pieces' fp32 partial sums, and a counter per slot;
    # one unused element of each where no tile is cut (the same pointer types: the same binary).
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    cut = stream_k and cuts_tiles(tiles, ctas * target.sms, k, bk)
    slots = max(ctas * target.sms - 1, 1) if cut else 1
    args = dict(tensors, BIAS=bias if bias is not None else w, GAMMA=gamma if gamma is not None else w,
                A_SCALE=a_scale if scaled else a, W_SCALE=w_scale if scaled else a,
                Y_SCALE=out_scale if quant_out else a,
                WORKSPACE=Meta.contiguous((slots, 2, bm * bn) if cut else (1,), torch.float32) if stream_k else a,
                COUNTERS=Meta.contiguous((slots,), torch.int32) if stream_k else a,
                M=m, N=n, K=k, stride_am=a.stride[0], stride_wn=w.stride[0],
                stride_xm=x.stride[0] if x is not None else 0, stride_ym=out.stride[0])
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, EPI_SPLIT=split,
                      PROGRAMS=ctas * target.sms, FLATTEN=flatten, STREAM_K=bool(stream_k),
                      REVERSE_PROGRAMS=bool(reverse),
                      USE_TMA=use_tma, EVEN_K=k % bk == 0,
                      DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **flags)
    programs = min(ctas * target.sms, tiles)
    # The residual epilogue promises rounding points: no FMA contraction there. (An FP8 step's
    # product times its power-of-two scales is exact, so contracting its add changes nothing.)
    options = dict(num_warps=warps, num_stages=stages, enable_fp_fusion=epilogue != "residual")
    return LaunchPlan(_linear_kernel, (programs,), args, constexprs, options, flags, key, entry is not None,
                      f"{key[0]} {(m, n, k)}")


def linear_launch(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
                  epilogue: str = "none", gamma: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                  pre: Optional[torch.Tensor] = None, weight_kn: bool = False,
                  a_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                  out_scale: Optional[torch.Tensor] = None, act_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Check the inputs, then write epilogue(a @ weight^T + bias) into ``out``.

    ``epilogue``: "none", "gelu", "residual" (needs ``residual``, the (M, N) stream; ``gamma``
    optional) or "gelu_grad" (times GELU's derivative at ``pre``, (M, N)). ``weight_kn``: the
    weight is given as (K, N), i.e. ``a @ weight`` (a layer's weight in its backward).
    ``config`` overrides the launch configuration (the tuner's); its ``USE_TMA`` (default
    True) is honoured only where the card and the tensors allow.

    FP8 (kernels/fp8.py): ``a`` and ``weight`` e4m3 with ``a_scale`` (M, K/128) and ``w_scale``
    (N/128, K/128), fp32 (K/128 and N/128 rounded up); bias, gamma, residual and out in the
    activation dtype; or, with ``out_scale`` (M, N/128), ``out`` e4m3 with its scales, rounded to
    ``act_dtype`` first (default: bias's dtype).
    """
    op = f"linear[{epilogue}]"
    if epilogue not in EPILOGUES:
        raise ValueError(f"linear: epilogue must be one of {sorted(EPILOGUES)}, got {epilogue!r}")
    scaled = a_scale is not None or w_scale is not None
    named = [("a", a), ("weight", weight), ("out", out)]
    named += [] if bias is None else [("bias", bias)]
    named += [] if gamma is None else [("gamma", gamma)]
    if epilogue == "residual":
        if residual is None:
            raise ValueError(f"{op}: the residual epilogue needs the residual stream")
        named.append(("residual", residual))
    elif residual is not None or gamma is not None:
        raise ValueError(f"{op}: gamma and residual belong to the residual epilogue")
    if epilogue == "gelu_grad":
        if pre is None:
            raise ValueError(f"{op}: the gelu_grad epilogue needs the pre-activation")
        named.append(("pre", pre))
        residual = pre  # the same operand slot of the kernel
    elif pre is not None:
        raise ValueError(f"{op}: pre belongs to the gelu_grad epilogue")
    scales = [(name, t) for name, t in (("a_scale", a_scale), ("w_scale", w_scale), ("out_scale", out_scale))
              if t is not None]
    check_tensors(op, *named, *scales, dtypes=FLOAT_DTYPES + (FP8,))  # once: types, dtypes, one device
    if scaled:
        act = _check_fp8(op, a, weight, bias, out, epilogue, weight_kn, a_scale, w_scale, out_scale, act_dtype)
    else:
        if out_scale is not None:
            raise ValueError(f"{op}: out_scale belongs to an FP8 GEMM (a_scale and w_scale)")
        act = a.dtype
    for name, t in named:
        want = FP8 if (name in ("a", "weight") and scaled) or (name == "out" and out_scale is not None) else act
        if t.dtype != want:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected {want}"
                             + ("" if scaled else " (the dtype of a)"))
    if weight.ndim != 2:
        raise ValueError(f"{op}: weight must be 2-D ({'K, N' if weight_kn else 'N, K'}), got shape "
                         f"{tuple(weight.shape)}")
    k, n = weight.shape if weight_kn else weight.shape[::-1]
    if a.ndim != 2 or a.shape[1] != k:
        raise ValueError(f"{op}: a must be 2-D (M, {k}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(a.shape)}")
    for name, t in (("bias", bias), ("gamma", gamma)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(t.shape)}")
    m = a.shape[0]
    for name, t in (("out", out), ("pre" if epilogue == "gelu_grad" else "residual", residual)):
        if t is not None and t.shape != (m, n):
            raise ValueError(f"{op}: {name} must have shape ({m}, {n}), got {tuple(t.shape)}")
    for name, t, shape in (("a_scale", a_scale, (m, groups(k))), ("w_scale", w_scale, (groups(n), groups(k))),
                           ("out_scale", out_scale, (m, groups(n)))):
        if t is not None and (tuple(t.shape) != shape or not t.is_contiguous()):
            raise ValueError(f"{op}: {name} must be a contiguous {shape} tensor (one scale per {FP8_GROUP} "
                             f"columns), got shape {tuple(t.shape)} and strides {t.stride()}")
    for name, t in (("a", a), ("weight", weight), ("out", out), ("residual", residual)):
        if t is not None and t.stride(1) != 1 and t.numel() > 1:
            raise ValueError(f"{op}: {name} must have unit column stride, got strides {t.stride()}")
    if residual is not None and residual.data_ptr() == out.data_ptr() and residual.stride() != out.stride():
        raise ValueError(f"{op}: out may overwrite residual only with the same layout")
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError(f"{op}: K = 0 (empty reduction) is not supported")
    tensors = dict(a=a, w=weight, out=out, x=residual, bias=bias, gamma=gamma, a_scale=a_scale, w_scale=w_scale,
                   out_scale=out_scale)
    meta = {name: Meta.of(t) if t is not None else None for name, t in tensors.items()}
    plan = plan_linear(meta["a"], meta["w"], meta["out"], epilogue, Target.of(a.device), x=meta["x"],
                       bias=meta["bias"], gamma=meta["gamma"], weight_kn=weight_kn, config=config,
                       a_scale=meta["a_scale"], w_scale=meta["w_scale"], out_scale=meta["out_scale"],
                       act_dtype=act)
    given = dict(A=a, W=weight, X=residual if residual is not None else out, Y=out,
                 BIAS=bias if bias is not None else weight, GAMMA=gamma if gamma is not None else weight,
                 A_SCALE=a_scale if a_scale is not None else a, W_SCALE=w_scale if w_scale is not None else a,
                 Y_SCALE=out_scale if out_scale is not None else a)
    if plan.constexprs["STREAM_K"]:  # per call, not cached: two streams must not share counters
        c, g = plan.constexprs, plan.args
        tiles = triton.cdiv(g["M"], c["BLOCK_M"]) * triton.cdiv(g["N"], c["BLOCK_N"])
        cut = cuts_tiles(tiles, c["PROGRAMS"], g["K"], c["BLOCK_K"])
        given["WORKSPACE"] = torch.empty(plan.args["WORKSPACE"].shape, dtype=torch.float32, device=a.device)
        # (zeroing is a launch: only where the kernel counts pieces)
        given["COUNTERS"] = (torch.zeros if cut else torch.empty)(plan.args["COUNTERS"].shape, dtype=torch.int32,
                                                                   device=a.device)
    else:
        given["WORKSPACE"] = given["COUNTERS"] = a
    values = {name: plan.descriptor(name, t) if isinstance(plan.args[name], Desc) else t for name, t in given.items()}
    with on_device(a):
        plan.run(**values)
    return out


def _check_fp8(op, a, weight, bias, out, epilogue, weight_kn, a_scale, w_scale, out_scale, act_dtype):
    """An FP8 GEMM's own rules; returns the activation dtype."""
    if a_scale is None or w_scale is None:
        raise ValueError(f"{op}: an FP8 GEMM needs both a_scale and w_scale")
    if weight_kn or epilogue == "gelu_grad":
        raise ValueError(f"{op}: the FP8 GEMM is for inference: no transposed weight, no gelu_grad")
    for name, t in (("a_scale", a_scale), ("w_scale", w_scale), ("out_scale", out_scale)):
        if t is not None and t.dtype != torch.float32:  # (their type and device: checked with the rest)
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; scales are float32")
    if out_scale is None:
        return out.dtype
    if epilogue not in ("none", "gelu"):
        raise ValueError(f"{op}: an e4m3 output (out_scale) is for the none and gelu epilogues")
    act = act_dtype if act_dtype is not None else (bias.dtype if bias is not None else None)
    if act not in FLOAT_DTYPES:
        raise ValueError(f"{op}: an e4m3 output needs act_dtype (the dtype it rounds to first), got {act}")
    return act
