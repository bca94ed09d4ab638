"""Compile gate: build every kernel configuration the fast path can launch, for sm_90 and sm_80.

    python -m internvit_fast.compile_check [--arch 90 80] [--json]

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
main loop (the innermost loop around its MMA instructions, found in the SASS), shared
memory, whether the PTX uses wgmma and TMA (cp.async.bulk.tensor), contracted FMAs, and
global loads issued after the first store. It fails when a kernel does not compile, a
row kernel spills, a GEMM spills inside its main loop, an sm_90 bf16/fp16 GEMM lacks
wgmma or (when built for it) TMA, a kernel that promises upstream's rounding points
contains a contracted fma, or a row kernel that should issue every load first does not.
The table ends with each kernel's bytes moved at the main shape (504 UPerNet, batch 4,
bf16) against the least it must move. ``--json`` prints one JSON list instead (a record per
build and target, then a record per kernel's traffic) and exits non-zero on a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import costs
from .kernels import REGISTRY
from .kernels._common import INTERPRETING
from .kernels.launch import LaunchPlan, Target
from .kernels.registry import KernelSpec, main_shape
from .kernels.tuning import table

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


def main_loop_spills(sass: str):
    """Spill instructions (STL/LDL) in the innermost loop around the MMA instructions, and its
    length; None when no loop holds an MMA. The MMA is HGMMA (wgmma), else HMMA, else FFMA."""
    insts, labels = sass_instructions(sass)
    loops = []
    for i, inst in enumerate(insts):
        m = re.search(r"\bBRA\s+`?\(?(\.L\w+)", inst)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            loops.append((labels[m.group(1)], i))
    ops = [_opcode(x) for x in insts]
    for marker in ("HGMMA", "HMMA", "FFMA"):
        at = [i for i, op in enumerate(ops) if op == marker]
        inside = [(e - s, s, e) for s, e in loops if any(s <= j <= e for j in at)]
        if inside:
            _, s, e = min(inside)
            return sum(ops[j] in ("STL", "LDL") for j in range(s, e + 1)), e - s + 1
    return None


def loads_after_first_store(sass: str) -> int:
    """Global loads (LDG) issued after the first global store (STG)."""
    ops = [_opcode(x) for x in sass_instructions(sass)[0]]
    first = next((i for i, op in enumerate(ops) if op == "STG"), len(ops))
    return sum(op == "LDG" for op in ops[first:])


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


def target(arch: int) -> Target:
    name, sms = TARGETS[arch]
    return Target(name, sms, table(name))


def is_gemm(plan: LaunchPlan) -> bool:
    return "tl.dot(" in plan.fn.src  # its main loop feeds tensor cores (or FMA, in fp32)


def _config(plan: LaunchPlan) -> str:
    skip = {"DOT_PRECISION", "NUM_SMS", "HAS_BIAS", "EVEN_K"}
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
               fma_contracted=kernel.promises_rounding and contracted_fmas(ptx, ck.asm["llir"]) > 0)
    fail = rec["failures"]
    if is_gemm(plan):
        loop = main_loop_spills(sass)
        rec["main_loop_spills"] = loop[0] if loop else None
        rec["main_loop_instructions"] = loop[1] if loop else None
        if loop is None:
            fail.append("no main loop around MMA instructions found in the SASS")
        elif loop[0]:
            fail.append(f"{loop[0]} spill instructions inside the main loop")
        low_precision = plan.constexprs.get("DOT_PRECISION") != "ieee"  # fp32 runs FMA by design
        if arch >= 90 and low_precision and not rec["wgmma"]:
            fail.append("sm_90 GEMM does not use wgmma")
        if plan.constexprs.get("USE_TMA") and not rec["tma"]:
            fail.append("built for TMA but the PTX has no cp.async.bulk.tensor")
    elif rec["spills"]:
        fail.append(f"row kernel spills ({rec['spills']} bytes)")
    if kernel.promises_rounding and plan.options.get("enable_fp_fusion", True):
        fail.append("a kernel that promises upstream's rounding points is built with FMA contraction on")
    if rec["fma_contracted"]:
        fail.append("contracted fma in a kernel that promises upstream's rounding points")
    if kernel.loads_first:
        rec["loads_after_store"] = loads_after_first_store(sass)
        if rec["loads_after_store"]:
            fail.append(f"{rec['loads_after_store']} global loads issued after the first store")
    return rec


def check(arch: int) -> List[dict]:
    """A record per kernel and distinct plan its planner makes for sm_<arch>. Plans that build
    the same binary (proj and fc2, say, or batch sizes that only change a runtime integer)
    are built once."""
    records, built, seen = [], {}, set()
    tgt = target(arch)
    for kernel in REGISTRY:
        for plan in kernel.plans(tgt):
            key = _build_key(plan)
            if (kernel.id, key) in seen:
                continue
            seen.add((kernel.id, key))
            if key not in built:
                built[key] = build(kernel, plan, arch)
            records.append(dict(built[key], kernel=kernel.id, launch=plan.label, tuned=plan.tuned))
    return records


def traffic() -> List[dict]:
    """Each kernel's bytes moved at the main shape (as sm_90 plans it) against the least it must move."""
    shape = main_shape()
    tgt = target(90)
    out = []
    for kernel in REGISTRY:
        plan = kernel.plan_for(kernel.make_inputs(shape, "meta"), tgt)
        moved, least, _ = costs.counts(kernel.id, shape, plan)
        out.append(dict(kernel=kernel.id, shape=shape.label(), bytes_moved=moved, bytes_min=least,
                        ratio=moved / least))
    return out


def print_table(records: List[dict], moved: List[dict], out=sys.stdout) -> None:
    for target in sorted({r["target"] for r in records}, reverse=True):
        print(f"\n== {target} ==", file=out)
        print(f"{'kernel':<22} {'configuration':<76} {'regs':>4} {'spill':>5} {'loop':>4} {'smem':>7} "
              f"{'wgmma':>5} {'tma':>3} {'fma':>3}  launch", file=out)
        for r in records:
            if r["target"] != target:
                continue
            if "registers" not in r:
                print(f"{r['kernel']:<22} {r['config']:<76} COMPILE FAILED  {r['launch']}", file=out)
                continue
            loop = r.get("main_loop_spills")
            print(f"{r['kernel']:<22} {r['config']:<76} {r['registers']:>4} {r['spills']:>5} "
                  f"{'-' if loop is None else loop:>4} {r['shared_bytes']:>7} {'yes' if r['wgmma'] else 'no':>5} "
                  f"{'yes' if r['tma'] else 'no':>3} {'yes' if r['fma_contracted'] else 'no':>3}  {r['launch']}",
                  file=out)
    print("\n== bytes moved at the main shape (GEMMs: DRAM bytes with the weight read once per row-group) ==",
          file=out)
    for t in moved:
        print(f"{t['kernel']:<22} {t['shape']:<14} {t['bytes_moved'] / 1e6:>9.1f} MB  minimum "
              f"{t['bytes_min'] / 1e6:>9.1f} MB  x{t['ratio']:.2f}", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90, 80)")
    ap.add_argument("--json", action="store_true", help="print one JSON list of records instead of tables")
    args = ap.parse_args(argv)
    if INTERPRETING:  # the kernels were built for the interpreter: nothing to compile
        print("compile_check: TRITON_INTERPRET=1 is set; run it without the interpreter", file=sys.stderr)
        return 2
    records = [r for arch in args.arch for r in check(arch)]
    moved = traffic()
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
