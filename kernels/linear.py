"""The block's linear layers as one persistent GEMM with a fused epilogue, and its two uses.

    y = epilogue(round(a @ w^T + b))            a: (M, K), w: (N, K) nn.Linear weight, b: (N,)

    EPILOGUE GELU      (fc1):      y = round(GELU(h)),                 exact erf GELU
    EPILOGUE RESIDUAL  (proj, fc2): y = round(x + round(gamma * h))    the new residual stream

``round`` is to the activation dtype at the points where upstream's eager ops round:
nn.Linear's output (bias added in fp32, as cuBLAS's epilogue does), LayerScale's product,
the residual sum. The residual epilogue therefore gives the reference path's residual
stream bit for bit for the same GEMM result; it is built without FMA contraction.

How it runs (sm_90): one program per SM loops over output tiles (persistent); operands
arrive through TMA tensor descriptors (``cp.async.bulk.tensor``) into a software pipeline
of ``num_stages`` and feed ``wgmma``; bias, gamma and the residual tile are loaded before
each tile's main loop so their latency hides behind it; the epilogue works on
``EPI_SPLIT`` column sub-tiles to keep register pressure below spilling. Tiles are
visited in groups of about GROUP_M row-tiles that sweep the column-tiles together (their
weight tiles are shared through L2); the groups are balanced, so no last group of one
row-tile re-streams the whole weight alone. sm_80 (and operands TMA cannot take: rows not
16-byte aligned) runs the same kernel with pointer loads, which Triton pipelines with
cp.async.

Each fused op keeps its unfused alternative beside it, and ``kernels/tuned/<arch>.json``
records per card and shape which one won (``impl``):
  - ``linear_gelu``: fused GEMM + GELU, or cuBLAS (F.linear) + the in-place GELU kernel;
  - ``linear_residual_norm``: this GEMM's residual epilogue then ``rms_norm``, or cuBLAS +
    ``residual_rms_norm``.
Before a card is tuned the fused kernels run.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import registry
from ._common import INTERPRET, INTERPRETING, cast, check_tensors, num_sms, on_device, tma_ok
from .gelu import gelu, gelu_launch, gelu_value
from .registry import Choice, CompileSpec, KernelSpec, Shape
from .rms_norm import residual_rms_norm, rms_norm, rms_norm_ref
from .tuning import choice, lookup

EPILOGUES = {"none": 0, "gelu": 1, "residual": 2, "gelu_grad": 3}

# Launch configurations before tuning, chosen so the sm_90 build keeps its main loop free
# of spills (python -m internvit_fast.compile_check). fc1 (N = 12800): 128x256 tiles over
# two warpgroups, epilogue in two 128x128 halves (unsplit, the GELU epilogue spilled 80
# bytes; split, 8 bytes, outside the main loop), 3 stages (4 stages spill). proj/fc2 (N = 3200 = 25 x 128): 128x128 tiles, 4 stages.
# sm_80: 128x128x32, 4 stages, fits the A100's shared memory. fp32 runs full-precision FMA
# ("ieee": torch's default has no TF32) with small tiles and pointer loads (through TMA
# the FMA loop spilled 368 bytes on sm_90). The interpreter gets tiny tiles
# (it runs programs one by one), split epilogues and small groups, so the CPU tests cover them.
CONFIGS = {
    ("sm90", "gelu"): dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, EPI_SPLIT=2, num_warps=8,
                           num_stages=3),
    ("sm90", "residual"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, EPI_SPLIT=2, num_warps=8,
                               num_stages=4),
    ("sm80", "gelu"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=2, num_warps=8,
                           num_stages=4),
    ("sm80", "residual"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=2, num_warps=8,
                               num_stages=4),
    ("fp32", "gelu"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=1, num_warps=4,
                           num_stages=3, USE_TMA=False),
    ("fp32", "residual"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, EPI_SPLIT=1, num_warps=4,
                               num_stages=3, USE_TMA=False),
    ("interpreter", "gelu"): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, EPI_SPLIT=2, num_warps=4,
                                  num_stages=1),
    ("interpreter", "residual"): dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, EPI_SPLIT=2,
                                      num_warps=4, num_stages=1),
}
for _arch in ("interpreter", "sm90", "sm80", "fp32"):  # a plain GEMM and fc1's backward: fc1's shapes
    CONFIGS[_arch, "none"] = CONFIGS[_arch, "gelu_grad"] = CONFIGS[_arch, "gelu"]
# fc1's backward (GELU's derivative in the epilogue, its operand a second tile): at 128x256
# the sm_90 build spilled 184 bytes after the main loop; 128x128 does not spill.
CONFIGS["sm90", "gelu_grad"] = CONFIGS["sm90", "residual"]
TUNED_NAME = {"gelu": "linear_gelu", "residual": "linear_residual", "none": "linear", "gelu_grad": "linear_gelu_grad"}


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
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
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
def gelu_grad(x):
    """d GELU(x) / dx for the exact GELU: Phi(x) + x phi(x), in fp32 (torch's gelu_backward)."""
    return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _residual_tile(X, off_m, off_n, M, N, stride_xm, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr,
                   USE_TMA: tl.constexpr):
    if USE_TMA:
        return X.load([off_m, off_n]).to(tl.float32)
    else:
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, SUB_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        return tl.load(X + rm[:, None].to(tl.int64) * stride_xm + rn[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _finish(acc, x, bias, gamma, Y, off_m, off_n, M, N, stride_ym, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr,
            EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, USE_TMA: tl.constexpr):
    """The epilogue of one (BLOCK_M, SUB_N) sub-tile: bias, rounding, GELU or residual, store."""
    if USE_TMA:
        ty = Y.dtype
    else:
        ty = Y.dtype.element_ty
    h = acc
    if HAS_BIAS:
        h += bias[None, :]
    h = cast(h, ty).to(tl.float32)  # nn.Linear's output in the activation dtype
    if EPILOGUE == 1:
        y = gelu_value(h)
    elif EPILOGUE == 3:
        y = h * gelu_grad(x)  # x: the pre-activation tile
    elif EPILOGUE == 2:
        if HAS_GAMMA:
            h = cast(h * gamma[None, :], ty).to(tl.float32)  # LayerScale rounds its product
        y = x + h
    else:
        y = h
    if USE_TMA:
        Y.store([off_m, off_n], cast(y, ty))
    else:
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, SUB_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], cast(y, ty), mask=mask)


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
    M, N, K,
    stride_am, stride_wn, stride_xm, stride_ym,  # pointer path only; unit column strides
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-tiles per group (see _tile_coords)
    EPI_SPLIT: tl.constexpr,  # 1 or 2 column sub-tiles in the epilogue
    NUM_SMS: tl.constexpr,  # the card's SMs: program p runs tiles p, p + NUM_SMS, ... (grid <= NUM_SMS)
    EPILOGUE: tl.constexpr,  # 0 none, 1 GELU, 2 residual, 3 times GELU's derivative at X
    HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    USE_TMA: tl.constexpr,
    EVEN_K: tl.constexpr,  # pointer path: K % BLOCK_K == 0, no mask in the main loop
    DOT_PRECISION: tl.constexpr,
    W_KN: tl.constexpr = False,
):
    SUB_N: tl.constexpr = BLOCK_N // EPI_SPLIT
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # The epilogue's operands first: their loads complete while the main loop runs.
        # (An absent operand is stood in for by `cols`, which its flag keeps unread.)
        cols = off_n + tl.arange(0, SUB_N)
        bias0, gamma0, x0 = cols, cols, cols
        if HAS_BIAS:
            bias0 = _vector(BIAS, cols, N)
        if HAS_GAMMA:
            gamma0 = _vector(GAMMA, cols, N)
        if EPILOGUE == 2:  # (the gelu_grad operand waits for the epilogue: it would spill here)
            x0 = _residual_tile(X, off_m, off_n, M, N, stride_xm, BLOCK_M, SUB_N, USE_TMA)
        if EPI_SPLIT == 2:
            bias1, gamma1, x1 = cols, cols, cols
            if HAS_BIAS:
                bias1 = _vector(BIAS, cols + SUB_N, N)
            if HAS_GAMMA:
                gamma1 = _vector(GAMMA, cols + SUB_N, N)
            if EPILOGUE == 2:
                x1 = _residual_tile(X, off_m, off_n + SUB_N, M, N, stride_xm, BLOCK_M, SUB_N, USE_TMA)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            # Out-of-range rows, columns and K are zero-filled by the copy engine.
            for ki in range(k_tiles):
                a = A.load([off_m, ki * BLOCK_K])
                if W_KN:
                    b = W.load([ki * BLOCK_K, off_n])
                else:
                    b = W.load([off_n, ki * BLOCK_K]).T
                if INTERPRET:  # the interpreter's bf16 dot is wrong; the GPU keeps bf16 MMAs
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            # Out-of-range rows/columns wrap onto valid ones for the loads (their results are
            # never stored): no padding copy and no row mask in the main loop.
            rm = (off_m + tl.arange(0, BLOCK_M)) % M
            rn = (off_n + tl.arange(0, BLOCK_N)) % N
            rk = tl.arange(0, BLOCK_K)
            a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
            if W_KN:
                w_ptrs = W + rk[:, None].to(tl.int64) * stride_wn + rn[None, :]  # (BLOCK_K, BLOCK_N) of w
                w_step = BLOCK_K * stride_wn
            else:
                w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N) of w^T
                w_step = BLOCK_K
            for ki in range(k_tiles):
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
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K
                w_ptrs += w_step

        if EPILOGUE == 3:
            x0 = _residual_tile(X, off_m, off_n, M, N, stride_xm, BLOCK_M, SUB_N, USE_TMA)
        if EPI_SPLIT == 2:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
            if EPILOGUE == 3:
                x1 = _residual_tile(X, off_m, off_n + SUB_N, M, N, stride_xm, BLOCK_M, SUB_N, USE_TMA)
            _finish(acc0, x0, bias0, gamma0, Y, off_m, off_n, M, N, stride_ym, BLOCK_M, SUB_N, EPILOGUE,
                    HAS_BIAS, HAS_GAMMA, USE_TMA)
            _finish(acc1, x1, bias1, gamma1, Y, off_m, off_n + SUB_N, M, N, stride_ym, BLOCK_M, SUB_N,
                    EPILOGUE, HAS_BIAS, HAS_GAMMA, USE_TMA)
        else:
            _finish(acc, x0, bias0, gamma0, Y, off_m, off_n, M, N, stride_ym, BLOCK_M, SUB_N, EPILOGUE,
                    HAS_BIAS, HAS_GAMMA, USE_TMA)


