"""internvit-fast compare: the reference and the fast backbone on the same weights and input.

Runs both paths, checks the fast path's features against an fp32 run by the project's
parity rule (its max error at most twice the reference path's own, plus 1e-3 of the
output scale), times both and prints a short table. On a GPU: the 504x504 UPerNet
configuration in bf16 at batch 4, with the speedup. On a CPU: a small model, the fast
path through Triton's interpreter (switched on here; interpreter times are not a speed
figure). ``--checkpoint`` loads weights, ``--image`` runs a real image (resized and
centre-cropped to the model's size, normalised with the ImageNet mean and std as the
upstream pipeline does), ``--json`` prints the result as JSON.

``internvit-fast`` with no subcommand runs this one (and ``python -m internvit_fast``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..kernels import parity
from ..segmentation.presets import PRESETS
from .images import load_image
from .interpreter import restart_in_interpreter


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="internvit-fast compare", description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(PRESETS), help="default: upernet on a GPU, small on CPU")
    ap.add_argument("--batch", type=int, help="default: 4 on a GPU, 1 on CPU")
    ap.add_argument("--img-size", type=int, help="input height and width (default: the config's)")
    ap.add_argument("--checkpoint", help="weights to load (.pth, .bin, .safetensors, index json or folder)")
    ap.add_argument("--image", help="an image file to run instead of random pixels")
    ap.add_argument("--paths", choices=["both", "reference", "fast"], default="both",
                    help="which paths to run (default: both, with the parity check)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--repeats", type=int, help="timed forwards after one warm-up (default: 5 on a GPU, 1 on CPU)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        ap.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        ap.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cuda", "cpu"):
        ap.error(f"--device {args.device}: only cuda and cpu are supported")
    args.device = device
    args.config = args.config or ("upernet" if device.type == "cuda" else "small")
    cfg = PRESETS[args.config]
    size = cfg["img_size"] if args.img_size is None else args.img_size
    patch = cfg["patch_size"]
    if size <= 0 or size % patch:
        ap.error(f"--img-size {size}: must be a positive multiple of the patch size ({patch})")
    if cfg.get("with_fpn") and size < 2 * patch:
        ap.error(f"--img-size {size}: the {args.config} configuration's FPN needs at least {2 * patch}")
    args.img_size = size
    args.batch = args.batch if args.batch is not None else (4 if device.type == "cuda" else 1)
    if args.batch <= 0:
        ap.error(f"--batch {args.batch}: must be at least 1")
    args.repeats = args.repeats if args.repeats is not None else (5 if device.type == "cuda" else 1)
    if args.repeats <= 0:
        ap.error(f"--repeats {args.repeats}: must be at least 1 (the time is averaged over them)")
    for opt in ("checkpoint", "image"):
        value = getattr(args, opt)
        if value is not None and not os.path.exists(value):
            ap.error(f"--{opt} {value}: no such file or folder")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, img, repeats):
    with torch.inference_mode():
        outs = model(img)  # warm-up: kernel compilation, cuBLAS handles
        sync(img.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            outs = model(img)
        sync(img.device)
    return outs, (time.perf_counter() - t0) / repeats


def main(argv=None, command_line: bool = False) -> int:
    args = parse(argv)
    device, cfg = args.device, dict(PRESETS[args.config])
    if command_line and args.paths in ("both", "fast") and device.type == "cpu":
        restart_in_interpreter()

    from .. import InternViT6B
    from ..segmentation.presets import flops_per_image
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    # Built on the target device: a 6B model is not initialised on the CPU first.
    from ..checkpoint import CheckpointError
    with torch.device(device):
        torch.manual_seed(0)
        try:
            model = InternViT6B(**cfg, dtype=dtype, with_cp=False, pretrained=args.checkpoint).eval()
        except CheckpointError as e:  # a file that does not fit: one line, as argparse answers
            print(f"internvit-fast compare: error: --checkpoint: {str(e).splitlines()[0][:500]}", file=sys.stderr)
            return 2
        if args.checkpoint is None:
            with torch.no_grad():  # random norms and LayerScale too: ones would hide a swapped weight
                for p in model.parameters():
                    if p.ndim == 1:
                        p.uniform_(0.5, 1.5)
    if args.image:
        img = load_image(args.image, args.img_size).to(device).expand(args.batch, -1, -1, -1).contiguous()
    else:
        img = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)

    paths = {"both": ["reference", "fast"], "reference": ["reference"], "fast": ["fast"]}[args.paths]
    rows, outs = [], {}
    for path in paths:
        model.fast = path == "fast"
        outs[path], sec = timed(model, img, args.repeats)
        rows.append(dict(path=path, ms_per_batch=sec * 1e3, images_per_s=args.batch / sec,
                         tflops=flops_per_image(cfg, (args.img_size, args.img_size)) * args.batch / sec / 1e12))
    result = dict(config=args.config, device=str(device),
                  card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  dtype=args.dtype, batch=args.batch, img_size=args.img_size, repeats=args.repeats,
                  checkpoint=args.checkpoint, image=args.image, interpreter=os.environ.get("TRITON_INTERPRET") == "1",
                  features=[list(o.shape) for o in outs[paths[0]]], paths=rows)
    if args.paths == "both":
        exact_model = InternViT6B(**cfg, dtype=torch.float32, with_cp=False).to(device).eval()
        exact_model.load_state_dict(model.state_dict())
        with torch.inference_mode():
            exact = exact_model(img)
        del exact_model
        scale = max(e.abs().max().item() for e in exact)
        errs = {p: parity.max_abs_err(outs[p], exact) for p in paths}
        for row in rows:
            row["max_err_vs_fp32"] = errs[row["path"]]
        verdict = parity.check(outs["fast"], exact, outs["reference"], atol=1e-3 * scale)
        result["parity"] = dict(rule="fast error <= 2 x reference error + 1e-3 x output scale",
                                output_scale=scale, ok=verdict.ok)
        result["speedup"] = rows[0]["ms_per_batch"] / rows[1]["ms_per_batch"]

    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"InternViT6B {args.config} on {result['card']}, {args.dtype}, batch {args.batch}, "
              f"{args.img_size}x{args.img_size}{', image ' + args.image if args.image else ''}"
              f"{', weights ' + args.checkpoint if args.checkpoint else ', random weights'}")
        print("features: " + ", ".join(str(tuple(s)) for s in result["features"]))
        print(f"{'path':<10} {'ms/batch':>10} {'images/s':>9} {'TFLOP/s':>8} {'max |err| vs fp32':>18}")
        for r in rows:
            err = f"{r['max_err_vs_fp32']:.3g}" if "max_err_vs_fp32" in r else "-"
            print(f"{r['path']:<10} {r['ms_per_batch']:>10.1f} {r['images_per_s']:>9.2f} {r['tflops']:>8.3f} {err:>18}")
        if "parity" in result:
            print(f"parity: {'ok' if result['parity']['ok'] else 'FAILED'} ({result['parity']['rule']}; "
                  f"outputs up to {result['parity']['output_scale']:.3g})")
            if result["interpreter"]:
                print("note: the fast path ran in Triton's interpreter on the CPU: its time is not a speed figure")
            else:
                print(f"speedup: {result['speedup']:.2f}x")
    return 0 if result.get("parity", {}).get("ok", True) else 1

