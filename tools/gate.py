"""Compile gate: build every kernel configuration the fast path can launch, for sm_90 and sm_80.

    python -m tools.gate [--arch 90 80] [--json]

No GPU is needed: Triton compiles ahead of time for a named target, and the wheel's
cuobjdump and nvdisasm read each cubin. The builds are the launch plans the launchers
themselves make (``kernels/launch.py``): each kernel of the registry
(``internvit_fast.kernels.REGISTRY``) runs its planner, the function its launcher calls,
at the segmentation shapes (504x504 and 448x448, batch 1 to 8, bf16/fp16/fp32), for the
card (architecture, SM count, its committed tuned table), and the gate builds each plan's
function with the plan's constexprs and options (``enable_fp_fusion``, ``num_warps``,
``num_stages``) and the runtime signature the plan describes (pointers 16-byte aligned and
integers divisible by 16 marked as Triton's JIT marks them at launch). So a launcher that
changes what it launches changes what the gate builds.

Per build: registers, spilled bytes (stack + local), spill instructions inside a GEMM's
main loop (the innermost loop around its MMA instructions, found in the SASS) and the MMA
instructions in it (``mma``: per k-step of a GEMM, per key tile of attention), shared
memory, whether the PTX uses wgmma and TMA (cp.async.bulk.tensor), contracted FMAs, and
global loads issued after the first store. It fails when a kernel does not compile, a
row kernel spills, a GEMM spills inside its main loop, an sm_90 bf16/fp16 GEMM lacks
wgmma or (when built for it) TMA, a kernel that promises upstream's rounding points
contains a contracted fma, or a row kernel that should issue every load first does not.
A kernel's same-bits promises (KernelSpec.same_bits: the GELU against one on CUDA's erff)
are built in a probe for each target and both PTX programs run on CPU over the promise's
inputs (ptx_eval); one differing input fails the gate.
The table ends with each kernel's bytes moved at the main shape (504 UPerNet, batch 4,
bf16) against the least it must move. ``--json`` prints one JSON list instead (a record per
build and target, then a record per kernel's traffic) and exits non-zero on a failure.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tools import costs, ptx_eval
from internvit_fast.kernels import REGISTRY
from internvit_fast.kernels.common import INTERPRETING
from internvit_fast.kernels.gemm import EPILOGUES
from internvit_fast.kernels.launch import LaunchPlan, Meta, Target
from internvit_fast.kernels.registry import KernelSpec, Shape, main_shape
from internvit_fast.kernels.launch import table

# The cards the gate builds for: Hopper (H100/H200: 132 SMs) and the A100 (108).
TARGETS = {90: ("sm90", 132), 80: ("sm80", 108)}

# Constants a bf16/fp16/fp32 register can hold that make an fma exact single-rounding
# arithmetic (sm_80 has no bf16 mul or add: LLVM writes a*b as fma(a, b, -0) and a+b as
# fma(a, 1, b)). Any other fma was contracted from a separate multiply and add.
_NEG_ZERO = {"0x8000", "0x80008000", "-2147450880", "-32768", "0f80000000"}
_ONE = {"0x3F80", "0x3f80", "16256", "0x3C00", "0x3c00", "15360", "1065369472", "1006648320",
        "0x3F803F80", "0x3f803f80", "0x3C003C00", "0x3c003c00", "0f3F800000"}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def read_cubin(cubin: bytes) -> Tuple[Dict[str, int], str]:
    """(resource usage from cuobjdump, SASS from nvdisasm) of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}, sass


def sass_instructions(sass: str) -> Tuple[List[str], Dict[str, int]]:
    """The instructions of a SASS listing in order, and each label's index."""
    labels, insts = {}, []
    for ln in sass.splitlines():
        m = re.match(r"^\s*(\.L\w+):", ln)
        if m:
            labels[m.group(1)] = len(insts)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", ln)
        if m:
            insts.append(m.group(1))
    return insts, labels


def _opcode(inst: str) -> str:
    words = inst.split()
    return (words[1] if words[0].startswith("@") and len(words) > 1 else words[0]).split(".")[0]


def _loops(insts: List[str], labels: Dict[str, int], predicated: bool = False) -> List[Tuple[int, int]]:
    """(first, last) instruction of each loop: a backward branch and its target. ``predicated``:
    only conditional branches (ptxas places a wait's retry loop after the kernel's end and
    jumps back unconditionally into the code, which is not a loop of the code)."""
    loops = []
    for i, inst in enumerate(insts):
        m = re.search(r"\bBRA\s+`?\(?(\.L\w+)", inst)
        if m and m.group(1) in labels and labels[m.group(1)] <= i and (inst.startswith("@") or not predicated):
            loops.append((labels[m.group(1)], i))
    return loops


