"""python -m internvit_fast: build a backbone, run a forward, print feature shapes and time.

With no arguments: on CPU a small backbone and one random image; on a GPU the
real 504x504 UPerNet configuration in bf16.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from .presets import PRESETS, flops_per_image


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m internvit_fast", description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(PRESETS), help="default: upernet on a GPU, small on CPU")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--img-size", type=int, help="input height and width (default: the config's)")
    ap.add_argument("--checkpoint", help="weights to load (.pth, .bin, .safetensors, index json or folder)")
    ap.add_argument("--fast", action="store_true", help="run the fused Triton kernels (fast=True)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up")
    args = ap.parse_args(argv)

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        ap.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        ap.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    name = args.config or ("upernet" if device.type == "cuda" else "small")
    cfg = dict(PRESETS[name])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    size = cfg["img_size"] if args.img_size is None else args.img_size
    patch = cfg["patch_size"]
    if size <= 0 or size % patch:
        ap.error(f"--img-size {size}: must be a positive multiple of the patch size ({patch})")
    if cfg.get("with_fpn") and size < 2 * patch:
        ap.error(f"--img-size {size}: the {name} configuration's FPN needs at least {2 * patch}")
    if args.batch <= 0:
        ap.error(f"--batch {args.batch}: must be at least 1")
    if args.repeats <= 0:
        ap.error(f"--repeats {args.repeats}: must be at least 1 (the time is averaged over them)")
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        ap.error(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.fast and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("note: on CPU the kernels run only with TRITON_INTERPRET=1; using the reference ops")

    from . import InternViT6B
    # Built on the target device: a 6B model is not initialised on the CPU first.
    with torch.device(device):
        model = InternViT6B(**cfg, fast=args.fast, dtype=dtype, pretrained=args.checkpoint)
    model.eval()
    img = torch.randn(args.batch, 3, size, size, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        outs = model(img)  # warm-up (kernel compilation, caches)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            outs = model(img)
        sync()
        dt = (time.perf_counter() - t0) / args.repeats
    print(f"InternViT6B config={name} fast={args.fast} dtype={args.dtype} device={device} "
          f"batch={args.batch} input={size}x{size}")
    for i, o in enumerate(outs):
        print(f"  feature {i}: {tuple(o.shape)} {o.dtype}")
    tflops = flops_per_image(cfg, (size, size)) * args.batch / dt / 1e12
    print(f"forward: {dt * 1e3:.1f} ms per batch, {args.batch / dt:.2f} images/s, {tflops:.3f} TFLOP/s")


if __name__ == "__main__":
    main()
