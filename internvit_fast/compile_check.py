"""Compile gate: build every kernel configuration the fast path can pick, for sm_90 and sm_80.

    python -m internvit_fast.compile_check [--arch 90 80]

No GPU is needed: Triton compiles ahead of time for a named target, and the
wheel's cuobjdump reads registers and stack frame from each cubin. One table per
target: kernel, configuration, registers, spill (stack/local bytes), shared
memory, and for GEMMs whether the PTX uses wgmma. Exits 1 when a kernel fails to
compile, a norm kernel spills, or an sm_90 GEMM lacks wgmma.

The argument values below are those the fast path passes for InternViT-6B
(width 3200, MLP 12800) at 504x504 (1297 tokens) and 448x448 (1025 tokens),
batch 1 to 8. Like Triton's JIT, pointers are taken as 16-byte aligned and
integers divisible by 16 are marked so: that is what enables vector loads and
cp.async/TMA pipelining, so a spec without it would not be the kernel that runs.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .kernels import tuning
from .kernels._common import INTERPRETING, row_launch
from .kernels.gelu_linear import CONFIGS as GEMM_CONFIGS
from .kernels.gelu_linear import _gelu_linear_kernel
from .kernels.qk_norm import _qk_norm_kernel
from .kernels.residual_rms_norm import _residual_rms_norm_kernel
from .kernels.rms_norm import _rms_norm_kernel

EMBED, HIDDEN = 3200, 12800
TOKENS = {"504": 1297, "448": 1025}
BATCHES = range(1, 9)
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass
class Spec:
    name: str
    kernel: object
    args: Dict[str, object]  # runtime args: "*bf16"-style strings for pointers, else values
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int = 1
    is_gemm: bool = False
    shapes: List[str] = field(default_factory=list)

    def source(self) -> ASTSource:
        sig, attrs = {}, {}
        for i, name in enumerate(self.kernel.arg_names):
            if name in self.constexprs:
                sig[name] = "constexpr"
                continue
            v = self.args[name]
            if isinstance(v, str):
                sig[name] = v
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn=self.kernel, signature=sig, constexprs=self.constexprs, attrs=attrs)

    def key(self):
        div = tuple(sorted((k, v % 16 == 0) for k, v in self.args.items() if isinstance(v, int)))
        ptrs = tuple(sorted(v for v in self.args.values() if isinstance(v, str)))
        return (self.name, ptrs, tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages, div)


def kernel_spec(kernel: str, p: str, m: int, n: int, k: int = 0, launch: dict = None, **flags) -> Spec:
    """One launch as the fast path makes it: pointer type ``p`` ("*bf16"), ``m`` rows of width
    ``n`` (the GEMM: (m, k) @ (k, n)), launch settings as the launcher picks them, flags."""
    launch = dict(launch or row_launch(n if kernel != "gelu_linear" else k))
    warps, stages = launch.pop("num_warps"), launch.pop("num_stages", 1)
    if kernel == "gelu_linear":
        return Spec(kernel, _gelu_linear_kernel,
                    dict(A=p, W=p, BIAS=p, Y=p, M=m, N=n, K=k, stride_am=k, stride_wn=k, stride_ym=n),
                    dict(launch, HAS_BIAS=True, EVEN_K=k % launch["BLOCK_K"] == 0,
                         DOT_PRECISION="ieee" if p == "*fp32" else "tf32"), warps, stages, is_gemm=True)
    if kernel == "rms_norm":
        args = dict(X=p, W=p, Y=p, stride_x=n, stride_y=n, N=n, eps=1e-6)
        return Spec(kernel, _rms_norm_kernel, args, launch, warps)
    if kernel == "qk_norm":
        args = dict(QKV=p, WQ=p, WK=p, OUT=p, stride_qkv=3 * n, rows=m, C=n, eps=1e-6)
        return Spec(kernel, _qk_norm_kernel, args, dict(launch, NORMALIZE=True), warps)
    args = dict(X=p, Y=p, G=p, W=p, X_OUT=p, H_OUT=p, stride_x=n, stride_y=n, stride_xo=n, stride_ho=n,
                N=n, eps=1e-6)
    return Spec(kernel, _residual_rms_norm_kernel, args, dict(launch, **flags), warps)


def specs_for(arch: int) -> List[Spec]:
    """Every (kernel, configuration, specialisation) the fast path launches at these shapes."""
    out: Dict[tuple, Spec] = {}

    def add(spec: Spec, shape: str):
        out.setdefault(spec.key(), spec).shapes.append(shape)

    for dname, p in DTYPES.items():
        gemm = GEMM_CONFIGS["fp32" if dname == "fp32" else ("sm90" if arch == 90 else "sm80")]
        for img, tokens in TOKENS.items():
            for b in BATCHES:
                m, shape = tokens * b, f"{dname} {img}px b{b}"
                add(kernel_spec("rms_norm", p, m, EMBED), shape)
                add(kernel_spec("qk_norm", p, m, EMBED), shape)
                for has_gamma in (True, False):
                    for has_norm in (True, False):
                        add(kernel_spec("residual_rms_norm", p, m, EMBED, HAS_GAMMA=has_gamma,
                                        HAS_NORM=has_norm), shape)
                add(kernel_spec("gelu_linear", p, m, HIDDEN, EMBED, gemm), shape)
    # Measured winners (kernels/tuned/sm<arch>.json) are configurations the fast path picks too.
    for kernel, entries in tuning.table(f"sm{arch}").items():
        for entry in entries:
            sh = entry["shape"]
            launch = entry["config"] if kernel == "gelu_linear" else row_launch(sh["N"], entry["config"])
            flags = dict(HAS_GAMMA=True, HAS_NORM=True) if kernel == "residual_rms_norm" else {}
            add(kernel_spec(kernel, DTYPES[sh["dtype"]], sh["M"], sh["N"], sh.get("K", 0), launch, **flags),
                f"tuned {sh}")
    return list(out.values())


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}


def check(arch: int, out=sys.stdout) -> List[str]:
    """Compile every spec for sm_<arch>; print the table; return the failures."""
    failures = []
    target = GPUTarget("cuda", arch, 32)
    print(f"\n== sm_{arch} ==", file=out)
    print(f"{'kernel':<18} {'configuration':<58} {'regs':>4} {'spill':>5} {'smem':>7} {'wgmma':>5}  shapes",
          file=out)
    for spec in specs_for(arch):
        cfg = ",".join(f"{k}={v}" for k, v in spec.constexprs.items() if k != "DOT_PRECISION")
        cfg += f",w{spec.num_warps},s{spec.num_stages}"
        try:
            ck = triton.compile(spec.source(), target=target,
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        except Exception as e:  # noqa: BLE001 - any compiler error is a failure to report
            failures.append(f"sm_{arch} {spec.name} {cfg}: compile failed: {type(e).__name__}: {e}")
            print(f"{spec.name:<18} {cfg:<58} COMPILE FAILED", file=out)
            continue
        use = resource_usage(ck.asm["cubin"])
        spill = use.get("STACK", 0) + use.get("LOCAL", 0)
        wgmma = "wgmma.mma_async" in ck.asm["ptx"]
        shapes = spec.shapes[0] + (f" (+{len(spec.shapes) - 1})" if len(spec.shapes) > 1 else "")
        print(f"{spec.name:<18} {cfg:<58} {use['REG']:>4} {spill:>5} {ck.metadata.shared:>7} "
              f"{('yes' if wgmma else 'no') if spec.is_gemm else '-':>5}  {shapes}", file=out)
        if not spec.is_gemm and spill:
            failures.append(f"sm_{arch} {spec.name} {cfg}: norm kernel spills ({spill} bytes)")
        is_fp32 = spec.constexprs.get("DOT_PRECISION") == "ieee"  # fp32 FMA path: no wgmma by design
        if spec.is_gemm and arch == 90 and not is_fp32 and not wgmma:
            failures.append(f"sm_90 {spec.name} {cfg}: GEMM does not use wgmma")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90, 80)")
    args = ap.parse_args(argv)
    if INTERPRETING:  # the kernels were built for the interpreter: nothing to compile
        print("compile_check: TRITON_INTERPRET=1 is set; run it without the interpreter", file=sys.stderr)
        return 2
    failures = []
    for arch in args.arch:
        failures += check(arch)
    if failures:
        print("\nFAILED:", *failures, sep="\n  ")
        return 1
    print("\nall kernels compiled clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