def _main_loop(insts: List[str], labels: Dict[str, int]):
    """(first, last) of the innermost loop around the MMA instructions (HGMMA, QGMMA: the FP8
    wgmma, else HMMA, else FFMA), or None."""
    loops = _loops(insts, labels)
    ops = [_opcode(x) for x in insts]
    for marker in ("HGMMA", "QGMMA", "HMMA", "FFMA"):
        at = [i for i, op in enumerate(ops) if op == marker]
        inside = [(e - s, s, e) for s, e in loops if any(s <= j <= e for j in at)]
        if inside:
            return min(inside)[1:]
    return None


def main_loop_spills(sass: str):
    """Spill instructions (STL/LDL) in the main loop (the innermost loop around the MMA
    instructions), its length, and its MMA instructions (wgmma: HGMMA, QGMMA; HMMA); None
    when no loop holds an MMA."""
    insts, labels = sass_instructions(sass)
    loop = _main_loop(insts, labels)
    if loop is None:
        return None
    s, e = loop
    ops = [_opcode(insts[j]) for j in range(s, e + 1)]
    return (sum(op in ("STL", "LDL") for op in ops), e - s + 1,
            sum(op in ("HGMMA", "QGMMA", "HMMA") for op in ops))


def epilogue_instructions(sass: str):
    """Instructions (per warp) from the end of the main loop to the end of the tile loop
    around it (to the kernel's end when there is none): a tile's epilogue, which nothing
    overlaps with its main loop. None without a main loop."""
    insts, labels = sass_instructions(sass)
    loop = _main_loop(insts, labels)
    if loop is None:
        return None
    outer = [e for s, e in _loops(insts, labels, predicated=True) if s < loop[0] and e > loop[1]]
    end = min(outer) if outer else next((i for i in range(loop[1], len(insts)) if _opcode(insts[i]) == "EXIT"),
                                         len(insts) - 1)
    return end - loop[1]


def serial_waits_before_mma(sass: str):
    """mbarrier waits (SYNCS.PHASECHK: a TMA load's completion) a tile passes between its
    start (the top of the loop around the main loop; the kernel's start when there is none)
    and its main loop: each is a DRAM round trip before the tile's first MMA. None without a
    main loop."""
    insts, labels = sass_instructions(sass)
    loop = _main_loop(insts, labels)
    if loop is None:
        return None
    outer = [(s, e) for s, e in _loops(insts, labels, predicated=True) if s < loop[0] and e > loop[1]]
    start = max(s for s, _ in outer) if outer else 0
    return sum(insts[j].split()[0] != "BRA" and "SYNCS.PHASECHK" in insts[j] for j in range(start, loop[0]))


def loads_after_first_store(sass: str) -> int:
    """Global loads (LDG) issued after the first global store (STG)."""
    ops = [_opcode(x) for x in sass_instructions(sass)[0]]
    first = next((i for i, op in enumerate(ops) if op == "STG"), len(ops))
    return sum(op == "LDG" for op in ops[first:])


def stream_k_meeting(ptx: str) -> Optional[str]:
    """What is wrong with a stream-K build's meeting of a cut tile's two pieces, read off the
    PTX (None: nothing). The piece's partial sum is stored by every thread, then one thread
    counts it in with an atomic: that atomic must be acq_rel at gpu scope (release: the
    partial is visible before the count; acquire: the piece counted second sees the other's),
    and a CTA barrier must stand between the stores and it, or the other threads' stores are
    not ordered before the release (Triton inserts none for global memory)."""
    lines = ptx.splitlines()
    atoms = [i for i, line in enumerate(lines) if re.search(r"\batom\.global\.", line)]
    if not atoms:
        return "stream-K build without the atomic that counts a cut tile's pieces"
    for i in atoms:
        if not re.search(r"\batom\.global\.gpu\.acq_rel\.", lines[i]):
            return f"stream-K's counter atomic is not acq_rel at gpu scope: {lines[i].strip()}"
        before = next((line for line in reversed(lines[:i]) if re.search(r"\b(st\.global|bar\.sync)", line)), "")
        if "bar.sync" not in before:
            return "stream-K's partial sums are stored with no CTA barrier before the atomic that releases them"
    return None


