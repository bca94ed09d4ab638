"""Turn a results file from gpu_run into a PNG chart.

    python -m benchmarks.plot benchmarks/results/<date>-<card>.json [-o chart.png]

Left: images/s per path and batch for each backbone configuration. Right: each
kernel's GB/s (Triton, eager torch, torch.compile) against the measured copy ceiling.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(res: dict, out: str) -> str:
    configs = sorted({r["config"] for r in res["backbone"]})
    fig, axes = plt.subplots(1, len(configs) + 1, figsize=(6 * (len(configs) + 1), 4.5))
    for ax, config in zip(axes, configs):
        rows = [r for r in res["backbone"] if r["config"] == config]
        paths = sorted({r["path"] for r in rows})
        batches = sorted({r["batch"] for r in rows})
        width = 0.8 / max(1, len(paths))
        for i, path in enumerate(paths):
            ys = [next((r["images_per_s"] for r in rows if r["path"] == path and r["batch"] == b), 0) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], ys, width, label=path)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_ylabel("images/s")
        ax.set_title(f"{config}: bf16 inference")
        ax.legend(fontsize=8)
    ax = axes[-1]
    mem = [k for k in res["kernels"] if "gbs" in k]
    labels = sorted({(k["kernel"], k["batch"]) for k in mem})
    impls = sorted({k["impl"] for k in mem})
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        ys = [next((k["gbs"] for k in mem if (k["kernel"], k["batch"]) == lab and k["impl"] == impl), 0)
              for lab in labels]
        ax.bar([j + i * width for j in range(len(labels))], ys, width, label=impl)
    ax.axhline(res["ceilings"]["copy_gbs"], color="k", linestyle="--", label="device copy")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], [f"{k}\nb{b}" for k, b in labels],
                  fontsize=6, rotation=90)
    ax.set_ylabel("GB/s (read + write)")
    ax.set_title("memory-bound kernels")
    ax.legend(fontsize=8)
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
