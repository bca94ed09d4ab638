"""The one prepared GPU run (benchmarks/gpu_run.sh calls this).

    python -m benchmarks.gpu_run [--out DIR] [--budget-s 450] [--tune] [--smoke]

1. (--tune) the launch configurations and fused/unfused choices at the segmentation shapes;
2. the kernel, backbone, segmentation and training benchmarks (pytest benchmarks/),
   time-boxed: what does not fit is listed as not measured, never dropped in silence;
3. the tests under CUDA (parity of every kernel, compiled and launched for real; the fast
   model; CUDA graphs replaying exactly) in what is left of the box;
4. writes <date>-<card>.json (card, versions, ceilings, every figure) and a markdown
   table beside it, and prints the short table last.

Without CUDA it fails loudly, unless --smoke: the same entry points at tiny shapes
through Triton's interpreter, so this script cannot rot on CPU-only CI.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pytest(args, env, log_path, timeout=None):
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"] + args
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:  # the box ran out: keep what it printed
        out = (e.output.decode() if isinstance(e.output, bytes) else e.output or "") + \
            f"\n= stopped at the time box after {timeout:.0f} s: not finished ="
        rc = 124
    with open(log_path, "w") as log:
        log.write(out)
    tail = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or [""]
    print(out[-3000:] if rc else tail[0], flush=True)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", out.strip().splitlines()[-1]
                                               if out.strip() else "")}
    return {"rc": rc, "summary": tail[0].strip("= "), "counts": counts, "seconds": round(time.time() - t0, 1)}


def _card(torch) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu-smoke"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()


def collect(raw: dict) -> dict:
    """Split pytest-benchmark's JSON into kernel and backbone records (their extra_info)."""
    out = {"kernels": [], "backbone": [], "checks": []}
    for b in raw.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        kind = "checks" if "check" in info else "backbone" if "path" in info else "kernels"
        out[kind].append(info)
    return out