def contracted_fmas(ptx: str, llir: str) -> int:
    """fma instructions in the PTX that a multiply and an add were contracted into.

    Not counted: fma with a -0 addend (a multiply) or a multiplicand of 1 (an add), which
    sm_80 uses for bf16 arithmetic, and as many fmas as the LLVM IR calls explicitly
    (llvm.fma / llvm.fmuladd: an FMA dot product, libdevice's erf)."""
    consts = dict(re.findall(r"mov\.(?:b16|b32|f32)\s+(%\w+),\s*([-\w]+)\s*;", ptx))
    lanes = 0  # counted per value: a bf16x2/f16x2 fma does two
    for ty, a, b, c in re.findall(
            r"\bfma\.rn(?:\.ftz)?(?:\.sat)?\.(\w+)\s+%\w+,\s*([%\w]+),\s*([%\w]+),\s*([%\w]+)\s*;", ptx):
        a, b, c = (consts.get(x, x) for x in (a, b, c))
        if c not in _NEG_ZERO and a not in _ONE and b not in _ONE:
            lanes += 2 if ty.endswith("x2") else 1
    explicit = sum(int(n or 1) for n in re.findall(r"call [^\n]*@llvm\.(?:fma|fmuladd)\.(?:v(\d+))?", llir))
    return max(0, lanes - explicit)


# An SM of sm_80 and sm_90: 64K 32-bit registers, allocated per warp in units of 256; shared
# memory 164 KB (A100) and 228 KB (H100/H200), 1 KB of it reserved per CTA (CUDA programming
# guide, compute capabilities table).
SM_REGISTERS = 65536
SM_SHARED = {80: 167936, 90: 233472}


