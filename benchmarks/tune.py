"""Sweep launch configurations at the segmentation shapes; commit the winners per architecture.

    python -m benchmarks.tune [--out DIR] [--budget-s 150] [--smoke]
    (or: bash benchmarks/gpu_run.sh --tune, which tunes first and then measures with the winners)

For each kernel and row count (1297 x {1, 2, 4, 8}; width 3200; fc1 to 12800), every
candidate is launched through its ``*_launch`` entry with an explicit configuration,
checked against the plain-torch reference (a candidate that compiles wrong, or does not
fit the card, is dropped), and timed; the fastest wins. The winners go to
``internvit_fast/kernels/tuned/<arch>.json`` (which the launchers read) and a copy to
--out. bf16 only: the model's dtype. --smoke: tiny shapes through the interpreter.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

from benchmarks import harness
from internvit_fast.kernels import (gelu_linear_launch, gelu_linear_ref, qk_norm_launch, qk_norm_ref,
                                    residual_rms_norm_launch, residual_rms_norm_ref, rms_norm_launch,
                                    rms_norm_ref)
from internvit_fast.kernels import tuning

GEMM_CANDIDATES = {
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); GROUP_M 8 throughout.
    "sm90": [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
             (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 128, 128, 8, 3)],
    "sm80": [(128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (256, 128, 32, 8, 3),
             (128, 256, 32, 8, 3)],
    "smoke": [(32, 32, 32, 4, 1), (16, 32, 32, 4, 1)],
}
NORM_WARPS = {"smoke": [4, 16]}
DT = torch.bfloat16


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=harness.DEVICE) * scale).to(DT)


def _close(out, ref64, torch_same):
    """The parity rule of the tests: the candidate's error at most twice torch's, plus atol."""
    err = (out.double() - ref64).abs().max().item()
    base = (torch_same.double() - ref64).abs().max().item()
    return bool(torch.isfinite(out).all()) and err <= 2 * base + 1e-3


def _cases(m: int, c: int, hid: int):
    """kernel -> (run(config) -> output, check(output) -> bool) at m rows."""
    x, y, qkv, a = _rand(m, c, scale=2), _rand(m, c), _rand(m, 3 * c, scale=2), _rand(m, c)
    w, g = _rand(c) + 1, _rand(c, scale=0.1)
    fw, fb = _rand(hid, c, scale=c ** -0.5), _rand(hid)

    def norm_run(launch, out_shape, args):
        def run(cfg):
            out = torch.full(out_shape, float("nan"), dtype=DT, device=harness.DEVICE)
            launch(*args, out, config=cfg)
            return out
        return run

    def res_run(cfg):
        xo, ho = (torch.full((m, c), float("nan"), dtype=DT, device=harness.DEVICE) for _ in range(2))
        residual_rms_norm_launch(x, y, g, w, 1e-6, xo, ho, config=cfg)
        return ho

    x_new, h_same = residual_rms_norm_ref(x, y, g, w)
    return {
        "rms_norm": (norm_run(rms_norm_launch, (m, c), (x, w, 1e-6)),
                     lambda o: _close(o, rms_norm_ref(x.double(), w.double()), rms_norm_ref(x, w))),
        "qk_norm": (norm_run(qk_norm_launch, (3, m, c), (qkv, w, w, 1e-6)),
                    lambda o: _close(o, qk_norm_ref(qkv.double(), w.double(), w.double()), qk_norm_ref(qkv, w, w))),
        "residual_rms_norm": (res_run, lambda o: _close(o, rms_norm_ref(x_new.double(), w.double()), h_same)),
        "gelu_linear": (lambda cfg: gelu_linear_launch(a, fw, fb, torch.full((m, hid), float("nan"), dtype=DT,
                                                                             device=harness.DEVICE), config=cfg),
                        lambda o: _close(o, gelu_linear_ref(a.double(), fw.double(), fb.double()),
                                         gelu_linear_ref(a, fw, fb))),
    }


def candidates(kernel: str, arch: str):
    if kernel == "gelu_linear":
        rows = GEMM_CANDIDATES.get(arch, GEMM_CANDIDATES["sm80"])
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=ns)
                for bm, bn, bk, nw, ns in rows]
    return [dict(num_warps=nw) for nw in NORM_WARPS.get(arch, [4, 8, 16])]


def tune(out_dir: str, budget_s: float, smoke: bool) -> str:
    start = time.time()
    if smoke:
        arch, tokens, c, hid, batches, card = "smoke", 17, 96, 384, [1, 2], "cpu-smoke"
    else:
        arch = tuning.arch_of(harness.DEVICE)
        tokens, c, hid, batches, card = 1297, 3200, 12800, [1, 2, 4, 8], torch.cuda.get_device_name()
    configs, log = {}, []
    with torch.inference_mode():
        for b in batches:
            m = tokens * b
            for kernel, (run, check) in _cases(m, c, hid).items():
                best = None
                for cfg in candidates(kernel, arch):
                    if time.time() - start > budget_s:
                        log.append(f"{kernel} M={m}: time box reached, remaining candidates not tried")
                        break
                    try:
                        ok = check(run(cfg))
                    except Exception as e:  # noqa: BLE001 - out of shared memory, compile errors
                        log.append(f"{kernel} M={m} {cfg}: failed ({type(e).__name__}: {str(e)[:120]})")
                        continue
                    if not ok:
                        log.append(f"{kernel} M={m} {cfg}: wrong result, dropped")
                        continue
                    ms = harness.median_ms(lambda i: run(cfg), warmup=2, repeats=10 if harness.CUDA else 2)["ms"]
                    log.append(f"{kernel} M={m} {cfg}: {ms:.4f} ms")
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best:
                    shape = {"M": m, "N": hid if kernel == "gelu_linear" else c, "dtype": "bf16"}
                    if kernel == "gelu_linear":
                        shape["K"] = c
                    configs.setdefault(kernel, []).append({"shape": shape, "config": best[1], "ms": best[0]})
    result = {"arch": arch, "card": card, "date": datetime.date.today().isoformat(),
              "command": "bash benchmarks/gpu_run.sh --tune" + (" --smoke" if smoke else ""),
              "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
              "configs": configs, "log": log}
    text = json.dumps(result, indent=1)
    targets = [os.path.join(out_dir, f"tuned-{arch}.json")]
    if not smoke:  # the launchers read this file; the smoke run must not leave one behind
        targets.append(os.path.join(tuning.TUNED_DIR, f"{arch}.json"))
    for path in targets:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    print("\n".join(log))
    print(f"tuned {sum(len(v) for v in configs.values())} shapes in {time.time() - start:.0f} s -> {targets}")
    return targets[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if not harness.CUDA and not args.smoke:
        print("tune: CUDA is not available; tuning needs the card it tunes for (use --smoke on CPU)",
              file=sys.stderr)
        return 2
    tune(args.out, args.budget_s, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