# --- launcher ----------------------------------------------------------------------------

def _arch(device: torch.device) -> str:
    if INTERPRETING or device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def pick_config(epilogue: str, dtype: torch.dtype, device: torch.device, m: int, n: int, k: int) -> dict:
    """The measured configuration for this card and shape (kernels/tuned/), else the table above."""
    arch = _arch(device)
    if arch != "interpreter":
        tuned = lookup(TUNED_NAME[epilogue], device, M=m, N=n, K=k, dtype=dtype)
        if tuned:
            return tuned
        if dtype == torch.float32:
            arch = "fp32"
    return CONFIGS[arch, epilogue]


def linear_launch(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
                  epilogue: str = "none", gamma: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                  pre: Optional[torch.Tensor] = None, weight_kn: bool = False) -> torch.Tensor:
    """Check the inputs, then write epilogue(a @ weight^T + bias) into ``out``.

    ``epilogue``: "none", "gelu", "residual" (needs ``residual``, the (M, N) stream; ``gamma``
    optional) or "gelu_grad" (times GELU's derivative at ``pre``, (M, N)). ``weight_kn``: the
    weight is given as (K, N), i.e. ``a @ weight`` (a layer's weight in its backward).
    ``config`` overrides the launch configuration (the tuner's); its ``USE_TMA`` (default
    True) is honoured only where the card and the tensors allow.
    """
    op = f"linear[{epilogue}]"
    if epilogue not in EPILOGUES:
        raise ValueError(f"linear: epilogue must be one of {sorted(EPILOGUES)}, got {epilogue!r}")
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
    check_tensors(op, *named)
    for name, t in named[1:]:
        if t.dtype != a.dtype:
            raise ValueError(f"{op}: {name} dtype {t.dtype} differs from a dtype {a.dtype}")
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
    for name, t in (("a", a), ("weight", weight), ("out", out), ("residual", residual)):
        if t is not None and t.stride(1) != 1 and t.numel() > 1:
            raise ValueError(f"{op}: {name} must have unit column stride, got strides {t.stride()}")
    if residual is not None and residual.data_ptr() == out.data_ptr() and residual.stride() != out.stride():
        raise ValueError(f"{op}: out may overwrite residual only with the same layout")
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise ValueError(f"{op}: K = 0 (empty reduction) is not supported")
    cfg = dict(config or pick_config(epilogue, a.dtype, a.device, m, n, k))
    want_tma = cfg.pop("USE_TMA", True)
    operands = [a, weight, out] + ([residual] if residual is not None else [])
    use_tma = bool(want_tma) and _tma_card(a.device) and tma_ok(*operands)
    sub_n = cfg["BLOCK_N"] // cfg["EPI_SPLIT"]
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        ad = TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        wd = TensorDescriptor.from_tensor(weight, [cfg["BLOCK_K"], cfg["BLOCK_N"]] if weight_kn
                                          else [cfg["BLOCK_N"], cfg["BLOCK_K"]])
        yd = TensorDescriptor.from_tensor(out, [cfg["BLOCK_M"], sub_n])
        xd = TensorDescriptor.from_tensor(residual, [cfg["BLOCK_M"], sub_n]) if residual is not None else yd
        tensors = (ad, wd, xd, yd)
    else:
        tensors = (a, weight, residual if residual is not None else out, out)
    # One program per SM, striding over the tiles by the SM count; with fewer tiles than SMs
    # each program gets one tile. (NUM_SMS is the card's count, not the grid's, so every
    # shape shares one build.)
    sms = num_sms(a.device)
    programs = min(sms, triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]))
    placeholder = weight  # pointer for an absent bias/gamma; its constexpr flag keeps it unread
    with on_device(a):
        _linear_kernel[(programs,)](
            *tensors, bias if bias is not None else placeholder, gamma if gamma is not None else placeholder,
            m, n, k, a.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0,
            out.stride(0), NUM_SMS=sms, EPILOGUE=EPILOGUES[epilogue], HAS_BIAS=bias is not None,
            HAS_GAMMA=gamma is not None, USE_TMA=use_tma, EVEN_K=k % cfg["BLOCK_K"] == 0,
            DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", W_KN=weight_kn,
            # The residual epilogue promises rounding points: no FMA contraction there.
            enable_fp_fusion=epilogue != "residual", **cfg)
    return out