def fits(registers: int, warps: int, shared: int, ctas: int, arch: int = 90) -> bool:
    """Whether ``ctas`` CTAs of this build can be resident on one SM together."""
    per_warp = -(-registers * 32 // 256) * 256
    return ctas * warps * per_warp <= SM_REGISTERS and ctas * (shared + 1024) <= SM_SHARED[arch]


def target(arch: int) -> Target:
    name, sms = TARGETS[arch]
    return Target(name, sms, table(name))


def is_gemm(plan: LaunchPlan) -> bool:
    return "tl.dot(" in plan.fn.src  # its main loop feeds tensor cores (or FMA, in fp32)


def is_linear(plan: LaunchPlan) -> bool:
    """A GEMM of gemm.py (M, N, K): what costs.gemm_us models (attention is priced by its rate)."""
    return is_gemm(plan) and all(k in plan.args for k in ("M", "N", "K"))


def _config(plan: LaunchPlan) -> str:
    skip = {"DOT_PRECISION", "HAS_BIAS", "EVEN_K"}
    cfg = ",".join(f"{k}={v}" for k, v in plan.constexprs.items() if k not in skip)
    return f"{cfg},w{plan.options['num_warps']},s{plan.options.get('num_stages', 1)}"


def _build_key(plan: LaunchPlan) -> tuple:
    sig, attrs = plan.signature()
    return (plan.function, tuple(sorted(sig.items())), tuple(sorted(attrs)), tuple(sorted(plan.constexprs.items())),
            tuple(sorted(plan.options.items())))


def build(kernel: KernelSpec, plan: LaunchPlan, arch: int) -> dict:
    """Compile one plan for sm_<arch>; return its record (with the failures it shows)."""
    rec = dict(kernel=kernel.id, target=f"sm_{arch}", function=plan.function, constexprs=dict(plan.constexprs),
               options=dict(plan.options), config=_config(plan), launch=plan.label, tuned=plan.tuned, failures=[])
    try:
        ck = triton.compile(plan.source(), target=GPUTarget("cuda", arch, 32), options=dict(plan.options))
    except Exception as e:  # noqa: BLE001 - any compiler error is a failure to report
        rec["failures"].append(f"compile failed: {type(e).__name__}: {str(e)[:300]}")
        return rec
    use, sass = read_cubin(ck.asm["cubin"])
    ptx = ck.asm["ptx"]
    rec.update(registers=use["REG"], spills=use.get("STACK", 0) + use.get("LOCAL", 0),
               shared_bytes=ck.metadata.shared, wgmma="wgmma.mma_async" in ptx,
               tma="cp.async.bulk.tensor" in ptx,
               # e4m3 conversions that round to nearest even (what the interpreter tests assume)
               fp8_cvt_rn=len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)),
               fp8_cvt_other=len(re.findall(r"cvt\.(?!rn\.satfinite\.e4m3x2\.f32)[\w.]*e4m3x2\.f32", ptx)),
               fma_contracted=kernel.promises_rounding and contracted_fmas(ptx, ck.asm["llir"]) > 0)
    fail = rec["failures"]
    if is_gemm(plan):
        loop = main_loop_spills(sass)
        rec["main_loop_spills"] = loop[0] if loop else None
        rec["main_loop_instructions"] = loop[1] if loop else None
        rec["main_loop_mma"] = loop[2] if loop else None
        rec["serial_waits_before_mma"] = serial_waits_before_mma(sass)
        rec["epilogue_instructions"] = epilogue_instructions(sass)
        if loop is None:
            fail.append("no main loop around MMA instructions found in the SASS")
        elif plan.flags.get("EPILOGUE") == EPILOGUES["residual"] and rec["serial_waits_before_mma"]:
            fail.append(f"{rec['serial_waits_before_mma']} TMA waits before the main loop: the residual "
                        "epilogue's loads are not overlapped with it")
        elif loop[0]:
            fail.append(f"{loop[0]} spill instructions inside the main loop")
        low_precision = plan.constexprs.get("DOT_PRECISION") != "ieee"  # fp32 runs FMA by design
        if arch >= 90 and low_precision and not rec["wgmma"]:
            fail.append("sm_90 GEMM does not use wgmma")
        if arch >= 90 and plan.flags.get("SCALED") and not re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx):
            fail.append("sm_90 FP8 GEMM does not use the e4m3 wgmma")
        ctas = plan.constexprs.get("PROGRAMS", 0) // TARGETS[arch][1]
        if ctas > 1 and not fits(rec["registers"], plan.options["num_warps"], rec["shared_bytes"], ctas, arch):
            fail.append(f"{ctas} CTAs per SM planned, but {rec['registers']} registers x "
                        f"{32 * plan.options['num_warps']} threads and {rec['shared_bytes']} bytes of shared "
                        f"memory do not fit {ctas} on an SM")
        if plan.constexprs.get("STREAM_K"):
            meeting = stream_k_meeting(ptx)
            if meeting:
                fail.append(meeting)
        if plan.constexprs.get("USE_TMA") and not rec["tma"]:
            fail.append("built for TMA but the PTX has no cp.async.bulk.tensor")
    elif rec["spills"]:
        fail.append(f"row kernel spills ({rec['spills']} bytes)")
    writes_fp8 = plan.flags.get("QUANT_OUT") or any(getattr(v, "dtype", None) == torch.float8_e4m3fn
                                                   for k, v in plan.args.items() if k in ("Q", "Y"))
    if writes_fp8 and (rec["fp8_cvt_other"] or not rec["fp8_cvt_rn"]):
        fail.append("an e4m3 output not converted by cvt.rn.satfinite (round to nearest even) alone")
    if kernel.promises_rounding and plan.options.get("enable_fp_fusion", True):
        fail.append("a kernel that promises upstream's rounding points is built with FMA contraction on")
    if rec["fma_contracted"]:
        fail.append("contracted fma in a kernel that promises upstream's rounding points")
    if kernel.loads_first:
        rec["loads_after_store"] = loads_after_first_store(sass)
        if rec["loads_after_store"]:
            fail.append(f"{rec['loads_after_store']} global loads issued after the first store")
    return rec


def check(arch: int, kernels=REGISTRY) -> List[dict]:
    """A record per kernel and distinct plan its planner makes for sm_<arch>. Plans that build
    the same binary (proj and fc2, say, or batch sizes that only change a runtime integer)
    are built once."""
    records, built, seen = [], {}, set()
    tgt = target(arch)
    for kernel in kernels:
        for plan in kernel.plans(tgt):
            key = _build_key(plan)
            if (kernel.id, key) in seen:
                continue
            seen.add((kernel.id, key))
            if key not in built:
                built[key] = build(kernel, plan, arch)
            rec = dict(built[key], kernel=kernel.id, launch=plan.label, tuned=plan.tuned)
            if arch == 90 and is_linear(plan) and rec.get("epilogue_instructions") is not None:
                rec["predicted_us"] = predicted_gemm_us(plan, rec)
            elif arch == 90 and is_linear(plan):
                rec["predicted_us"] = None
            records.append(rec)
    rng = np.random.default_rng()  # fresh inputs each run, beside the exhaustive ones
    for kernel in kernels:
        records += same_bits(kernel, arch, rng)
    return records


