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
from dataclasses import dataclass
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
    if spec_id in ("qk_norm_fp8", "attention_fp8"):  # per sequence, heads of s.heads()
        (batch, tokens), (heads, d) = s.sequences(), s.heads()
        c = heads * d
        if spec_id == "qk_norm_fp8":
            b = qk_norm_fp8_bytes(batch, tokens, c, heads, el)
            return b, b, 0
        b = 3 * rows * c + 3 * rows * heads * 4 + rows * c * el  # q, k, v and scales read once, o written
        return b, b, batch * 4 * tokens * tokens * c
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
        rate *= card.get("fp8_speedup", FP8_SPEEDUP)
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


def memory_us(card: dict, bytes_moved: float) -> float:
    """A memory-bound kernel: its bytes at the measured copy bandwidth."""
    return bytes_moved / (card["copy_gbs"] * 1e3)


# --- rates with their ranges and sources -------------------------------------------------
#
# Every rate the block model uses, per card, as (low, high, source). Predictions are ranges:
# the low rates give the high end of a time, the high rates the low end. "measured" is this
# project's lent machines (shared/TOOLCHAIN.md); a "lead" is a reading or an assumption that
# the first GPU run replaces (benchmarks/results: measured beside predicted, and
# ``python -m tools.calibrate`` prints the constants that would fit).


@dataclass(frozen=True)
class Rate:
    low: float
    high: float
    source: str


_MATMUL = Rate(650.0, 790.0, "bf16 GEMM TFLOP/s: 790 measured (8192^3, cuBLAS, the lent H100/H200 machines); "
                             "650-780 public cuBLAS/CUTLASS figures on an H100 at M~5k, K=3200 (lead for our shapes)")
_ATTENTION = Rate(450.0, 600.0, "bf16 SDPA TFLOP/s, head dim 128, non-causal: FlashAttention-3 paper (H100 SXM): "
                                "FA3 565/625, cuDNN 574/617 at sequence 1k/2k; 1297 tokens and 25 heads lower (lead)")
_FP8_ATTENTION = Rate(0.75, 1.45, "FP8 attention rate / bf16 SDPA rate (kernels/attention_fp8.py against cuDNN): "
                                  "1.2-1.45 cuDNN's FP8 over its bf16 at head dim 128, sequence 1k/2k (FA3 paper, "
                                  "H100: 751/886 vs 574/617 TFLOP/s); ours is a Triton FA2-shaped kernel without TMA "
                                  "or warp specialization, which the FA3 paper puts well below cuDNN: 0.75 (lead)")
_FP8 = Rate(1.3, 2.0, "FP8 GEMM rate / bf16 GEMM rate: 1.3-1.65 public fine-grained-scaled (1x128, 128x128) FP8 "
                      "GEMMs on H100/H800 at these sizes; 2.0 the datasheet's dense ratio (1979 vs 989 TFLOP/s)")
RATES: Dict[str, Dict[str, Rate]] = {
    "h100": dict(matmul=_MATMUL, attention=_ATTENTION, fp8_speedup=_FP8, fp8_attention_speedup=_FP8_ATTENTION,
                 copy=Rate(2550.0, 3000.0, "GB/s read + written: 3000 measured device-to-device (H100); row kernels "
                                           "at 85% of it the low end (lead)")),
    "h200": dict(matmul=_MATMUL, attention=_ATTENTION, fp8_speedup=_FP8, fp8_attention_speedup=_FP8_ATTENTION,
                 copy=Rate(3650.0, 4300.0, "GB/s read + written: 4300 measured device-to-device (H200); row kernels "
                                           "at 85% of it the low end (lead)")),
}
ENDS = ("fast", "slow")  # the high rates, the low rates


def attention_us(card: dict, flops: float, fp8: bool = False) -> float:
    """Attention's microseconds at one end of the rates (card_at): bf16 SDPA's rate, times
    fp8_attention_speedup for the FP8 kernel."""
    return flops / (card["attention_tflops"] * (card["fp8_attention_speedup"] if fp8 else 1.0) * 1e6)


def card_at(name: str, end: str) -> dict:
    """CARDS[name] with the rates of one end of their ranges: "fast" (high rates) or "slow"."""
    r = RATES[name]
    pick = (lambda x: x.high) if end == "fast" else (lambda x: x.low)
    return dict(CARDS[name], matmul_tflops=pick(r["matmul"]), copy_gbs=pick(r["copy"]),
                attention_tflops=pick(r["attention"]), fp8_speedup=pick(r["fp8_speedup"]),
                fp8_attention_speedup=pick(r["fp8_attention_speedup"]))