def _tma_card(device: torch.device) -> bool:
    """TMA: Hopper and newer, and the interpreter (which emulates descriptors on CPU tensors)."""
    if device.type != "cuda":
        return INTERPRETING
    return torch.cuda.get_device_capability(device)[0] >= 9


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.ndim == 2 else t.reshape(-1, t.shape[-1])


# --- the fused ops and their unfused alternatives ----------------------------------------

def gelu_fused(a, weight, bias, config=None):
    a2 = _rows(a)
    out = torch.empty((a2.shape[0], weight.shape[0]), dtype=a.dtype, device=a.device)
    linear_launch(a2, weight, bias, out, "gelu", config=config)
    return out.view(*a.shape[:-1], weight.shape[0])


def gelu_unfused(a, weight, bias):
    h = F.linear(a, weight, bias)  # cuBLAS
    return gelu_launch(h, h)  # in place: one read and one write of the hidden activation


@torch.library.custom_op("internvit_fast::linear_gelu", mutates_args=())
def linear_gelu(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU(a @ weight^T + bias) for a of shape (..., K): the fused GEMM, or cuBLAS + the GELU
    kernel where the tuned table measured that faster on this card."""
    m, (n, k) = a.numel() // max(1, a.shape[-1]), weight.shape
    if choice("linear_gelu", a.device, M=m, N=n, K=k, dtype=a.dtype) == "unfused":
        return gelu_unfused(a, weight, bias)
    return gelu_fused(a, weight, bias)


@linear_gelu.register_fake
def _(a, weight, bias):
    return a.new_empty((*a.shape[:-1], weight.shape[0]))


def residual_fused(a, weight, bias, gamma, x, norm_weight, eps, config=None):
    a2, x2 = _rows(a), _rows(x)
    x_new = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    linear_launch(a2, weight, bias, x_new, "residual", gamma=gamma, residual=x2, config=config)
    x_new = x_new.view(x.shape)
    h = rms_norm(x_new, norm_weight, eps) if norm_weight is not None else x.new_empty(0)
    return x_new, h


def residual_unfused(a, weight, bias, gamma, x, norm_weight, eps):
    return residual_rms_norm(x, F.linear(a, weight, bias), gamma, norm_weight, eps)


@torch.library.custom_op("internvit_fast::linear_residual_norm", mutates_args=())
def linear_residual_norm(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         gamma: Optional[torch.Tensor], x: torch.Tensor, norm_weight: Optional[torch.Tensor],
                         eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_new, h): x_new = x + gamma * (a @ weight^T + bias), h = RMSNorm(x_new) * norm_weight
    (empty without norm_weight). The GEMM's residual epilogue then rms_norm, or cuBLAS +
    residual_rms_norm where the tuned table measured that faster."""
    m, (n, k) = a.numel() // max(1, a.shape[-1]), weight.shape
    if choice("linear_residual", a.device, M=m, N=n, K=k, dtype=a.dtype) == "unfused":
        return residual_unfused(a, weight, bias, gamma, x, norm_weight, eps)
    return residual_fused(a, weight, bias, gamma, x, norm_weight, eps)


@linear_residual_norm.register_fake
def _(a, weight, bias, gamma, x, norm_weight, eps=1e-6):
    x_new = x.new_empty(x.shape)
    return x_new, (torch.empty_like(x_new) if norm_weight is not None else x.new_empty(0))


# --- training: the MLP half of a block, differentiable -------------------------------------

@torch.library.custom_op("internvit_fast::mlp_residual_norm", mutates_args=())
def mlp_residual_norm(h: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                      b2: Optional[torch.Tensor], gamma: Optional[torch.Tensor], x: torch.Tensor,
                      norm_weight: Optional[torch.Tensor], eps: float = 1e-6,
                      rowscale: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_new, h_next, pre, y): x_new = x + s * gamma * fc2(GELU(fc1(h))), h_next =
    RMSNorm(x_new) * norm_weight (empty without norm_weight); fc1's pre-activation and fc2's
    output are returned for the backward to keep (callers ignore them). The block's MLP for
    training: differentiable, with the GELU's derivative applied in the epilogue of the GEMM
    that computes its gradient.

    Forward: cuBLAS fc1 (its output is the pre-activation the backward needs), the GELU kernel,
    cuBLAS fc2, residual_rms_norm (LayerScale, drop path's row scale, the next norm). Saved:
    h, the pre-activation, fc2's output y, x_new and the weights; the GELU's output is
    recomputed in the backward instead of kept (the reference keeps both).
    """
    pre = F.linear(h, w1, b1)
    y = F.linear(gelu(pre), w2, b2)
    x_new, h_next = residual_rms_norm(x, y, gamma, norm_weight, eps, rowscale)
    return x_new, h_next, pre, y


@mlp_residual_norm.register_fake
def _(h, w1, b1, w2, b2, gamma, x, norm_weight, eps=1e-6, rowscale=None):
    x_new = x.new_empty(x.shape)
    return (x_new, torch.empty_like(x_new) if norm_weight is not None else x.new_empty(0),
            h.new_empty((*h.shape[:-1], w1.shape[0])), x.new_empty(x.shape))


def _mlp_setup(ctx, inputs, output):
    h, w1, b1, w2, b2, gamma, x, norm_weight, eps, rowscale = inputs
    x_new, _, pre, y = output
    ctx.save_for_backward(h, w1, w2, pre, y, gamma, x_new, norm_weight, rowscale)
    ctx.eps, ctx.has_b1, ctx.has_b2 = eps, b1 is not None, b2 is not None


@torch.library.custom_op("internvit_fast::linear_gelu_grad", mutates_args=())
def linear_gelu_grad(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """(dy @ w2) * GELU'(pre) for dy (M, C), fc2's weight w2 (C, H), pre (M, H): the gradient of
    fc1's output, the derivative applied in the GEMM's epilogue."""
    return linear_launch(dy, w2, None, torch.empty_like(pre), "gelu_grad", pre=pre, weight_kn=True)


@linear_gelu_grad.register_fake
def _(dy, w2, pre):
    return torch.empty_like(pre)


def _mlp_backward(ctx, dx_new, dh_next, _dpre, _dy):
    h, w1, w2, pre, y, gamma, x_new, norm_weight, rowscale = ctx.saved_tensors
    from .rms_norm import residual_backward
    dx, dy, dgamma, dnw = residual_backward(x_new, y, gamma, norm_weight, rowscale, ctx.eps, dx_new, dh_next)
    dy2, pre2, h2 = _rows(dy), _rows(pre), _rows(h)
    dpre = linear_gelu_grad(dy2, w2, pre2)
    u = gelu(pre2)  # recomputed, not kept
    dw2, db2 = dy2.t() @ u, dy2.sum(0) if ctx.has_b2 else None
    dh = (dpre @ w1).view(h.shape)
    dw1, db1 = dpre.t() @ h2, dpre.sum(0) if ctx.has_b1 else None
    return dh, dw1, db1, dw2, db2, dgamma, dx, dnw, None, None


mlp_residual_norm.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# --- what the tools need to know (registry) ----------------------------------------------

def _candidates(epilogue: str):
    def cands(arch: str):
        if arch == "smoke":
            rows = [(32, 32, 32, 2, 4, 1, 1), (16, 32, 32, 1, 4, 1, 1)]
        elif arch == "sm90" and epilogue == "gelu":
            rows = [(128, 256, 64, 2, 8, 3, 8), (128, 128, 64, 1, 8, 4, 8), (128, 128, 64, 2, 8, 4, 8),
                    (128, 256, 64, 2, 8, 3, 16), (128, 128, 128, 2, 8, 3, 8), (64, 256, 64, 2, 4, 4, 8)]
        elif arch == "sm90":
            rows = [(128, 128, 64, 2, 8, 4, 8), (128, 128, 64, 1, 8, 4, 8), (128, 256, 64, 2, 8, 3, 8),
                    (128, 128, 128, 2, 8, 3, 8), (64, 128, 64, 1, 4, 4, 8), (128, 64, 64, 1, 4, 4, 8)]
        else:
            rows = [(128, 128, 32, 2, 8, 4, 8), (128, 128, 64, 2, 8, 3, 8), (128, 64, 32, 1, 4, 4, 8),
                    (256, 128, 32, 2, 8, 3, 8)]
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EPI_SPLIT=sp, num_warps=w, num_stages=s, GROUP_M=g)
                for bm, bn, bk, sp, w, s, g in rows]
    return cands


def _gemm_dims(spec_epilogue: str, variant: str, s: Shape) -> Tuple[int, int]:
    """(N, K) of the GEMM: fc1 (hidden, width), proj (width, width), fc2 (width, hidden); fc1's
    backward through fc2, (M, width) @ (width, hidden): (hidden, width)."""
    if spec_epilogue in ("gelu", "gelu_grad"):
        return s.hidden, s.width
    return (s.width, s.width) if variant == "proj" else (s.width, s.hidden)


def _compile_spec(epilogue: str, variant: str, shape: Shape, arch: int, cfg: dict, prefix: str = "") -> CompileSpec:
    cfg = dict(cfg)
    n, k = _gemm_dims(epilogue, variant, shape)
    el = registry.DTYPE_NAMES[shape.dtype]
    use_tma = arch >= 90 and cfg.pop("USE_TMA", True)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    bm, bn, bk, sub_n = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_N"] // cfg["EPI_SPLIT"]
    p = registry.POINTER[shape.dtype]
    if use_tma:
        tensors = dict(A=f"tensordesc<{el}[{bm}, {bk}]>", W=f"tensordesc<{el}[{bn}, {bk}]>",
                       X=f"tensordesc<{el}[{bm}, {sub_n}]>", Y=f"tensordesc<{el}[{bm}, {sub_n}]>")
    else:
        tensors = dict(A=p, W=p, X=p, Y=p)
    args = dict(tensors, BIAS=p, GAMMA=p, M=shape.rows, N=n, K=k, stride_am=k, stride_wn=k, stride_xm=n,
                stride_ym=n)
    constexprs = dict(cfg, NUM_SMS=132 if arch >= 90 else 108, EPILOGUE=EPILOGUES[epilogue], HAS_BIAS=True,
                      HAS_GAMMA=epilogue == "residual", USE_TMA=use_tma, EVEN_K=k % bk == 0,
                      DOT_PRECISION="ieee" if shape.dtype == torch.float32 else "tf32", W_KN=False)
    options = dict(num_warps=warps, num_stages=stages, enable_fp_fusion=epilogue != "residual")
    return CompileSpec(TUNED_NAME[epilogue], _linear_kernel, args, constexprs, options,
                       f"{prefix}{variant or 'fc1'} {shape.label()}", mma=True)


def _specs(epilogue: str, variant: str):
    def specs(arch: int):
        a = "sm90" if arch >= 90 else "sm80"
        out = []
        for shape in registry.segmentation_shapes():
            key = "fp32" if shape.dtype == torch.float32 else a
            out.append(_compile_spec(epilogue, variant, shape, arch, CONFIGS[key, epilogue]))
        from .tuning import table
        for entry in table(f"sm{arch}").get(TUNED_NAME[epilogue], []):
            sh = entry["shape"]
            s = Shape(sh["M"], sh["K"] if epilogue == "gelu" else sh["N"], sh["N"] if epilogue == "gelu" else sh["K"],
                      {v: k for k, v in registry.DTYPE_NAMES.items()}[sh["dtype"]])
            if epilogue == "gelu" or (variant == "proj") == (sh["K"] == sh["N"]):
                out.append(_compile_spec(epilogue, variant, s, arch, entry["config"], "tuned "))
        return out
    return specs


def _traffic(epilogue: str, variant: str):
    def traffic(s: Shape, cfg: Optional[dict] = None):
        """(DRAM bytes under the grouped tile order, minimum). A group's row-tiles of ``a``
        stay in L2 while it sweeps the column-tiles, so ``a`` is read once and ``w`` once per
        group; the minimum reads each operand once. (The tiles request far more from L2:
        every tile streams its BLOCK_M + BLOCK_N rows of K.)"""
        n, k = _gemm_dims(epilogue, variant, s)
        cfg = cfg or CONFIGS["sm90", epilogue]
        groups = triton.cdiv(triton.cdiv(s.rows, cfg["BLOCK_M"]), cfg["GROUP_M"])
        out = s.rows * n * (2 if epilogue == "residual" else 1)  # residual: read x, write x_new
        least = (s.rows * k + n * k + out + 2 * n) * s.el
        return least + (groups - 1) * n * k * s.el, least
    return traffic


def _inputs(epilogue: str, variant: str):
    def make(s: Shape, device) -> dict:
        n, k = _gemm_dims(epilogue, variant, s)
        r = registry.rand
        inp = dict(a=r((s.rows, k), s.dtype, device), weight=r((n, k), s.dtype, device, k ** -0.5),
                   bias=r((n,), s.dtype, device, 0.5))
        if epilogue == "residual":
            inp.update(gamma=r((n,), s.dtype, device, 0.3), x=r((s.rows, n), s.dtype, device, 3.0),
                       norm_weight=r((n,), s.dtype, device, 1.0, 1.0), eps=1e-6)
        return inp
    return make


def _gelu_run(i, o, cfg):
    linear_launch(i["a"], i["weight"], i["bias"], o["y"], "gelu", config=cfg)


def _residual_run(i, o, cfg):
    linear_launch(i["a"], i["weight"], i["bias"], o["x_new"], "residual", gamma=i["gamma"], residual=i["x"],
                  config=cfg)


def _residual_pair_ref(i):
    x_new = linear_ref(i["a"], i["weight"], i["bias"], "residual", i["gamma"], i["x"])
    return {"x_new": x_new, "h": rms_norm_ref(x_new, i["norm_weight"], i["eps"])}


def _residual_pair(outputs):
    return lambda i, cfg=None: dict(zip(("x_new", "h"), outputs(i, cfg)))


GELU_SPEC = KernelSpec(
    name="linear_gelu",
    math="y = GELU(round(a @ w^T + b)), exact erf GELU (fc1)",
    promises_rounding=False,
    make_inputs=_inputs("gelu", ""),
    new_outputs=lambda i: {"y": registry.nan_like(i["a"], (i["a"].shape[0], i["weight"].shape[0]))},
    launch=_gelu_run,
    reference=lambda i: {"y": linear_ref(i["a"], i["weight"], i["bias"], "gelu")},
    eager=lambda i: linear_ref(i["a"], i["weight"], i["bias"], "gelu"),
    compile_specs=_specs("gelu", ""),
    candidates=_candidates("gelu"),
    tuned_shape=lambda s: {"M": s.rows, "N": s.hidden, "K": s.width, "dtype": registry.DTYPE_NAMES[s.dtype]},
    traffic=_traffic("gelu", ""),
    flops=lambda s: 2 * s.rows * s.hidden * s.width,
    choice=Choice(fused=lambda i, cfg=None: {"y": gelu_fused(i["a"], i["weight"], i["bias"], cfg)},
                  unfused=lambda i: {"y": gelu_unfused(i["a"], i["weight"], i["bias"])},
                  describe_unfused="cuBLAS fc1 + in-place GELU kernel"),
)


def _residual_spec(variant: str) -> KernelSpec:
    n_k = (lambda s: (s.width, s.width)) if variant == "proj" else (lambda s: (s.width, s.hidden))
    return KernelSpec(
        name="linear_residual",
        variant=variant,
        math="x_new = round(x + round(gamma * round(a @ w^T + b))) (proj, fc2)",
        promises_rounding=True,
        make_inputs=_inputs("residual", variant),
        new_outputs=lambda i: {"x_new": registry.nan_like(i["x"])},
        launch=_residual_run,
        reference=lambda i: {"x_new": linear_ref(i["a"], i["weight"], i["bias"], "residual", i["gamma"], i["x"])},
        eager=lambda i: linear_ref(i["a"], i["weight"], i["bias"], "residual", i["gamma"], i["x"]),
        compile_specs=_specs("residual", variant),
        candidates=_candidates("residual"),
        tuned_shape=lambda s: dict(zip(("N", "K"), n_k(s)), M=s.rows, dtype=registry.DTYPE_NAMES[s.dtype]),
        traffic=_traffic("residual", variant),
        flops=lambda s: 2 * s.rows * n_k(s)[0] * n_k(s)[1],
        choice=Choice(
            fused=_residual_pair(lambda i, cfg: residual_fused(i["a"], i["weight"], i["bias"], i["gamma"], i["x"],
                                                               i["norm_weight"], i["eps"], cfg)),
            unfused=_residual_pair(lambda i, cfg: residual_unfused(i["a"], i["weight"], i["bias"], i["gamma"],
                                                                   i["x"], i["norm_weight"], i["eps"])),
            describe_unfused="cuBLAS + residual_rms_norm kernel (fused: residual epilogue + rms_norm)"),
        choice_reference=_residual_pair_ref,
    )


PROJ_SPEC = _residual_spec("proj")
FC2_SPEC = _residual_spec("fc2")


# --- fc1's backward GEMM: what the tools need to know ----------------------------------------

def _gelu_grad_inputs(s: Shape, device) -> dict:
    r = registry.rand
    return dict(dy=r((s.rows, s.width), s.dtype, device), w2=r((s.width, s.hidden), s.dtype, device, s.hidden ** -0.5),
                pre=r((s.rows, s.hidden), s.dtype, device, 2.0))


def _gelu_grad_ref(i: dict) -> dict:
    """The eager ops: fc2's input gradient (a matmul in the activation dtype), then GELU's backward."""
    return {"dpre": torch.ops.aten.gelu_backward(i["dy"] @ i["w2"], i["pre"])}


def _gelu_grad_specs(arch: int):
    a = "sm90" if arch >= 90 else "sm80"
    out = []
    for shape in registry.segmentation_shapes():
        cfg = dict(CONFIGS["fp32" if shape.dtype == torch.float32 else a, "gelu_grad"])
        spec = _compile_spec("gelu_grad", "", shape, arch, cfg)
        # a (M, C) @ w2 (C, 4C): the weight is (K, N), read as it lies
        el = registry.DTYPE_NAMES[shape.dtype]
        if spec.constexprs["USE_TMA"]:
            spec.args["W"] = f"tensordesc<{el}[{cfg['BLOCK_K']}, {cfg['BLOCK_N']}]>"
        spec.args.update(stride_wn=shape.hidden)
        spec.constexprs.update(W_KN=True, HAS_BIAS=False)
        spec.label = "fc1-backward " + shape.label()
        out.append(spec)
    return out


GELU_GRAD_SPEC = KernelSpec(
    name="linear_gelu_grad",
    math="d pre = (dy @ w2) * GELU'(pre): fc2's input gradient with GELU's derivative in the epilogue",
    promises_rounding=False,
    make_inputs=_gelu_grad_inputs,
    new_outputs=lambda i: {"dpre": registry.nan_like(i["pre"])},
    launch=lambda i, o, cfg: linear_launch(i["dy"], i["w2"], None, o["dpre"], "gelu_grad", pre=i["pre"],
                                           config=cfg, weight_kn=True),
    reference=_gelu_grad_ref,
    eager=_gelu_grad_ref,
    compile_specs=_gelu_grad_specs,
    candidates=_candidates("gelu"),
    tuned_shape=lambda s: {"M": s.rows, "N": s.hidden, "K": s.width, "dtype": registry.DTYPE_NAMES[s.dtype]},
    # fc1's GEMM shape, plus the pre-activation it reads (and no bias)
    traffic=lambda s, cfg=None: tuple(b + s.rows * s.hidden * s.el for b in _traffic("gelu", "")(s, cfg)),
    flops=lambda s: 2 * s.rows * s.hidden * s.width,
)