@triton.jit
def _probe(X, Y, FN: tl.constexpr):
    """One fp32 per thread through FN: straight-line PTX that ptx_eval can run."""
    i = tl.arange(0, 128)
    tl.store(Y + i, FN(tl.load(X + i)))


def same_bits(kernel: KernelSpec, arch: int, rng: np.random.Generator) -> List[dict]:
    """A record per same-bits promise of ``kernel`` (KernelSpec.same_bits): both functions
    compiled for sm_<arch> in a probe, both PTX programs run on CPU over the inputs
    (ptx_eval), failing where any input's bits differ (NaN for NaN is equal)."""
    records = []
    for what, ours, reference, x in (kernel.same_bits(rng) if kernel.same_bits else ()):
        rec = dict(kernel=kernel.id, target="same bits", arch=f"sm_{arch}", config=what, launch="probe",
                   inputs=len(x), failures=[])
        try:
            got = ptx_eval.evaluate(_probe_ptx(ours, arch), x)
            want = ptx_eval.evaluate(_probe_ptx(reference, arch, cuda_libdevice()), x)
        except Exception as e:  # noqa: BLE001 - a probe that does not build or run is a failure to report
            rec["failures"].append(f"sm_{arch}: {type(e).__name__}: {str(e)[:300]}")
            records.append(rec)
            continue
        bad = (got.view(np.uint32) != want.view(np.uint32)) & ~(np.isnan(got) & np.isnan(want))
        rec["differ"] = int(bad.sum())
        if rec["differ"]:
            i = np.flatnonzero(bad)[:3]
            rec["failures"].append(f"sm_{arch}: {rec['differ']} of {len(x)} inputs differ from the reference, e.g. "
                                   f"at {x[i].tolist()}: {got[i].tolist()} vs {want[i].tolist()}")
        records.append(rec)
    return records


def _probe_ptx(fn, arch: int, libdevice: Optional[str] = None) -> str:
    src = ASTSource(_probe, signature={"X": "*fp32", "Y": "*fp32", "FN": "constexpr"}, constexprs={"FN": fn})
    options = dict(num_warps=4)
    if libdevice:  # as nvcc links it into torch: __CUDA_FTZ 0 (Triton's default reflects ftz 1)
        options.update(extern_libs=(("libdevice", libdevice),), enable_reflect_ftz=False)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def cuda_libdevice() -> str:
    """CUDA's libdevice, whose math nvcc links into torch's CUDA build (the same-bits
    references are built against it, not against the one Triton bundles, which in Triton 3.6
    is older): $INTERNVIT_FAST_LIBDEVICE, or the one pip's nvidia-nvvm (CUDA 13) or
    nvidia-cuda-nvcc-cu12 installs."""
    env = os.environ.get("INTERNVIT_FAST_LIBDEVICE")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"INTERNVIT_FAST_LIBDEVICE={env}: no such file")
        return env
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else ()):
        for sub in ("cu13/nvvm/libdevice/libdevice.10.bc", "cuda_nvcc/nvvm/libdevice/libdevice.10.bc"):
            if os.path.isfile(os.path.join(root, sub)):
                return os.path.join(root, sub)
    raise FileNotFoundError("CUDA's libdevice.10.bc not found: pip install nvidia-nvvm==13.0.88 (in the test extra), "
                            "or set INTERNVIT_FAST_LIBDEVICE to a libdevice.10.bc")


def predicted_gemm_us(plan: LaunchPlan, rec: dict, cards: Optional[Dict[str, dict]] = None
                      ) -> Optional[Dict[str, float]]:
    """The cost model's microseconds (costs.gemm_us) per Hopper card for one GEMM plan, from
    its shape and launch and what its sm_90 build record read off the SASS. ``cards``: the
    cards' rates (default costs.CARDS, the measured ones; costs.card_at for a range's ends)."""
    c, a = plan.constexprs, plan.args
    m, n, k = a["M"], a["N"], a["K"]
    el = plan.dtype.itemsize  # a and w (e4m3 for an FP8 GEMM)
    out_el = plan.args["X"].element_size if isinstance(plan.args["X"], Meta) else el  # y (+ x)
    groups = triton.cdiv(triton.cdiv(m, c["BLOCK_M"]), c["GROUP_M"])
    epi = c.get("EPILOGUE")
    moved = (m * k + groups * n * k) * el + m * n * (2 if epi in (2, 3) else 1) * out_el  # a, w per group, y (+ x)
    if c.get("FLATTEN"):  # the epilogue sits inside the flattened main loop: the model cannot place it
        return None
    return {name: round(costs.gemm_us(card, m, n, k, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"],
                                      c["PROGRAMS"] // card["sms"],
                                      plan.options["num_warps"], rec["epilogue_instructions"],
                                      rec.get("serial_waits_before_mma") or 0, bool(c.get("FLATTEN")), moved,
                                      tensor_cores=c.get("DOT_PRECISION") != "ieee",
                                      fp8=bool(c.get("SCALED")), stream_k=bool(c.get("STREAM_K"))), 1)
            for name, card in (cards or costs.CARDS).items()}


