"""What each kernel of the registry moves and computes at a shape (bytes and FLOPs), the
cards' ceilings, and the cost model that turns a build the compile gate read into a
predicted time.

Kept out of the kernel files: the benchmarks divide their times by these (GB/s, TFLOP/s),
the compile gate reports each kernel's bytes against its minimum and its predicted time,
the GPU run's plan sizes its stages with the same ceilings. A GEMM's DRAM bytes
depend on its launch plan: under the grouped tile order a group's row-tiles of ``a`` stay
in L2 while it sweeps the column-tiles, so ``a`` is read once and the weight once per
group; the minimum reads each operand once.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import triton

from internvit_fast.kernels.gemm import cuts_tiles
from internvit_fast.kernels.registry import Shape


def _gemm_dims(spec_id: str, s: Shape) -> Tuple[int, int]:
    """(N, K) of a registry GEMM: fc1 and fc1's backward (hidden, width), proj (width, width),
    fc2 (width, hidden)."""
    if spec_id in ("linear_gelu", "linear_gelu_grad"):
        return s.hidden, s.width
    return (s.width, s.width) if spec_id == "linear_residual[proj]" else (s.width, s.hidden)


def counts(spec_id: str, s: Shape, plan=None) -> Tuple[int, int, int]:
    """(bytes moved, least bytes it must move, FLOPs) of one launch at ``s``."""
    el, rows, width = s.el, s.rows, s.width
    if spec_id == "rms_norm":
        b = 2 * rows * width * el + width * el
        return b, b, 0
    if spec_id == "residual_rms_norm":
        b = 4 * rows * width * el + 2 * width * el
        return b, b, 0
    if spec_id == "qk_norm":  # reads q and k, writes them; v stays in place
        b = 4 * rows * width * el + 2 * width * el
        return b, b, 0
    if spec_id == "gelu":
        b = 2 * rows * s.hidden * el
        return b, b, 0
    if spec_id == "rms_norm_backward":  # reads x_new, y, dx_new, dh; writes dx, dy
        b = 6 * rows * width * el
        return b, b, 0
    if spec_id == "rms_norm_fp8":  # reads a row and the weight, writes e4m3 bytes and a scale per 128
        b = rows * width * (el + 1) + rows * triton.cdiv(width, 128) * 4 + width * el
        return b, b, 0
    if spec_id == "residual_rms_norm_fp8":  # reads x, y, gamma, w; writes x_new, e4m3 bytes, a scale per 128
        b = rows * width * (3 * el + 1) + rows * triton.cdiv(width, 128) * 4 + 2 * width * el
        return b, b, 0
    if spec_id == "quantize_fp8":  # reads a row, writes its e4m3 bytes and a scale per 128
        b = rows * width * (el + 1) + rows * triton.cdiv(width, 128) * 4
        return b, b, 0
    if spec_id.startswith("fp8_"):
        return _fp8_counts(spec_id, s, plan)
    n, k = _gemm_dims(spec_id, s)
    out = rows * n * (2 if spec_id.startswith("linear_residual") else 1)  # residual: read x, write x_new
    extra = rows * n if spec_id == "linear_gelu_grad" else 0  # the pre-activation it reads
    least = (rows * k + n * k + out + extra + 2 * n) * el
    groups = _groups(rows, plan)
    return least + (groups - 1) * n * k * el, least, 2 * rows * n * k


def _fp8_counts(spec_id: str, s: Shape, plan=None) -> Tuple[int, int, int]:
    """An FP8 GEMM: e4m3 operands (and their scales, one fp32 per 128), the output in the
    activation dtype (fc1's in e4m3 with scales), the residual read and written."""
    rows, el = s.rows, s.el
    n, k = {"fp8_linear": (3 * s.width, s.width), "fp8_linear_gelu": (s.hidden, s.width),
            "fp8_linear_residual[proj]": (s.width, s.width)}.get(spec_id, (s.width, s.hidden))
    out = rows * n * (1 + 4 / 128) if spec_id == "fp8_linear_gelu" else rows * n * el
    if spec_id.startswith("fp8_linear_residual"):
        out *= 2
    least = int(rows * k * (1 + 4 / 128) + n * k * (1 + 4 / 128 ** 2) + out + 2 * n * el)
    return least + (_groups(rows, plan) - 1) * n * k, least, 2 * rows * n * k


def _groups(rows: int, plan: Optional[object]) -> int:
    c = plan.constexprs if plan is not None else dict(BLOCK_M=128, GROUP_M=8)
    return triton.cdiv(triton.cdiv(rows, c["BLOCK_M"]), c["GROUP_M"])


# --- the cards and the cost model ----------------------------------------------------------
#
# Every constant in one place, with where it comes from. "Measured" means on this
# project's lent GPU machines (shared/TOOLCHAIN.md, the device library's KINDS.md);
# "datasheet" is NVIDIA's; a "lead" is a reading of the compiled code or an assumption that
# the first GPU run calibrates (it records measured / predicted per kernel).
CARDS: Dict[str, dict] = {
    # 132 SMs (PyTorch on the H200 machine; the H100 SXM has the same 132). SM clock 1980 MHz
    # read under load (nvidia-smi, H200 machine). bf16 matmul 790 TFLOP/s (measured 8192^3,
    # 769-798 over runs; cuBLAS reaches this on large GEMMs). Copy: measured device-to-device,
    # bytes read plus written. fp32 FMA 67 and fp64 tensor cores 67 TFLOP/s: datasheet.
    "h100": dict(sms=132, clock_ghz=1.98, matmul_tflops=790.0, copy_gbs=3000.0, fp32_tflops=67.0, fp64_tflops=67.0),
    "h200": dict(sms=132, clock_ghz=1.98, matmul_tflops=790.0, copy_gbs=4300.0, fp32_tflops=67.0, fp64_tflops=67.0),
}
# FP8 (e4m3) tensor cores run twice bf16's dense rate (datasheet: H100 SXM 1979 vs 989
# TFLOP/s); the measured bf16 rate doubled is a lead until FP8 GEMMs are measured here.
FP8_SPEEDUP = 2.0
ISSUE_PER_CYCLE = 4  # warp-instructions an SM issues per cycle: four schedulers (Hopper architecture)
# One TMA load's round trip that a tile waits for, the memory system loaded by the other SMs:
# a lead (the #22 reading put the two serial waits of a tile at 2.5-3.5 us).
WAIT_US = 1.5
# Zeroing stream-K's counters before each launch (torch.zeros: one more launch in the
# stream): a lead.
MEMSET_US = 2.0
ATTENTION_TFLOPS = 450.0  # lead: SDPA (cuDNN / FlashAttention) at head dim 128, 1297 tokens, not measured here


def gemm_us(card: dict, m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, ctas_per_sm: int, warps: int,
            epilogue_instructions: int, serial_waits: int, flatten: bool, bytes_moved: int,
            tensor_cores: bool = True, fp8: bool = False, stream_k: bool = False) -> float:
    """The persistent GEMM's predicted microseconds.

    Per tile: the main loop at the tensor-core rate (the card's matmul rate shared by its
    SMs), then what is not overlapped with it: the epilogue (its SASS instructions, per warp,
    times the CTA's warps, at the SM's issue rate), the serial waits before the main loop and
    the pipeline's fill at the tile's start (none when the tile loop is flattened). With two
    CTAs per SM one CTA's exposed time runs under the other's main loop, down to the tensor
    cores' own time. Tiles are dealt round-robin, so the busiest SM runs ceil(tiles / SMs) of
    them; with stream-K (kernels/gemm.py: the last tiles shared out by K-steps) every SM runs
    tiles / SMs of them, plus the split tiles' meeting: a piece's partial sum stored and
    released, the other piece's loaded, two round trips (WAIT_US each) on a program's path,
    and 3 x 4 bytes per output element of each of the (programs - 1) split tiles at most; and
    the counters' zeroing (MEMSET_US). Never below the bytes moved at copy bandwidth."""
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    rate = (card["matmul_tflops"] if tensor_cores else card["fp32_tflops"]) * 1e6 / card["sms"]  # FLOP/us per SM
    if fp8:
        rate *= FP8_SPEEDUP
    mma = 2.0 * block_m * block_n * k / rate
    epilogue = epilogue_instructions * warps / ISSUE_PER_CYCLE / (card["clock_ghz"] * 1e3)
    exposed = epilogue + (serial_waits + (0 if flatten else 1)) * WAIT_US
    per_tile = mma + exposed if ctas_per_sm == 1 else max(mma, (mma + exposed) / ctas_per_sm)
    programs = ctas_per_sm * card["sms"]
    if stream_k and cuts_tiles(tiles, programs, k, block_k):
        rounds, meeting = tiles / card["sms"], 2 * WAIT_US + MEMSET_US
        bytes_moved += (programs - 1) * 3 * 4 * block_m * block_n
    else:
        rounds, meeting = math.ceil(tiles / card["sms"]), 0.0
    return max(rounds * per_tile + meeting, bytes_moved / (card["copy_gbs"] * 1e3))


def cublas_us(card: dict, m: int, n: int, k: int) -> float:
    """A cuBLAS GEMM (the unfused alternatives' and torch.compile's): its FLOPs at the
    measured matmul rate, which cuBLAS reaches on large GEMMs."""
    return 2.0 * m * n * k / (card["matmul_tflops"] * 1e6)


def memory_us(card: dict, bytes_moved: float) -> float:
    """A memory-bound kernel: its bytes at the measured copy bandwidth."""
    return bytes_moved / (card["copy_gbs"] * 1e3)


def fused_vs_unfused(gemm_pred: Dict[str, Dict[str, float]], s: Shape) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """Each fused GEMM op of the fast block and its unfused alternative, predicted per card:
    {card: {op: (fused us, unfused us)}}. Fused: the gate's prediction of the GEMM with its
    epilogue, plus the norm of the new residual stream (a row kernel: no output tile holds a
    whole 3200-wide row). Unfused: cuBLAS, then the row kernels at their minimum bytes (GELU in
    place; the residual add fused with the norm)."""
    el, rows, c, h = s.el, s.rows, s.width, s.hidden
    out = {}
    for name, card in CARDS.items():
        norm, res_norm = memory_us(card, 2 * rows * c * el), memory_us(card, 4 * rows * c * el)
        out[name] = dict(
            proj_residual_norm2=(gemm_pred["linear_residual[proj]"][name] + norm, cublas_us(card, rows, c, c) + res_norm),
            fc1_gelu=(gemm_pred["linear_gelu"][name], cublas_us(card, rows, h, c) + memory_us(card, 2 * rows * h * el)),
            fc2_residual_next_norm=(gemm_pred["linear_residual[fc2]"][name] + norm,
                                    cublas_us(card, rows, c, h) + res_norm))
    return out


def block_table(gemm_pred: Dict[str, Dict[str, float]], s: Shape) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Predicted microseconds of one block at ``s`` per op and card, for the eager
    reference, torch.compile of it and the fast path. ``gemm_pred``: the gate's predictions
    of the fused GEMMs at ``s`` ({"linear_gelu": {"h100": us, ...}, "linear_residual[proj]": ...,
    "linear_residual[fc2]": ...}).

    Eager: cuBLAS GEMMs, and each row op as the separate kernels upstream's modules launch:
    RMSNorm (x.float(), pow, mean, rsqrt multiply, cast, weight multiply: 36 bytes moved per
    bf16 element against the fused kernel's 4), QK-norm as two such norms plus the copies of
    q and k that upstream's transpose-and-flatten makes, LayerScale and the residual add (two
    kernels, 10 bytes per element). torch.compile: cuBLAS GEMMs with Inductor's fused row
    kernels at their minimum bytes, which is what the unfused alternatives cost. Fast: for
    each fused op the cheaper of the gate's prediction of it and its unfused alternative
    (the tuned table's choice), the row kernels at their minimum. Attention (one backend for
    all three) and the qkv GEMM (plain cuBLAS everywhere) are common.

    "fast floor": the most the fast path's design can reach, its GEMMs at cuBLAS's rate with
    no tile quantization and their epilogues free, and only the row traffic it cannot fuse
    into a GEMM: QK-norm and the norms after proj and fc2, each over whole 3200-wide rows
    that no output tile holds, at their minimum bytes. A target above torch.compile / floor
    is out of this design's reach (the fast path would need to beat cuBLAS's GEMMs or fuse
    those norms into the next GEMM or into attention)."""
    el, rows, c, h = s.el, s.rows, s.width, s.hidden
    act = rows * c * el
    out = {}
    for name, card in CARDS.items():
        att = 4.0 * rows * rows * c / (ATTENTION_TFLOPS * 1e6)  # QK^T and PV over all heads
        qkv = cublas_us(card, rows, 3 * c, c)
        proj, fc1, fc2 = cublas_us(card, rows, c, c), cublas_us(card, rows, h, c), cublas_us(card, rows, c, h)
        gelu = memory_us(card, 2 * rows * h * el)
        norm_min, res_norm_min = memory_us(card, 2 * act), memory_us(card, 4 * act)
        qk_min = memory_us(card, 4 * act)
        eager_norm = memory_us(card, 18 * act)  # 36 bytes per bf16 element
        eager_res = memory_us(card, 5 * act)  # gamma * h, then x + that
        eager = dict(norm1=eager_norm, qkv=qkv, qk_norm=2 * eager_norm + memory_us(card, 4 * act), attention=att,
                     proj=proj,
                     residual1=eager_res, norm2=eager_norm, fc1=fc1, gelu=gelu, fc2=fc2, residual2=eager_res)
        compiled = dict(norm1=norm_min, qkv=qkv, qk_norm=qk_min, attention=att, proj=proj,
                        residual1_norm2=res_norm_min, fc1=fc1, gelu=gelu, fc2=fc2, residual2_next_norm=res_norm_min)
        # (the fast block's first norm is the previous block's last: counted once, at the end)
        choices = fused_vs_unfused(gemm_pred, s)[name]
        fast = dict(qkv=qkv, qk_norm=qk_min, attention=att, **{op: min(t) for op, t in choices.items()})
        floor = dict(qkv=qkv, qk_norm=qk_min, attention=att, proj_norm2=proj + norm_min, fc1_gelu=fc1,
                     fc2_next_norm=fc2 + norm_min)
        out[name] = {"eager": eager, "torch.compile": compiled, "fast": fast, "fast floor": floor}
        fp8 = ("fp8_linear", "fp8_linear_gelu", "fp8_linear_residual[proj]", "fp8_linear_residual[fc2]")
        if all(k in gemm_pred for k in fp8):
            # precision="fp8": the norms write e4m3 (a row read, a byte and a scale per 128 written),
            # the attention output goes through the quantizer; attention and qk_norm as above.
            # Each GEMM op: the cheaper of the fused kernel and its unfused alternative (cuBLASLt's
            # block-scaled GEMM, taken at FP8_SPEEDUP x the bf16 rate: a lead, then row kernels:
            # fc1 GELU in place and the quantizer over the hidden activation; proj/fc2 the
            # residual + norm kernel writing e4m3), as the tuned table picks.
            quant = memory_us(card, rows * c * (el + 1) + rows * c / 128 * 4)
            quant_h = memory_us(card, rows * h * (el + 1) + rows * h / 128 * 4)
            res_norm_fp8 = memory_us(card, rows * c * (3 * el + 1) + rows * c / 128 * 4)
            out[name]["fast fp8"] = dict(
                qkv=min(gemm_pred["fp8_linear"][name], qkv / FP8_SPEEDUP), qk_norm=qk_min, attention=att,
                quantize_attention=quant,
                proj_residual_norm2=min(gemm_pred["fp8_linear_residual[proj]"][name] + quant,
                                        proj / FP8_SPEEDUP + res_norm_fp8),
                fc1_gelu=min(gemm_pred["fp8_linear_gelu"][name], fc1 / FP8_SPEEDUP + gelu + quant_h),
                fc2_residual_next_norm=min(gemm_pred["fp8_linear_residual[fc2]"][name] + quant,
                                           fc2 / FP8_SPEEDUP + res_norm_fp8))
    return out