# --- one block, op by op -------------------------------------------------------------------
#
# The reference block's ops in the order they run (model.py Block._forward), counted per
# sequence: attention is batch x (4 T^2 C), never (B T)^2. FLOPs are the matrix products
# (what torch's FlopCounterMode counts: the GEMMs and q k^T, p v; norms and elementwise work
# count 0); bytes are the least each op must read and write (its inputs, weights and outputs,
# once). tests/test_tools.py ties both to independent counts on the reference block.
OPS = ("norm1", "qkv", "qk_norm", "attention", "proj", "residual1", "norm2", "fc1", "gelu", "fc2", "residual2")
PATHS = ("eager", "compile", "fast", "fp8", "fp8_attn")  # fp8_attn: fp8 with attention in e4m3 too
GEMM_OPS = ("qkv", "proj", "fc1", "fc2")
FUSED_GEMMS = ("linear_gelu", "linear_residual[proj]", "linear_residual[fc2]")
FP8_GEMMS = ("fp8_linear", "fp8_linear_gelu", "fp8_linear_residual[proj]", "fp8_linear_residual[fc2]")


def op_counts(batch: int, tokens: int, width: int = 3200, hidden: int = 12800, el: int = 2,
              qkv_bias: bool = False) -> Dict[str, Tuple[int, int]]:
    """(FLOPs, least bytes) of each op of one block on ``batch`` sequences of ``tokens``."""
    r, c, h = batch * tokens, width, hidden
    act = r * c * el
    norm = 2 * act + c * el  # x and the weight read, h written
    residual = 3 * act + c * el  # x, y and gamma read, x_new written
    return {
        "norm1": (0, norm),
        "qkv": (2 * r * 3 * c * c, act + 3 * c * c * el + (3 * c * el if qkv_bias else 0) + 3 * act),
        "qk_norm": (0, 4 * act + 2 * c * el),  # q and k read and written, two weights
        "attention": (batch * 4 * tokens * tokens * c, 4 * act),  # per sequence: q k^T and p v; q, k, v read, o written
        "proj": (2 * r * c * c, act + c * c * el + c * el + act),
        "residual1": (0, residual),
        "norm2": (0, norm),
        "fc1": (2 * r * h * c, act + h * c * el + h * el + r * h * el),
        "gelu": (0, 2 * r * h * el),
        "fc2": (2 * r * c * h, r * h * el + c * h * el + c * el + act),
        "residual2": (0, residual),
    }


def path_bytes(batch: int, tokens: int, width: int = 3200, hidden: int = 12800, el: int = 2
               ) -> Dict[str, Dict[str, float]]:
    """The bytes each path's row kernels move per op slot (GEMMs and attention: see path_us).

    eager: upstream's RMSNorm as the ops it launches (x.float(), pow, mean, the rsqrt multiply,
    the cast back, the weight multiply: (28 + 4 el) bytes per element, 36 in bf16); q_norm and
    k_norm two such norms on the strided q and k views (the reference makes no copies);
    LayerScale and the add two kernels (5 activations); GELU one kernel.
    compile (Inductor on the reference, a lead until its GPU code is read): each norm fused
    with the residual before it (x, y, gamma read; x_new and h written: the first block's
    norm1 is the previous block's residual2), QK-norm one pass, GELU one pass after fc1.
    fast / fp8: the fused ops' row traffic only where a row kernel runs: QK-norm, and the norm
    after proj and after fc2 (whole 3200-wide rows no output tile holds); the residual and
    GELU are GEMM epilogues (see path_us for the unfused alternatives). Every norm once: this
    block's norm1 slot holds the norm the previous block's fc2 op wrote."""
    counts = op_counts(batch, tokens, width, hidden, el)
    r, c = batch * tokens, width
    act = r * c * el
    eager_norm = r * c * (28 + 4 * el) + c * el
    fused_norm = 4 * act + 2 * c * el  # residual + norm in one pass
    return {
        "eager": dict(norm1=eager_norm, qk_norm=2 * eager_norm, residual1=5 * act + c * el, norm2=eager_norm,
                      gelu=counts["gelu"][1], residual2=5 * act + c * el),
        "compile": dict(norm1=0, qk_norm=counts["qk_norm"][1], residual1=fused_norm, norm2=0,
                        gelu=counts["gelu"][1], residual2=fused_norm),
        "fast": dict(norm1=counts["norm1"][1], qk_norm=counts["qk_norm"][1], residual1=0, norm2=counts["norm2"][1],
                     gelu=0, residual2=0),
        "fp8": dict(norm1=r * c * (el + 1) + r * math.ceil(c / 128) * 4 + c * el, qk_norm=counts["qk_norm"][1],
                    residual1=0, norm2=r * c * (el + 1) + r * math.ceil(c / 128) * 4 + c * el, gelu=0, residual2=0),
    }