def candidate_plans(kernel: KernelSpec, arch: int) -> List[LaunchPlan]:
    """The plans the launcher makes at the main shape under each of the tuner's candidates for
    sm_<arch>: as if the card's table held that candidate (the way a tuned launch is planned)."""
    tgt = target(arch)
    inputs = kernel.make_inputs(main_shape(), "meta")
    name, items = kernel.plan_for(inputs, tgt).tuned_key
    return [kernel.plan_for(inputs, Target(tgt.arch, tgt.sms, {name: [dict(shape=dict(items), config=cfg)]}))
            for cfg in kernel.candidates(tgt.arch)]


def traffic(kernels=REGISTRY, records=()) -> List[dict]:
    """Each kernel's bytes moved at the main shape (as sm_90 plans it) against the least it
    must move, and its predicted microseconds per card: a GEMM's from its sm_90 build among
    ``records`` (absent when it was not built), a row kernel's from its bytes at copy
    bandwidth."""
    shape = main_shape()
    tgt = target(90)
    out = []
    for kernel in kernels:
        plan = kernel.plan_for(kernel.make_inputs(shape, "meta"), tgt)
        moved, least, _ = costs.counts(kernel.id, shape, plan)
        row = dict(kernel=kernel.id, shape=shape.label(), bytes_moved=moved, bytes_min=least, ratio=moved / least)
        if not is_gemm(plan):
            row["predicted_us"] = {name: round(costs.memory_us(card, moved), 1) for name, card in costs.CARDS.items()}
        elif not is_linear(plan):  # attention: its FLOPs at the rate's high end (costs.RATES)
            row["predicted_us"] = {name: round(costs.attention_us(costs.card_at(name, "fast"), costs.counts(
                kernel.id, shape, plan)[2], fp8=True), 1) for name in costs.CARDS}
        else:
            found = [r for r in records if r["target"] == "sm_90" and r["kernel"] == kernel.id
                     and r["constexprs"] == plan.constexprs and r["options"] == plan.options
                     and r.get("epilogue_instructions") is not None]  # the binary this plan launches
            pred = predicted_gemm_us(plan, found[0]) if found else None
            if pred:
                row["predicted_us"] = pred
        out.append(row)
    return out


def predictions(arch: int = 90) -> Dict[str, Dict[str, float]]:
    """Each registry kernel's predicted microseconds per card at the main shape, its sm_90
    plan there built once (what the GPU run sets beside its measurements)."""
    if INTERPRETING:
        raise RuntimeError("the kernels were imported for Triton's interpreter: nothing to compile")
    tgt, records = target(arch), []
    for kernel in REGISTRY:
        plan = kernel.plan_for(kernel.make_inputs(main_shape(), "meta"), tgt)
        records.append(dict(build(kernel, plan, arch), kernel=kernel.id, launch=plan.label))
    return {t["kernel"]: t["predicted_us"] for t in traffic(REGISTRY, records) if t.get("predicted_us")}


def block_predictions(batch: int, tokens: int, arch: int = 90) -> Dict[str, Dict[str, Dict[str, float]]]:
    """The fused GEMMs (bf16 and FP8) as the launchers plan them at ``batch`` x ``tokens`` rows,
    built for sm_<arch>, predicted at both ends of the rates: {end: {kernel: {card: us}}}."""
    shape, tgt = Shape(batch * tokens), target(arch)
    out = {end: {} for end in costs.ENDS}
    for kernel in REGISTRY:
        if kernel.id not in costs.FUSED_GEMMS + costs.FP8_GEMMS:
            continue
        plan = kernel.plan_for(kernel.make_inputs(shape, "meta"), tgt)
        rec = build(kernel, plan, arch)
        if rec.get("epilogue_instructions") is None:
            continue
        for end in costs.ENDS:
            pred = predicted_gemm_us(plan, rec, {n: costs.card_at(n, end) for n in costs.CARDS})
            if pred:
                out[end][kernel.id] = pred
    return out


