"""Sweep launch configurations at the segmentation shapes; commit the winners per architecture.

    python -m benchmarks.tune [--out DIR] [--budget-s 150] [--smoke]
    (or: bash benchmarks/gpu_run.sh --tune, which tunes first and then measures with the winners)

For every kernel in the registry (the GEMMs first) and row count (1297 x 4 by default:
the targets' batch; --batches for more), each of the kernel's candidate configurations is
launched into NaN-poisoned outputs, checked against the plain-torch reference by the
tests' parity rule on the first and last row tiles (a candidate that computes wrong, or
does not fit the card, is dropped) and timed; the fastest wins. The time box is checked
before every candidate, and the table is rewritten after every kernel.
A fused op with an unfused alternative (linear.py) then times the two with the winning
configuration and records which is faster as ``impl``: from then on ``fast=True`` runs
that one at that shape. The table goes to ``kernels/tuned/<arch>.json`` (the launchers
read it; in a source checkout that is the repository's kernels/tuned/) and a copy to
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
from tools import costs
from internvit_fast.kernels import REGISTRY, launch
from internvit_fast.kernels.launch import Target
from internvit_fast.kernels.registry import Shape, run, smoke_shape


def entry_for(spec, inputs: dict, config: dict, ms: float):
    """(table name, entry) for a measured configuration, under the key the launcher looks up:
    its own plan's for these inputs (kernels/launch.py)."""
    table_name, key = spec.plan_for(inputs, Target.of(harness.DEVICE)).tuned_key
    return table_name, {"shape": dict(key), "config": dict(config), "ms": {"kernel": ms}}


def order(specs, shape: Shape) -> list:
    """The tuner's order: inference before training (the targets are inference), and within
    each the GEMMs first: they are most of the backbone's time, so a box that runs out cuts
    the row kernels (whose heuristic settings are near their ceiling anyway). FP8 attention
    before the FP8 GEMMs: its entry decides FP8 attention against bf16 SDPA (another path,
    other numerics), theirs only a launch or cuBLASLt."""
    return sorted(specs, key=lambda s: (s.training, costs.counts(s.id, shape)[2] == 0, s.name.startswith("fp8_")))


def tune(out_dir: str, budget_s: float, smoke: bool, batches=(4,)) -> str:
    start = time.time()
    if smoke:
        arch, shapes, card = "smoke", [smoke_shape()], "cpu-smoke"
    else:
        arch, card = Target.of(harness.DEVICE).arch, torch.cuda.get_device_name()
        shapes = [Shape(1297 * b) for b in batches]
    configs, log = {}, []
    specs = order(REGISTRY, shapes[0])

    def out_of_time(what):
        if time.time() - start > budget_s:
            log.append(f"{what}: time box reached, not tuned")
            return True
        return False

    with torch.no_grad():  # not inference_mode: the backward kernels' references run autograd
        for shape in shapes:
            for spec in specs:
                least = costs.counts(spec.id, shape)[1]
                sets = harness.rotating(lambda: spec.make_inputs(shape, harness.DEVICE), least)
                exact_cache: dict = {}  # the float64 reference of outputs checked whole, once per input set
                best = None
                for cfg in spec.candidates(arch):
                    if out_of_time(f"{spec.id} M={shape.rows} {cfg}"):  # checked before every candidate
                        break
                    try:
                        verdict = harness.spec_ok(spec, sets[0], run(spec, sets[0], cfg), spec.reference, shape.rows,
                                                  exact_cache)
                        if not verdict.ok:
                            log.append(f"{spec.id} M={shape.rows} {cfg}: wrong result ({verdict}), dropped")
                            continue
                        outs = [spec.new_outputs(i) for i in sets]
                        target = harness.replays(lambda i, o, c=cfg: spec.launch(i, o, c), list(zip(sets, outs)))
                        ms = harness.time_ms(target, rounds=10 if harness.CUDA else 2, warmup_rounds=2)
                    except Exception as e:  # noqa: BLE001 - out of shared memory, compile errors
                        log.append(f"{spec.id} M={shape.rows} {cfg}: failed ({type(e).__name__}: {str(e)[:120]})")
                        continue
                    log.append(f"{spec.id} M={shape.rows} {cfg}: {ms:.4f} ms")
                    if best is None or ms < best[0]:
                        best = (ms, cfg)
                if best is None:
                    continue
                table_name, entry = entry_for(spec, sets[0], best[1], best[0])
                if spec.choice and not out_of_time(f"{spec.id} M={shape.rows} fused vs unfused"):
                    ref = spec.choice_reference or spec.reference
                    ms = {}
                    for impl, fn in (("fused", lambda i, c=best[1]: spec.choice.fused(i, c)),
                                     ("unfused", spec.choice.unfused)):
                        try:  # (cuBLASLt's block-scaled FP8 GEMM runs on sm_90 only, with torch >= 2.9)
                            judge = spec.choice.unfused_judge if impl == "unfused" else None
                            verdict = harness.spec_ok(spec, sets[0], fn(sets[0]), ref, shape.rows, judge=judge)
                            if not verdict.ok:
                                log.append(f"{spec.id} M={shape.rows} {impl}: wrong result ({verdict})")
                                continue
                            ms[impl] = harness.time_ms(harness.replays(fn, [(i,) for i in sets]),
                                                       rounds=10 if harness.CUDA else 2, warmup_rounds=2)
                        except Exception as e:  # noqa: BLE001 - an alternative this card or torch lacks
                            log.append(f"{spec.id} M={shape.rows} {impl}: failed ({type(e).__name__}: {str(e)[:160]}), "
                                       "not picked")
                    entry["ms"].update(ms)
                    entry["impl"] = min(ms, key=ms.get) if ms else "fused"
                    log.append(f"{spec.id} M={shape.rows}: fused {ms.get('fused', float('nan')):.4f} ms, "
                               f"unfused ({spec.choice.describe_unfused}) {ms.get('unfused', float('nan')):.4f} ms "
                               f"-> {entry['impl']}")
                configs.setdefault(table_name, []).append(entry)
                _write(out_dir, arch, card, smoke, configs, log)  # kept as it comes
    targets = _write(out_dir, arch, card, smoke, configs, log)
    print("\n".join(log))
    print(f"tuned {sum(len(v) for v in configs.values())} shapes in {time.time() - start:.0f} s -> {targets}")
    return targets[0]


def _write(out_dir: str, arch: str, card: str, smoke: bool, configs: dict, log: list) -> list:
    result = {"arch": arch, "card": card, "date": datetime.date.today().isoformat(),
              "command": "bash benchmarks/gpu_run.sh --tune" + (" --smoke" if smoke else ""),
              "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
              "configs": configs, "log": log}
    text = json.dumps(result, indent=1)
    targets = [os.path.join(out_dir, f"tuned-{arch}.json")]
    if not smoke:  # the launchers read this file; the smoke run must not leave one behind
        targets.append(os.path.join(launch.TUNED_DIR, f"{arch}.json"))
    for path in targets:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # a run killed mid-write leaves the previous table whole
    return targets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[4],
                    help="batches of 1297 rows (504x504) to tune at (default: 4, the targets' batch)")
    args = ap.parse_args(argv)
    if not harness.CUDA and not args.smoke:
        print("tune: CUDA is not available; tuning needs the card it tunes for (use --smoke on CPU)",
              file=sys.stderr)
        return 2
    tune(args.out, args.budget_s, args.smoke, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