def qk_norm_fp8_bytes(batch: int, tokens: int, width: int = 3200, heads: int = 25, el: int = 2) -> int:
    """qk_norm_fp8: q, k and v read, written in e4m3 (v transposed, its rows padded to 16
    tokens) with a scale per token, head and tensor; the two norm weights."""
    r, c = batch * tokens, width
    return 3 * r * c * el + 2 * r * c + batch * c * (-(-tokens // 16) * 16) + 3 * r * heads * 4 + 2 * c * el


def path_us(card: dict, batch: int, tokens: int, gemm_pred: Optional[Dict[str, float]] = None,
            width: int = 3200, hidden: int = 12800, el: int = 2, chosen: Optional[Dict[str, bool]] = None
            ) -> Dict[str, Dict[str, float]]:
    """Predicted microseconds of each op of one block per path on ``card`` (one end of the
    rates: card_at). ``gemm_pred``: the gate's predictions of the fused GEMMs at this shape on
    this card end ({"linear_gelu": us, ...}, FP8 ones too); without them the fast paths'
    GEMMs are taken at cuBLAS's rate with free epilogues (their floor).

    fast: each fused op at the cheaper of the fused kernel and its unfused alternative (the
    tuned table's choice: cuBLAS, then the row kernel at its least bytes), as the fast path
    runs; fp8: the same with the FP8 GEMMs (cuBLASLt's block-scaled GEMM at fp8_speedup x
    the bf16 rate as the alternative) and the attention output through the quantizer.
    ``chosen``: {fused op: whether it runs unfused}; an empty dict is filled with this card
    end's choices, a filled one is followed (the tuned table picks once per shape: a range's
    two ends keep the same implementations)."""
    chosen = {} if chosen is None else chosen

    def unfused(key: str, fused_us: float, unfused_us: float) -> bool:
        if key not in chosen:
            chosen[key] = unfused_us < fused_us
        return chosen[key]

    counts = op_counts(batch, tokens, width, hidden, el)
    rb = path_bytes(batch, tokens, width, hidden, el)
    r, c, h = batch * tokens, width, hidden
    act = r * c * el
    mm = {op: counts[op][0] / (card["matmul_tflops"] * 1e6) for op in GEMM_OPS}
    att = attention_us(card, counts["attention"][0])
    mem = {p: {op: memory_us(card, b) for op, b in ops.items()} for p, ops in rb.items()}
    out = {}
    for p in ("eager", "compile"):
        out[p] = dict(mem[p], attention=att, **mm)
    pred = gemm_pred or {}
    norm = memory_us(card, counts["norm2"][1])
    res_norm = memory_us(card, 4 * act + 2 * c * el)  # the unfused alternative's residual + norm kernel
    gelu = memory_us(card, counts["gelu"][1])
    fast = dict(mem["fast"], attention=att, qkv=mm["qkv"])
    for op, spec, ext in (("proj", "linear_residual[proj]", "residual1"), ("fc2", "linear_residual[fc2]", "residual2")):
        fused = pred.get(spec, mm[op])
        if unfused(spec, fused + norm, mm[op] + res_norm):  # cuBLAS, then residual + norm in one row kernel
            norm_slot = "norm2" if op == "proj" else "norm1"
            fast.update({op: mm[op], ext: res_norm, norm_slot: 0.0})
        else:
            fast[op] = fused
    fused = pred.get("linear_gelu", mm["fc1"])
    if not unfused("linear_gelu", fused, mm["fc1"] + gelu):
        fast.update(fc1=fused, gelu=0.0)
    else:  # cuBLAS, then the in-place GELU kernel
        fast.update(fc1=mm["fc1"], gelu=gelu)
    out["fast"] = fast
    k8 = card.get("fp8_speedup", FP8_SPEEDUP)
    quant = memory_us(card, r * c * (el + 1) + r * math.ceil(c / 128) * 4)
    quant_h = memory_us(card, r * h * (el + 1) + r * math.ceil(h / 128) * 4)
    res_norm8 = memory_us(card, r * c * (3 * el + 1) + r * math.ceil(c / 128) * 4 + 2 * c * el)
    norm8 = mem["fp8"]["norm2"]
    fp8 = dict(mem["fp8"], attention=att + quant)  # the attention output quantized for proj
    fused = pred.get("fp8_linear", mm["qkv"] / k8)
    fp8["qkv"] = mm["qkv"] / k8 if unfused("fp8_linear", fused, mm["qkv"] / k8) else fused
    for op, spec, ext in (("proj", "fp8_linear_residual[proj]", "residual1"),
                          ("fc2", "fp8_linear_residual[fc2]", "residual2")):
        fused = pred.get(spec, mm[op] / k8)
        if unfused(spec, fused + norm8, mm[op] / k8 + res_norm8):
            fp8.update({op: mm[op] / k8, ext: res_norm8, "norm2" if op == "proj" else "norm1": 0.0})
        else:
            fp8[op] = fused
    fused = pred.get("fp8_linear_gelu", mm["fc1"] / k8)
    if not unfused("fp8_linear_gelu", fused, mm["fc1"] / k8 + gelu + quant_h):
        fp8.update(fc1=fused, gelu=0.0)
    else:  # unfused: cuBLASLt, then GELU and the quantizer over the hidden activation
        fp8.update(fc1=mm["fc1"] / k8, gelu=gelu + quant_h)
    out["fp8"] = fp8
    # FP8 attention: QK-norm writes e4m3 q, k and v; the kernel's epilogue writes proj's e4m3
    # input (no quantizer pass); its time at fp8_attention_speedup x the bf16 SDPA rate.
    out["fp8_attn"] = dict(fp8, qk_norm=memory_us(card, qk_norm_fp8_bytes(batch, tokens, width, width // 128, el)),
                           attention=attention_us(card, counts["attention"][0], fp8=True))
    return {p: {op: out[p][op] for op in OPS} for p in PATHS}


def block_model(batch: int, tokens: int, gemm_pred: Optional[Dict[str, Dict[str, Dict[str, float]]]] = None,
                width: int = 3200, hidden: int = 12800) -> dict:
    """The block table as JSON: ``{"ops": [{"op", "flops", "bytes", "us": {card: {path: [low, high]}}}],
    "total": {card: {path: [low, high]}}, "rates": {...}}``. ``gemm_pred``: {end: {spec: {card: us}}},
    the gate's fused-GEMM predictions at both ends of the rates (None: their cuBLAS floor)."""
    counts = op_counts(batch, tokens, width, hidden)
    t, choices = {}, {}
    for name in CARDS:
        choices[name] = {}  # made at the fast end (the measured rates), kept at the slow end
        t[name] = {end: path_us(card_at(name, end), batch, tokens,
                                {k: v[name] for k, v in (gemm_pred or {}).get(end, {}).items() if name in v},
                                width, hidden, chosen=choices[name]) for end in ENDS}
    ops = [dict(op=op, flops=counts[op][0], bytes=counts[op][1],
                us={name: {p: [round(t[name]["fast"][p][op], 1), round(t[name]["slow"][p][op], 1)] for p in PATHS}
                    for name in CARDS}) for op in OPS]
    total = {name: {p: [round(sum(t[name]["fast"][p].values()), 1), round(sum(t[name]["slow"][p].values()), 1)]
                    for p in PATHS} for name in CARDS}
    rates = {name: {k: dict(low=v.low, high=v.high, source=v.source) for k, v in RATES[name].items()}
             for name in CARDS}
    unfused = {name: sorted(k for k, v in c.items() if v) for name, c in choices.items()}
    return dict(batch=batch, tokens=tokens, width=width, hidden=hidden, ops=ops, total=total, rates=rates,
                unfused=unfused,
                fused_gemms="the gate's sm_90 builds" if gemm_pred else "cuBLAS rate, epilogues free (no builds)")


def crop_model(img: int, batch: int, block: dict, depth: int = 48, patch: int = 14, width: int = 3200) -> dict:
    """Per batch of ``img`` x ``img`` crops: ms for the backbone's blocks, + the FPN, + the
    UPerNet head (upstream's 504 recipe), per card and path, [low, high]. The patch embedding,
    FPN and head at the matmul rate (their FLOPs: the FPN's transposed convolutions, the head
    counted by FlopCounterMode; a lower bound: their memory traffic is not modelled, a lead)."""
    from internvit_fast.segmentation.segmentor import head_flops
    g = img // patch
    fpn = 2 * width * width * (4 * g * g + 16 * g * g) + 2 * width * width * 4 * g * g  # up1 (two), up2
    embed = 2 * g * g * width * 3 * patch * patch
    head = head_flops("upernet", (img, img))
    out = {}
    for name in CARDS:
        rate = {end: card_at(name, end)["matmul_tflops"] * 1e9 for end in ENDS}  # FLOP per ms
        rows = {}
        for p in PATHS:
            blocks = [depth * us / 1e3 for us in block["total"][name][p]]  # [fast end, slow end]
            fpn_ms = [batch * (fpn + embed) / rate[end] for end in ENDS]
            head_ms = [batch * head / rate[end] for end in ENDS]
            rows[p] = dict(blocks=[round(b, 2) for b in blocks],
                           backbone_fpn=[round(b + f, 2) for b, f in zip(blocks, fpn_ms)],
                           segmentor=[round(b + f + hd, 2) for b, f, hd in zip(blocks, fpn_ms, head_ms)])
        out[name] = rows
    return dict(img=img, batch=batch, tokens=g * g + 1, ms=out)