def _span(lo_hi) -> str:
    lo, hi = lo_hi
    return f"{lo:.0f}-{hi:.0f}"


def print_block(model: dict, out=sys.stdout) -> None:
    """The block table (costs.block_model) as text: per card, each op's range per path, totals."""
    for card in costs.CARDS:
        print(f"\n== one block, batch {model['batch']} x {model['tokens']} tokens, {card}: predicted us, "
              f"[fast rates - slow rates] (fused GEMMs: {model['fused_gemms']}) ==", file=out)
        print(f"{'op':<10} {'GFLOP':>8} {'MB':>8}  " + "  ".join(f"{p:>11}" for p in costs.PATHS), file=out)
        for op in model["ops"]:
            print(f"{op['op']:<10} {op['flops'] / 1e9:>8.1f} {op['bytes'] / 1e6:>8.1f}  "
                  + "  ".join(f"{_span(op['us'][card][p]):>11}" for p in costs.PATHS), file=out)
        tot = model["total"][card]
        print(f"{'total':<10} {'':>8} {'':>8}  " + "  ".join(f"{_span(tot[p]):>11}" for p in costs.PATHS), file=out)
        ratio = {p: (tot["compile"][0] / tot[p][0], tot["compile"][1] / tot[p][1]) for p in ("fast", "fp8", "fp8_attn")}
        print(f"vs torch.compile: fast x{ratio['fast'][0]:.3f}-{ratio['fast'][1]:.3f}, "
              f"fp8 x{ratio['fp8'][0]:.2f}-{ratio['fp8'][1]:.2f}, fp8_attn x{ratio['fp8_attn'][0]:.2f}-"
              f"{ratio['fp8_attn'][1]:.2f} (same ends of the rates)", file=out)
    print("\nrates (low-high) and their sources:", file=out)
    for k, v in model["rates"]["h100"].items():
        print(f"  {k}: {v['low']}-{v['high']} (H100; H200: {model['rates']['h200'][k]['low']}-"
              f"{model['rates']['h200'][k]['high']}): {v['source']}", file=out)


CROPS = (448, 504, 672, 896)
CROP_BATCHES = (1, 4, 8)


