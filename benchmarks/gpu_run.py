"""The one prepared GPU run (benchmarks/gpu_run.sh calls this).

    python -m benchmarks.gpu_run [--out DIR] [--budget-s 480] [--tune] [--smoke] [--skip-tests]
    python -m benchmarks.gpu_run --plan --card h100 [--json] [--tune]

Runs the stages of ``benchmarks/plan.py`` in the order of what they are worth: the card's
ceilings; the 504x504 UPerNet backbone at batch 4 (reference, torch.compile of it, fast,
torch.compile of fast, one attention backend order for all); full-size parity; each fused
op against its unfused alternative; (--tune) tuning at batch 4 and the fast backbone again
with the tuned table; the profile; whole-image slide inference; the training step; the
tests under CUDA in what is left. Each stage has a box (its estimate times a margin, cut
to what is left of ``--budget-s``); a stage that runs out is stopped and the run goes on.

Results are kept as they come: every benchmark and check is appended to a records file
the moment it finishes, and ``<date>-<card>.json`` and its markdown table are rewritten
(atomically) whenever a record arrives and after every stage, with the stages done and the
ones not reached, each stage's real seconds beside its estimate. A run killed at any point
leaves a valid file holding everything measured so far. The stages' output goes to
``<date>-<card>.log``; with --tune the table goes to ``tuned-<arch>.json``; at the end a
chart ``<date>-<card>.png``: at most five files in --out.

Without CUDA it fails loudly, unless --smoke: the same stages at tiny shapes through
Triton's interpreter, so this script cannot rot on CPU-only CI.
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
import time
from typing import Dict, List, Optional

from benchmarks import plan as run_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLL_S = 2.0


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()


def _belongs(nodeid: str, selection: List[str]) -> bool:
    return any(nodeid == s or nodeid.startswith(s + "::") or nodeid.startswith(s + "[") for s in selection)


# --- from records to results ------------------------------------------------------------------

def _rate(stats: dict) -> Optional[float]:
    return stats.get("median") if stats else None


def summarize(records: List[dict]) -> dict:
    """The figures a run reports, derived from its records: ms from pytest-benchmark's median,
    rates from the counts each benchmark attached, fractions of the ceilings measured in the
    same run."""
    out: Dict[str, list] = {"kernels": [], "attention": [], "backbone": [], "slide": [], "training": [],
                            "checks": []}
    ceilings = {"copy_gbs": None, "matmul_tflops": None}
    benches = [r for r in records if r.get("kind") == "benchmark"]
    for r in benches:
        info, t = r["info"], _rate(r["stats"])
        if info.get("ceiling") and t:
            if info["ceiling"] == "copy":
                ceilings["copy_gbs"] = info["bytes"] / t / 1e9
            else:
                ceilings["matmul_tflops"] = info["flops"] / t / 1e12
    for r in benches:
        info, t, group = dict(r["info"]), _rate(r["stats"]), r.get("group") or ""
        if info.get("ceiling"):
            continue
        row = dict(info, test=r["test"], group=group, ms=t * 1e3 if t else None, rounds=r["stats"].get("rounds"))
        if t and info.get("flops"):
            row["tflops"] = info["flops"] / t / 1e12
            if ceilings["matmul_tflops"]:
                row["frac_matmul"] = row["tflops"] / ceilings["matmul_tflops"]
        if t and info.get("bytes_min") and not info.get("flops"):
            row["gbs"] = info["bytes_min"] / t / 1e9
            if ceilings["copy_gbs"]:
                row["frac_copy"] = row["gbs"] / ceilings["copy_gbs"]
        if t and info.get("batch") and group.startswith(("backbone", "training")):
            row["images_per_s"] = info["batch"] / t
            row["ms_per_image"] = t * 1e3 / info["batch"]
        kind = group.split(" ")[0]
        out[{"backbone": "backbone", "training": "training", "slide": "slide", "attention": "attention"}
            .get(kind, "kernels")].append(row)
    for row in out["slide"]:
        if row.get("ms"):
            row["images_per_s"] = 1e3 / row["ms"]
        for part in ("backbone", "head"):
            alone = next((o for o in out["slide"] if o["group"] == row["group"]
                          and o["path"] == f"{row['path']}-{part}-only"), None)
            if alone and alone.get("ms") and row.get("ms"):
                row[f"{part}_share"] = min(1.0, alone["ms"] / row["ms"])
    out["checks"] = [dict(r["info"], test=r["test"]) for r in records if r.get("kind") == "check"]
    out["ceilings"] = ceilings
    out["not_measured"] = sorted({f"{r['test']}: {r.get('reason', '')}" for r in records
                                  if r.get("kind") == "test" and r.get("outcome") == "skipped"})
    out["failed"] = sorted({r["test"] for r in records if r.get("kind") == "test" and r.get("outcome") == "failed"})
    return out


def _f(v, fmt=".1f", none="-"):
    return none if v is None else format(v, fmt)


def markdown(res: dict) -> str:
    c = res["ceilings"]
    lines = [f"# internvit-fast GPU run: {res['card']}, {res['date']}", "",
             f"torch {res['versions']['torch']}, triton {res['versions']['triton']}, CUDA {res['versions']['cuda']}. "
             f"Command: `{res['command']}`.", "",
             f"Ceilings measured in this run: device copy {_f(c['copy_gbs'], '.0f')} GB/s (read + write), "
             f"bf16 matmul {_f(c['matmul_tflops'], '.0f')} TFLOP/s.", "",
             "## Stages", "", "| stage | status | seconds | estimate | tests |", "|---|---|---|---|---|"]
    for st in res["stages"]:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(st.get("tests", {}).items()))
        lines.append(f"| {st['name']} | {st['status']} | {_f(st.get('seconds'), '.0f')} | {st['estimate_s']:.0f} | "
                     f"{counts} |")
    lines.append("")
    if res["backbone"]:
        lines += ["## Backbone (bf16 inference)", "",
                  "| group | path | ms/batch | images/s | TFLOP/s | of matmul | peak GB | attention kernels |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["backbone"]:
            att = "; ".join(k[:40] for k in r.get("attention_kernels") or []) or "-"
            lines.append(f"| {r['group']} | {r['path']} | {_f(r['ms'])} | {_f(r.get('images_per_s'), '.2f')} | "
                         f"{_f(r.get('tflops'))} | {_f(r.get('frac_matmul'), '.0%')} | {_f(r.get('peak_mem_gb'))} | "
                         f"{att} |")
        lines.append("")
    if res["kernels"] or res["attention"]:
        card = "h200" if "H200" in res["card"] else "h100"
        pred = {k: v.get(card) for k, v in (res.get("predicted_us") or {}).items()}
        lines += ["## Kernels (bf16, rows = 1297 x batch, width 3200)", "",
                  f"Predicted: the cost model's time for the kernel ({card}) at batch 4, from its sm_90 build "
                  "(`python -m tools.gate --block`).", "",
                  "| group | impl | ms | GB/s | of copy | TFLOP/s | of matmul | predicted ms | measured / predicted |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["kernels"] + res["attention"]:
            us = pred.get(r.get("kernel")) if r.get("batch") == 4 and r.get("impl") in ("triton", "fused") else None
            ratio = r["ms"] * 1e3 / us if us and r.get("ms") else None
            lines.append(f"| {r['group']} | {r['impl']} | {_f(r['ms'], '.4f')} | {_f(r.get('gbs'), '.0f')} | "
                         f"{_f(r.get('frac_copy'), '.0%')} | {_f(r.get('tflops'))} | {_f(r.get('frac_matmul'), '.0%')} | "
                         f"{_f(us / 1e3 if us else None, '.4f')} | {_f(ratio, '.2f')} |")
        lines.append("")
    if res["slide"]:
        lines += ["## Whole-image slide inference (crop 504, stride 322, bf16)", "",
                  "| image | windows | path | ms/image | images/s | backbone share | head share |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['size'][0]}x{r['size'][1]} | {r['windows']} | {r['path']} | {_f(r['ms'])} | "
                  f"{_f(r.get('images_per_s'), '.2f')} | {_f(r.get('backbone_share'), '.0%')} | "
                  f"{_f(r.get('head_share'), '.0%')} |" for r in res["slide"]]
        lines.append("")
    if res["training"]:
        lines += ["## Training step (forward + backward, with_cp)", "",
                  "| group | path | ms | images/s | TFLOP/s (3x forward FLOPs) | peak GB |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['group']} | {r['path']} | {_f(r['ms'])} | {_f(r.get('images_per_s'), '.2f')} | "
                  f"{_f(r.get('tflops'))} | {_f(r.get('peak_mem_gb'))} |" for r in res["training"]]
        lines.append("")
    for chk in res["checks"]:
        if chk.get("check") == "full_size_parity":
            lines += [f"## Full-size parity ({chk['config']}, batch 1, max |error| against fp32; outputs up to "
                      f"{chk['max_abs_out']:.3g})", "", f"reference (SDPA) {chk['err_sdpa']:.3g}, reference (naive "
                      f"attention) {chk['err_naive']:.3g}, fast path {chk['err_fast']:.3g}", ""]
        elif chk.get("check") == "fp8_features":
            lines += [f"## precision='fp8' against bf16 ({chk['config']}, batch 1, random weights)", "",
                      "| out_index | bf16 attention: rel. L2 error | cosine | FP8 attention: rel. L2 error | cosine |",
                      "|---|---|---|---|---|"]
            fa = chk.get("rows_fp8_attention") or [dict(rel=float("nan"), cos=float("nan"))] * len(chk["rows"])
            lines += [f"| {i} | {r['rel']:.4f} | {r['cos']:.6f} | {a['rel']:.4f} | {a['cos']:.6f} |"
                      for i, r, a in zip(chk["out_indices"], chk["rows"], fa)]
            lines.append("")
        elif chk.get("check") == "profile":
            lines += [f"## Profile: {chk['profiled_path']} path, {chk['config']} batch {chk['batch']} "
                      f"({chk['total_ms']:.1f} ms of kernels)", "", "| kernel | ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{t['name']}` | {t['ms']:.2f} | {t['share']:.0%} | {t['calls']} |" for t in chk["top"]]
            lines.append("")
    if res.get("tuning"):
        tun = res["tuning"]
        lines += ["## Tuning", "", f"{tun.get('entries', 0)} kernel shapes tuned; picks: "
                  + (", ".join(f"{k}: {v}" for k, v in sorted(tun.get("impl", {}).items())) or "-"), ""]
    if res["failed"]:
        lines += ["## Failed", ""] + [f"- {t}" for t in res["failed"]] + [""]
    if res["not_measured"]:
        lines += ["## Not measured", ""] + [f"- {s}" for s in res["not_measured"]] + [""]
    not_reached = [st["name"] for st in res["stages"] if st["status"] in ("not reached", "pending")]
    if not_reached:
        lines += ["## Stages not reached", "", ", ".join(not_reached), ""]
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------

class Run:
    """The results of one run, rewritten to disk whenever something new is known."""

    def __init__(self, args, torch, triton, card: str, estimates: Dict[str, float], stages):
        self.start = time.time()
        self.budget = args.budget_s
        date = datetime.date.today().isoformat()
        self.stem = os.path.join(args.out, f"{date}-{_slug(card)}")
        self.records_path = self.stem + ".records.jsonl.tmp"
        if os.path.exists(self.records_path):
            os.remove(self.records_path)
        self.log_path = self.stem + ".log"
        open(self.log_path, "w").close()
        self.records: List[dict] = []
        self._offset = 0
        command = "bash benchmarks/gpu_run.sh" + (" --tune" if args.tune else "") + (" --smoke" if args.smoke else "") \
            + (" --skip-tests" if args.skip_tests else "")
        self.res = {
            "card": card, "date": date, "command": command, "budget_s": args.budget_s,
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                         "python": platform.python_version()},
            "estimates_for": args.card, "seconds": 0.0, "tuning": None,
            "stages": [{"name": s.name, "what": s.what, "estimate_s": estimates[s.name], "status": "pending",
                        "seconds": None, "tests": {}} for s in stages],
        }
        self.write()

    def stage(self, name: str) -> dict:
        return next(s for s in self.res["stages"] if s["name"] == name)

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def read_records(self) -> bool:
        if not os.path.exists(self.records_path):
            return False
        with open(self.records_path) as f:
            f.seek(self._offset)
            data = f.read()
        done = data.rfind("\n") + 1  # a line still being written waits for the next poll
        self._offset += len(data[:done].encode())
        new = [json.loads(ln) for ln in data[:done].splitlines() if ln.strip()]
        self.records += new
        return bool(new)

    def write(self) -> None:
        self.res.update(summarize(self.records))
        self.res["seconds"] = round(time.time() - self.start, 1)
        self.res["stages_done"] = [s["name"] for s in self.res["stages"] if s["status"] == "done"]
        self.res["stages_not_reached"] = [s["name"] for s in self.res["stages"]
                                          if s["status"] in ("pending", "not reached")]
        for path, text in ((self.stem + ".json", json.dumps(self.res, indent=1, default=str)),
                           (self.stem + ".md", markdown(self.res))):
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous file whole

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")


def _status(counts: Dict[str, int]) -> str:
    return "failed" if counts.get("failed") or counts.get("error") else "done"


def _stage_progress(run: Run, session, started: float) -> None:
    """Each stage's test outcomes and seconds, from the per-test records of its session; a
    stage is done once a later stage of the session has begun (the tests run in order)."""
    prev_end = started
    reached = []
    for st in session:
        tests = [r for r in run.records if r.get("kind") == "test" and _belongs(r["test"], st.pytest)]
        entry = run.stage(st.name)
        if tests:
            counts: Dict[str, int] = {}
            for r in tests:
                counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            end = max(r["t"] for r in tests)
            entry.update(tests=counts, seconds=round(end - prev_end, 1), status="running")
            prev_end = end
            reached.append(st)
    for st in reached[:-1]:
        run.stage(st.name)["status"] = _status(run.stage(st.name)["tests"])


def _popen(cmd, env, run: Run, box: float):
    """Run ``cmd`` with its output appended to the run's log, stopped at ``box`` seconds.
    A generator: yields None at every poll (the caller reads new records then), and last
    (rc, seconds); rc 124 when the box ran out."""
    run.log("$ " + " ".join(cmd))
    t0 = time.time()
    with open(run.log_path, "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                rc = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                yield None
                if time.time() - t0 > box:
                    proc.kill()
                    proc.wait()
                    rc = 124
                    log.write(f"\n= stopped at its box after {box:.0f} s =\n")
                    break
    yield rc, time.time() - t0


def run_session(run: Run, session, env: dict, box: float, smoke: bool) -> None:
    nodes = [n for st in session for n in st.pytest]
    env = dict(env, INTERNVIT_BENCH_RECORDS=run.records_path, INTERNVIT_BENCH_DEADLINE=str(time.time() + box))
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *nodes]
    run.stage(session[0].name)["status"] = "running"  # the others wait their turn ("pending")
    run.write()
    started = time.time()
    for result in _popen(cmd, env, run, box):
        if run.read_records():
            _stage_progress(run, session, started)
            run.write()
        if result is not None:
            rc, _ = result
    run.read_records()
    _stage_progress(run, session, started)
    for st in session:
        entry = run.stage(st.name)
        if entry["status"] in ("done", "failed"):
            continue  # a later stage had begun
        if rc == 124:
            entry["status"] = "cut short" if entry["tests"] else "not reached"
        else:
            entry["status"] = _status(entry["tests"])
    run.log(f"session {[s.name for s in session]}: rc {rc}")
    run.write()


def run_command(run: Run, st, env: dict, box: float, args) -> None:
    entry = run.stage(st.name)
    entry["status"] = "running"
    run.write()
    if st.command == "tune":
        cmd = [sys.executable, "-m", "benchmarks.tune", "--out", args.out, "--budget-s", str(max(1.0, box - 15))]
        cmd += ["--smoke"] if args.smoke else []
    else:
        files = ["tests/test_fast_model.py"] if args.smoke else [
            "tests/test_kernels.py", "tests/test_fast_model.py", "tests/test_graphs.py", "tests/test_model.py",
            "tests/test_checkpoint.py", "tests/test_attention_fp8.py"]
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", *files]
        if args.smoke:
            cmd += ["-k", "compiles"]
    for result in _popen(cmd, env, run, box):
        if result is not None:
            rc, sec = result
    entry.update(seconds=round(sec, 1), status="done" if rc == 0 else "cut short" if rc == 124 else "failed", rc=rc)
    if st.command == "tune":
        tuned = [f for f in os.listdir(args.out) if f.startswith("tuned-") and f.endswith(".json")]
        if tuned:
            with open(os.path.join(args.out, tuned[0])) as f:
                table = json.load(f)
            entries = [e for v in table.get("configs", {}).values() for e in v]
            run.res["tuning"] = {"file": tuned[0], "entries": len(entries), "arch": table.get("arch"),
                                 "impl": {f"{k} " + " ".join(f"{a}={b}" for a, b in sorted(e["shape"].items())): e["impl"]
                                          for k, v in table["configs"].items() for e in v if "impl" in e}}
    else:
        with open(run.log_path) as f:
            tail = [ln for ln in f.read().splitlines() if ln.strip()]
        summary = next((ln for ln in reversed(tail) if re.search(r"\d+ (passed|failed|error)", ln)), "")
        entry["tests"] = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
        run.res["tests_summary"] = summary.strip("= ")
    run.write()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the prepared GPU run")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="seconds for the whole run (the device command's limit is 600)")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes through the interpreter")
    ap.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    ap.add_argument("--tune", action="store_true", help="tune at batch 4 and measure the fast path again with it")
    ap.add_argument("--plan", action="store_true",
                    help="print the stages of the --tune run with estimated seconds and exit")
    ap.add_argument("--card", choices=sorted(run_plan.CARDS), help="the card the estimates are for (--plan; "
                    "default: the card found, else h100)")
    ap.add_argument("--json", action="store_true", help="--plan as JSON")
    args = ap.parse_args(argv)

    if args.plan:
        p = run_plan.plan(args.card or "h100", tune=True, skip_tests=args.skip_tests)
        if args.json:
            print(json.dumps(p, indent=1))
        else:
            print(f"plan for {p['card']}: {p['total_s']:.0f} s")
            for st in p["stages"]:
                print(f"  {st['start_s']:5.0f} s  +{st['seconds']:4.0f} s  {st['name']}: {st['what']}")
        return 0

    import torch
    import triton
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_run: CUDA is not available; this run needs an H100/H200 (use --smoke on CPU)", file=sys.stderr)
        return 2
    # The stages' own pytest processes must measure: pytest-benchmark switches itself off
    # in any process that inherits an xdist worker's PYTEST_XDIST_* variables (a run started
    # from a parallel test session, as the CPU suite's smoke test is).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    if args.smoke:  # CPU shapes through the interpreter, also on a machine that has a GPU
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
        card = "cpu-smoke"
    else:
        env.pop("TRITON_INTERPRET", None)
        card = torch.cuda.get_device_name()
    args.card = args.card or ("h200" if "H200" in card else "h100")
    os.makedirs(args.out, exist_ok=True)
    stages = run_plan.stages(args.tune, args.skip_tests, args.smoke)
    est = run_plan.estimates(args.card, stages)
    run = Run(args, torch, triton, card, est, stages)
    for session in run_plan.sessions(stages):
        box = sum(est[st.name] * st.box_factor for st in session)
        if args.smoke:
            box = max(box, 900.0)  # the interpreter is slow, and CI's own limit guards the time
        left = run.left()
        if left < 5:
            for st in session:
                run.stage(st.name)["status"] = "not reached"
            run.write()
            continue
        box = min(box, left)
        if session[0].command:
            run_command(run, session[0], env, box, args)
        else:
            run_session(run, session, env, box, args.smoke)
    os.remove(run.records_path) if os.path.exists(run.records_path) else None
    if run.left() > 30 or args.smoke:
        # The cost model's prediction for each kernel at the main shape (sm_90 builds, ~10 s
        # of CPU), beside what was measured: the first GPU run calibrates the model.
        try:
            from tools.costs import block_model
            from tools.gate import block_predictions, predictions
            run.res["predicted_us"] = predictions()
            # every op of the block per path, as ranges: python -m tools.calibrate compares
            run.res["predicted_block"] = block_model(4, 1297, block_predictions(4, 1297))
        except Exception as e:  # noqa: BLE001 - a convenience; the measurements are kept either way
            run.log(f"no predictions: {type(e).__name__}: {e}")
    run.write()
    try:
        from benchmarks.plot import plot
        plot(run.res, run.stem + ".png")
    except Exception as e:  # noqa: BLE001 - the chart is a convenience (no matplotlib, nothing measured)
        run.log(f"no chart: {type(e).__name__}: {e}")
    print("\n" + markdown(run.res))
    print(f"wrote {run.stem}.json, .md, .log in {run.res['seconds']} s")
    failed = any(s["status"] == "failed" for s in run.res["stages"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