def markdown(res: dict) -> str:
    c = res["ceilings"]
    lines = [f"# internvit-fast benchmarks: {res['card']}, {res['date']}", "",
             f"torch {res['versions']['torch']}, triton {res['versions']['triton']}, "
             f"CUDA {res['versions']['cuda']}. Command: `{res['command']}`.", "",
             f"Ceilings measured in this run: device copy {c['copy_gbs']:.0f} GB/s (read + write), "
             f"bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s.", "",
             f"Tests under {'CUDA' if res['card'] != 'cpu-smoke' else 'the interpreter'}: "
             f"{res['tests']['summary']}", ""]
    if res["kernels"]:
        lines += ["## Kernels (bf16, rows = 1297 x batch, width 3200)", "",
                  "| kernel | batch | impl | ms | GB/s | of copy | TFLOP/s | of matmul |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in sorted(res["kernels"], key=lambda r: (r["kernel"], r["batch"], r["impl"])):
            lines.append(f"| {k['kernel']} | {k['batch']} | {k['impl']} | {k['ms']:.4f} | "
                         f"{k.get('gbs', float('nan')):.0f} | {k.get('frac_copy', float('nan')):.0%} | "
                         f"{k.get('tflops', float('nan')):.1f} | {k.get('frac_matmul', float('nan')):.0%} |")
        lines.append("")
        chosen = sorted({k["chosen"] for k in res["kernels"] if "chosen" in k})
        if chosen:
            lines += [f"SDPA backend picked for the fast path's q/k/v layout (attention.py priority): "
                      f"{', '.join(chosen)}", ""]
    if res["backbone"]:
        lines += ["## Backbone (bf16 inference)", "",
                  "| config | batch | path | ms/batch | images/s | ms/image | TFLOP/s | of matmul | peak GB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(res["backbone"], key=lambda r: (r["config"], r["batch"], r["path"])):
            peak = r.get("peak_mem_gb")
            lines.append(f"| {r['config']} | {r['batch']} | {r['path']} | {r['ms']:.1f} | {r['images_per_s']:.2f} | "
                         f"{r['ms_per_image']:.1f} | {r['tflops']:.1f} | {r['frac_matmul']:.0%} | "
                         f"{'-' if peak is None else f'{peak:.1f}'} |")
        lines.append("")
    for chk in res["checks"]:
        if chk["check"] == "full_size_parity":
            lines += [f"## Full-size parity ({chk['config']}, batch 1, max |error| against fp32; "
                      f"outputs up to {chk['max_abs_out']:.3g})", "",
                      f"reference (SDPA) {chk['err_sdpa']:.3g}, reference (naive attention) "
                      f"{chk['err_naive']:.3g}, fast path {chk['err_fast']:.3g}", ""]
        elif chk["check"] == "segmentation":
            seg = [c for c in res["checks"] if c["check"] == "segmentation"]
            if chk is seg[0]:
                lines += ["## Whole-image slide inference (crop 504, stride 322, bf16)", "",
                          "| image | windows | path | ms/image | images/s | backbone share |", "|---|---|---|---|---|---|"]
                lines += [f"| {c['size'][0]}x{c['size'][1]} | {c['windows']} | {c['path']} | {c['ms_per_image']:.1f} | "
                          f"{c['images_per_s']:.2f} | {c['backbone_share']:.0%} |" for c in seg]
                lines.append("")
        elif chk["check"] == "training":
            train = [c for c in res["checks"] if c["check"] == "training"]
            if chk is train[0]:
                lines += [f"## Training step (forward + backward, with_cp, {chk['config']} batch {chk['batch']})", "",
                          "| path | ms | images/s | TFLOP/s (3x forward FLOPs) | peak GB |", "|---|---|---|---|---|"]
                lines += [f"| {c['path']} | {c['ms']:.1f} | {c['images_per_s']:.2f} | {c['tflops']:.1f} | "
                          f"{'-' if c.get('peak_mem_gb') is None else format(c['peak_mem_gb'], '.1f')} |" for c in train]
                lines.append("")
        elif chk["check"] == "profile":
            lines += [f"## Profile: {chk['profiled_path']} path, {chk['config']} batch {chk['batch']} "
                      f"({chk['total_ms']:.1f} ms of kernels)", "", "| kernel | ms | share | calls |",
                      "|---|---|---|---|"]
            lines += [f"| `{t['name']}` | {t['ms']:.2f} | {t['share']:.0%} | {t['calls']} |" for t in chk["top"]]
            lines.append("")
    if res["not_measured"]:
        lines += ["## Not measured", ""] + [f"- {s}" for s in res["not_measured"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the prepared GPU run")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="seconds for everything (the tests and the benchmarks); the GPU run's box is 8 minutes")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes through the interpreter")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--tune", action="store_true",
                    help="first sweep the kernels' launch configurations (benchmarks/tune.py, up to "
                         "--tune-s of the box) and write the winners, then measure with them")
    ap.add_argument("--tune-s", type=float, default=150.0)
    args = ap.parse_args(argv)
    start = time.time()

    import torch
    import triton
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_run: CUDA is not available; this run needs an H100/H200 (use --smoke on CPU)",
              file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.smoke:  # CPU shapes through the interpreter, also on a machine that has a GPU
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_run_")

    tuned = None
    if args.tune:
        cmd = [sys.executable, "-m", "benchmarks.tune", "--out", args.out, "--budget-s", str(args.tune_s)]
        cmd += ["--smoke"] if args.smoke else []
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        tuned = {"rc": proc.returncode, "seconds": round(time.time() - start, 1)}
        if proc.returncode:
            print("gpu_run: tuning failed; measuring with the committed configurations", file=sys.stderr)

    # The benchmarks first (they answer the targets), the test suite under CUDA in what is left
    # of the box: a reserve of a quarter of it, at most 3 minutes, is kept for the tests.
    reserve = 0.0 if args.skip_tests else min(180.0, 0.25 * args.budget_s)
    raw_path = os.path.join(work, "raw.json")
    env["INTERNVIT_BENCH_DEADLINE"] = str(start + args.budget_s - reserve)
    bench = _pytest(["-q", "-rs", "benchmarks/bench_kernels.py", "benchmarks/bench_backbone.py",
                     "benchmarks/bench_segmentation.py", f"--benchmark-json={raw_path}"], env,
                    os.path.join(work, "bench.log"))

    if args.skip_tests:
        tests = {"rc": 0, "summary": "not run (--skip-tests)", "counts": {}}
    elif args.smoke:  # CI runs the whole suite anyway; exercise the path with one file
        tests = _pytest(["-q", "tests/test_fast_model.py", "-k", "compiles"], env, os.path.join(work, "tests.log"))
    else:
        # test_tools.py checks CPU-side tooling (compile gate, smoke run): CI covers it. The
        # kernels and the fast model first: what only the GPU can show.
        left = max(30.0, start + args.budget_s - time.time())
        tests = _pytest(["-q", "-x", "tests/test_kernels.py", "tests/test_fast_model.py", "tests/test_graphs.py",
                         "tests/test_model.py", "tests/test_checkpoint.py"], env, os.path.join(work, "tests.log"),
                        timeout=left)
    raw = json.load(open(raw_path)) if os.path.exists(raw_path) else {}
    res = collect(raw)
    bench_log = open(os.path.join(work, "bench.log")).read()
    res["not_measured"] = sorted(set(re.findall(r"SKIPPED \[\d+\] (.+)", bench_log)))
    ceil = next((r for r in res["kernels"] + res["backbone"] if "copy_gbs" in r), {})

    date = datetime.date.today().isoformat()
    card = _card(torch)
    res.update({
        "card": card, "date": date,
        "command": "bash benchmarks/gpu_run.sh" + (" --smoke" if args.smoke else ""),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "ceilings": {"copy_gbs": ceil.get("copy_gbs", float("nan")),
                     "matmul_tflops": ceil.get("matmul_tflops", float("nan"))},
        "tests": tests, "tuning": tuned, "benchmarks_rc": bench["rc"], "seconds": round(time.time() - start, 1),
    })
    stem = os.path.join(args.out, f"{date}-{_slug(card)}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    md = markdown(res)
    with open(stem + ".md", "w") as f:
        f.write(md)
    for name in ("tests.log", "bench.log"):  # the logs travel with the results
        src = os.path.join(work, name)
        if os.path.exists(src):
            with open(src) as a, open(f"{stem}.{name}", "w") as b:
                b.write(a.read())
    print("\n" + md)
    print(f"wrote {stem}.json and .md in {res['seconds']} s")
    return 1 if tests["rc"] or bench["rc"] else 0


if __name__ == "__main__":
    sys.exit(main())