def crop_table(arch: int = 90) -> List[dict]:
    """Per crop size and batch: the block model with the fused GEMMs built at that shape, and
    costs.crop_model's ms (blocks, + FPN, + UPerNet head)."""
    rows = []
    for img in CROPS:
        tokens = (img // 14) ** 2 + 1
        for b in CROP_BATCHES:
            rows.append(costs.crop_model(img, b, costs.block_model(b, tokens, block_predictions(b, tokens, arch))))
    return rows


def print_crops(rows: List[dict], out=sys.stdout) -> None:
    for card in costs.CARDS:
        print(f"\n== per batch of crops, {card}: predicted ms [fast rates - slow rates]; backbone (48 blocks) + FPN "
              f"| + UPerNet head ==", file=out)
        print(f"{'crop':>5} {'batch':>5} {'tokens':>6}  " + "  ".join(f"{p:>23}" for p in costs.PATHS), file=out)
        for r in rows:
            cells = [f"{_span(r['ms'][card][p]['backbone_fpn'])} | {_span(r['ms'][card][p]['segmentor'])}"
                     for p in costs.PATHS]
            print(f"{r['img']:>5} {r['batch']:>5} {r['tokens']:>6}  " + "  ".join(f"{c:>23}" for c in cells), file=out)


def print_table(records: List[dict], moved: List[dict], out=sys.stdout) -> None:
    for r in records:
        if r["target"] == "same bits":
            print(f"same bits: {r['kernel']} {r['config']} on {r['arch']}: "
                  f"{'FAILED' if r['failures'] else 'equal'} over {r['inputs']} inputs", file=out)
    for target in sorted({r["target"] for r in records} - {"same bits"}, reverse=True):
        print(f"\n== {target} ==", file=out)
        print(f"{'kernel':<22} {'configuration':<76} {'regs':>4} {'spill':>5} {'loop':>4} {'smem':>7} "
              f"{'wgmma':>5} {'mma':>3} {'tma':>3} {'fma':>3}  launch", file=out)
        for r in records:
            if r["target"] != target:
                continue
            if "registers" not in r:
                print(f"{r['kernel']:<22} {r['config']:<76} COMPILE FAILED  {r['launch']}", file=out)
                continue
            loop = r.get("main_loop_spills")
            print(f"{r['kernel']:<22} {r['config']:<76} {r['registers']:>4} {r['spills']:>5} "
                  f"{'-' if loop is None else loop:>4} {r['shared_bytes']:>7} {'yes' if r['wgmma'] else 'no':>5} "
                  f"{r.get('main_loop_mma') if r.get('main_loop_mma') is not None else '-':>3} "
                  f"{'yes' if r['tma'] else 'no':>3} {'yes' if r['fma_contracted'] else 'no':>3}  {r['launch']}",
                  file=out)
    print("\n== bytes moved at the main shape (GEMMs: DRAM bytes with the weight read once per row-group), "
          "and the cost model's time ==",
          file=out)
    for t in moved:
        pred = t.get("predicted_us")
        us = "  predicted " + ", ".join(f"{c} {v:.1f} us" for c, v in pred.items()) if pred else ""
        print(f"{t['kernel']:<22} {t['shape']:<14} {t['bytes_moved'] / 1e6:>9.1f} MB  minimum "
              f"{t['bytes_min'] / 1e6:>9.1f} MB  x{t['ratio']:.2f}{us}", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90, 80)")
    ap.add_argument("--json", action="store_true", help="print one JSON list of records instead of tables")
    ap.add_argument("--candidates", action="store_true",
                    help="build the tuner's candidates at the main shape instead of the launchers' plans")
    ap.add_argument("--block", action="store_true",
                    help="instead of the gate: the cost model's block table (ops x eager, compile, fast, fp8 as "
                         "ranges), its fused GEMMs built at --batch x --tokens (--json: as one JSON object)")
    ap.add_argument("--crops", action="store_true",
                    help="with --block: also the per-crop ms for 448/504/672/896 crops at batch 1/4/8")
    ap.add_argument("--batch", type=int, default=4, help="--block's batch (default 4)")
    ap.add_argument("--tokens", type=int, default=1297, help="--block's tokens per sequence (default 1297: 504 crops)")
    ap.add_argument("--kernels", nargs="+", metavar="ID", help="only these registry kernels (e.g. linear_gelu)")
    args = ap.parse_args(argv)
    if INTERPRETING:  # the kernels were built for the interpreter: nothing to compile
        print("tools.gate: TRITON_INTERPRET=1 is set; run it without the interpreter", file=sys.stderr)
        return 2
    if args.block:
        if args.batch < 1 or args.tokens < 1:
            ap.error(f"--batch {args.batch} --tokens {args.tokens}: both must be at least 1")
        model = costs.block_model(args.batch, args.tokens, block_predictions(args.batch, args.tokens, args.arch[0]))
        crops = crop_table(args.arch[0]) if args.crops else None
        if args.json:
            print(json.dumps(dict(model, crops=crops) if crops else model, indent=1))
        else:
            print_block(model)
            if crops:
                print_crops(crops)
        return 0
    kernels = REGISTRY
    if args.kernels:
        unknown = set(args.kernels) - {k.id for k in REGISTRY}
        if unknown:
            ap.error(f"--kernels: no kernel {sorted(unknown)}; the registry has {[k.id for k in REGISTRY]}")
        kernels = [k for k in REGISTRY if k.id in args.kernels]
    if args.candidates:
        records = [dict(build(k, p, arch), candidate=True, plan=p) for arch in args.arch for k in kernels
                   for p in candidate_plans(k, arch) if is_gemm(p)]
        for r in records:
            plan = r.pop("plan")
            if r["target"] == "sm_90" and is_linear(plan) and r.get("epilogue_instructions") is not None:
                r["predicted_us"] = predicted_gemm_us(plan, r)  # (attention's candidates: built, not priced)
    else:
        records = [r for arch in args.arch for r in check(arch, kernels)]
    moved = traffic(kernels, records)
    failures = [f"{r['target']} {r['kernel']} {r['config']} ({r['launch']}): {f}"
                for r in records for f in r["failures"]]
    if args.json:
        print(json.dumps(records + [dict(t, target="traffic") for t in moved], indent=1))
    else:
        print_table(records, moved)
        print("\nFAILED:\n  " + "\n  ".join(failures) if failures else "\nall kernels compiled clean")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
