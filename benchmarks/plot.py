"""Turn a results file from gpu_run into a PNG chart (gpu_run draws it at the end of a run).

    python -m benchmarks.plot benchmarks/results/<date>-<card>.json [-o chart.png]

Left: images/s per path for each backbone group (configuration and batch). Right: each
memory-bound kernel's GB/s (Triton, eager torch, torch.compile) against the measured copy
ceiling.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(res: dict, out: str) -> str:
    backbone = [r for r in res["backbone"] if r.get("images_per_s")]
    mem = [k for k in res["kernels"] if k.get("gbs")]
    if not backbone and not mem:
        raise ValueError("nothing measured to plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    groups = sorted({r["group"] for r in backbone})
    paths = sorted({r["path"] for r in backbone})
    width = 0.8 / max(1, len(paths))
    for i, path in enumerate(paths):
        ys = [next((r["images_per_s"] for r in backbone if r["group"] == g and r["path"] == path), 0) for g in groups]
        left.bar([j + i * width for j in range(len(groups))], ys, width, label=path)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
    left.set_ylabel("images/s")
    left.set_title("backbone, bf16 inference")
    left.legend(fontsize=7)
    groups = sorted({k["group"] for k in mem})
    impls = sorted({k["impl"] for k in mem})
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        ys = [next((k["gbs"] for k in mem if k["group"] == g and k["impl"] == impl), 0) for g in groups]
        right.bar([j + i * width for j in range(len(groups))], ys, width, label=impl)
    if res["ceilings"].get("copy_gbs"):
        right.axhline(res["ceilings"]["copy_gbs"], color="k", linestyle="--", label="device copy")
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=6, rotation=90)
    right.set_ylabel("GB/s (read + write)")
    right.set_title("memory-bound kernels")
    right.legend(fontsize=7)
    fig.suptitle(f"internvit-fast on {res['card']}, {res['date']} ({res['command']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a <date>-<card>.json written by benchmarks/gpu_run.sh")
    ap.add_argument("-o", "--out", help="PNG path (default: beside the results file)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        res = json.load(f)
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    print(plot(res, out))


if __name__ == "__main__":
    main()
