"""python -m tools.calibrate RESULTS.json: a GPU run's measurements beside the cost model's
predictions, and the rates that would make the model fit.

RESULTS.json is what ``bash benchmarks/gpu_run.sh`` writes (benchmarks/results/). Printed:
the 504 backbone at batch 4 per path (measured ms against the model's [fast-rates,
slow-rates] range for 48 blocks + FPN, the ratio to the range's middle), each kernel
benchmarked at batch 4 against its prediction, and the constants of tools/costs.py's RATES as
this run measured them: the matmul and copy ceilings, cuBLAS's rate at our GEMM shapes (the
unfused alternatives' GEMMs), the row kernels' fraction of copy bandwidth, SDPA's rate, and
the FP8 GEMMs' rate over bf16's. With --json, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import List, Optional

from tools import costs

PATHS = {"reference": "eager", "compile-default": "compile", "fast": "fast", "fast-fp8": "fp8"}


def _card(res: dict) -> str:
    return "h200" if "H200" in (res.get("card") or "") else "h100"


def _median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def calibrate(res: dict) -> dict:
    card = _card(res)
    block = res.get("predicted_block") or costs.block_model(4, 1297)
    crop = costs.crop_model(504, 4, block)["ms"][card]
    backbone = []
    for r in res.get("backbone", []):
        path = PATHS.get(r.get("path"))
        if r.get("config") == "upernet" and r.get("batch") == 4 and path and r.get("ms"):
            lo, hi = crop[path]["backbone_fpn"]
            backbone.append(dict(path=path, measured_ms=r["ms"], predicted_ms=[lo, hi],
                                 measured_over_predicted=r["ms"] / ((lo + hi) / 2)))
    pred = res.get("predicted_us") or {}
    kernels = []
    for r in res.get("kernels", []):
        us = (pred.get(r.get("kernel")) or {}).get(card)
        if r.get("batch") == 4 and r.get("impl") in ("triton", "fused") and us and r.get("ms"):
            kernels.append(dict(kernel=r["kernel"], impl=r["impl"], measured_us=r["ms"] * 1e3, predicted_us=us,
                                measured_over_predicted=r["ms"] * 1e3 / us))
    ceil = res.get("ceilings") or {}
    rows = res.get("kernels", [])
    gemm_bf16 = [r["tflops"] for r in rows if r.get("impl") == "unfused" and r.get("tflops")
                 and r.get("kernel", "").startswith("linear_")]
    gemm_fp8 = [r["tflops"] for r in rows if r.get("impl") in ("fused", "unfused") and r.get("tflops")
                and r.get("kernel", "").startswith("fp8_linear")]
    row_frac = [r["frac_copy"] for r in rows if r.get("impl") == "triton" and r.get("frac_copy")]
    sdpa = [r["tflops"] for r in res.get("attention", []) if r.get("tflops") and r.get("impl") == "priority"]
    cublas = _median(gemm_bf16)
    measured = dict(matmul_tflops_8192=ceil.get("matmul_tflops"), matmul_tflops_our_gemms=cublas,
                    copy_gbs=ceil.get("copy_gbs"), row_kernels_frac_of_copy=_median(row_frac),
                    attention_tflops=_median(sdpa),
                    fp8_speedup=(max(gemm_fp8) / cublas) if gemm_fp8 and cublas else None)
    model = {k: dict(low=v.low, high=v.high) for k, v in costs.RATES[card].items()}
    return dict(card=card, backbone=backbone, kernels=kernels, measured_rates=measured, model_rates=model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a GPU run's results JSON (benchmarks/results/<date>-<card>.json)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        with open(args.results) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        ap.error(f"{args.results}: cannot read it as a results file ({e})")
    out = calibrate(res)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"card: {out['card']}")
    print("\nbackbone, 504 UPerNet, batch 4 (48 blocks + FPN): measured vs predicted")
    for b in out["backbone"] or [dict(path="(none measured)", measured_ms=0, predicted_ms=[0, 0],
                                      measured_over_predicted=0)]:
        print(f"  {b['path']:<8} {b['measured_ms']:9.1f} ms  predicted {b['predicted_ms'][0]:.1f}-"
              f"{b['predicted_ms'][1]:.1f} ms  x{b['measured_over_predicted']:.2f}")
    print("\nkernels at batch 4: measured vs predicted")
    for k in out["kernels"]:
        print(f"  {k['kernel']:<26} {k['measured_us']:9.1f} us  predicted {k['predicted_us']:9.1f} us  "
              f"x{k['measured_over_predicted']:.2f}")
    print("\nrates: this run's measurement (the model's low-high)")
    m, model = out["measured_rates"], out["model_rates"]
    for name, key in (("matmul_tflops_our_gemms", "matmul"), ("matmul_tflops_8192", "matmul"),
                      ("attention_tflops", "attention"), ("fp8_speedup", "fp8_speedup"), ("copy_gbs", "copy")):
        v = m.get(name)
        print(f"  {name:<26} {'-' if v is None else format(v, '.3g'):>8}  ({model[key]['low']}-{model[key]['high']})")
    v = m.get("row_kernels_frac_of_copy")
    print(f"  {'row_kernels_frac_of_copy':<26} {'-' if v is None else format(v, '.2f'):>8}  (0.85-1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
