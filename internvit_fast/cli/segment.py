"""``internvit-fast segment``: masks for images, without MMSegmentation.

    internvit-fast segment [--checkpoint CKPT] [--config upernet|linear|small]
                           IMAGES_OR_DIRS... --out DIR [--batch-windows N]
                           [--fast | --no-fast] [--cuda-graphs] [--json]

For each image: ``<name>_labels.png`` (class ids as an indexed PNG in ADE20K's palette) and
``<name>_overlay.png`` (the image blended with the coloured mask, and a legend of the
classes present). A folder stands for the regular files with image extensions in it. An
image that cannot be read or segmented is reported and skipped; what was written stays,
and the exit status is 1. Outputs are written only into --out, never through a symbolic
link, and never over an input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch

from .images import IMAGE_EXTENSIONS, read_image, regular
from .interpreter import restart_in_interpreter

LEGEND_ROWS = 12  # the legend names the classes covering the most pixels


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="internvit-fast segment",
                                 description="Segment images with InternViT-6B and its head (ADE20K's 150 classes).")
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders of them")
    ap.add_argument("--out", required=True, help="folder for the label and overlay PNGs (created)")
    ap.add_argument("--checkpoint", help="a segmentor checkpoint (mmseg's keys: backbone.*, decode_head.*, ...); "
                                         "without one the weights are random and the masks meaningless")
    ap.add_argument("--config", default="upernet", choices=["upernet", "linear", "small"],
                    help="the model: upstream's UPerNet or linear probe, or 'small' (a quick CPU check)")
    ap.add_argument("--batch-windows", type=int, default=8, metavar="N", help="sliding windows per backbone call")
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                    help="the fused Triton kernels (default: on with CUDA; on a CPU they run in Triton's "
                         "interpreter, slowly)")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay the backbone from CUDA graphs (GPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON record per image instead of a summary")
    args = ap.parse_args(argv)
    if args.batch_windows <= 0:
        ap.error(f"--batch-windows {args.batch_windows}: must be at least 1")
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graphs and args.device.type != "cuda":
        ap.error("--cuda-graphs needs a GPU")
    if args.fast is None:
        args.fast = args.device.type == "cuda"
    if args.device.type == "cpu" and args.config != "small":
        print(f"{ap.prog}: note: on a CPU the {args.config} model is built in fp32 (about 24 GB) and takes "
              "minutes an image; --config small is the quick check", file=sys.stderr)
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        fail(ap, f"--checkpoint {show(args.checkpoint)}: no such file or folder")
    args.images = []
    for path in args.inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
            found = [f for f in found if regular(f)]  # not FIFOs, devices or folders: reading those can block
            if not found:
                fail(ap, f"{show(path)}: a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})")
            args.images += found
        elif not os.path.lexists(path):
            fail(ap, f"{show(path)}: no such file or folder")
        elif not regular(path):
            fail(ap, f"{show(path)}: not a regular file (a FIFO, device or broken link would block or fail)")
        else:
            args.images.append(path)
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        fail(ap, f"--out {show(args.out)}: exists and is not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(ap, f"--out {show(args.out)}: cannot create it ({e.strerror})")
    if not os.access(args.out, os.W_OK | os.X_OK):
        fail(ap, f"--out {show(args.out)}: cannot write into it")
    return ap, args


def fail(ap, message: str):
    ap.exit(2, f"{ap.prog}: error: {message}\n")


def show(path: str) -> str:
    """A path as it can be printed whatever its bytes (a non-UTF-8 file name)."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _create(path: str):
    """A new or truncated regular file at ``path`` for writing; never through a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb")


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def save_outputs(image: torch.Tensor, labels: torch.Tensor, stem: str, out: str) -> dict:
    """Write ``stem``_labels.png and ``stem``_overlay.png; return the classes present with
    their pixel shares, largest first."""
    from PIL import Image, ImageDraw

    from ..segmentation.ade20k import CLASSES, PALETTE
    ids = labels.to(torch.uint8).cpu().numpy()
    lab = Image.fromarray(ids, mode="P")
    lab.putpalette([c for rgb in PALETTE for c in rgb])
    with _create(os.path.join(out, f"{stem}_labels.png")) as f:
        lab.save(f, format="PNG")

    counts = torch.bincount(labels.flatten().cpu(), minlength=len(CLASSES))
    order = torch.argsort(counts, descending=True, stable=True)  # ties: the lower class id first
    present = [(int(i), counts[i].item() / labels.numel()) for i in order if counts[i] > 0]
    colours = torch.tensor(PALETTE, dtype=torch.float32)[labels.cpu()].permute(2, 0, 1)
    blend = (0.5 * image.cpu().float() + 0.5 * colours).round().clamp(0, 255).to(torch.uint8)
    picture = Image.fromarray(blend.permute(1, 2, 0).numpy())
    h = picture.height
    row = max(12, min(24, h // (LEGEND_ROWS + 1)))
    font = _font(row - 4)
    shown = present[:LEGEND_ROWS]
    width = 2 * row + max(int(font.getlength(f"{CLASSES[i]} {s:.0%}")) for i, s in shown) + row
    canvas = Image.new("RGB", (picture.width + width, max(h, row * (len(shown) + 1))), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (i, share) in enumerate(shown):
        y = row // 2 + k * row
        x = picture.width + row // 2
        draw.rectangle([x, y, x + row - 4, y + row - 4], fill=PALETTE[i], outline=(0, 0, 0))
        draw.text((x + row + 2, y), f"{CLASSES[i]} {share:.0%}", fill=(0, 0, 0), font=font)
    if len(present) > len(shown):
        draw.text((picture.width + row // 2, row // 2 + len(shown) * row), f"+{len(present) - len(shown)} more",
                  fill=(0, 0, 0), font=font)
    with _create(os.path.join(out, f"{stem}_overlay.png")) as f:
        canvas.save(f, format="PNG")
    return {"classes": [{"id": i, "name": CLASSES[i], "share": round(s, 5)} for i, s in present]}


def output_stems(paths: List[str], out: str) -> List[str]:
    """Output names: the file name without its extension, numbered (-2, -3, ...) where it is
    taken already (by another input, ignoring case, or by an input's own path, when --out
    is an input folder)."""
    inputs = {os.path.realpath(p) for p in paths}
    taken, stems = set(), []
    for p in paths:
        base = os.path.splitext(os.path.basename(p))[0]
        stem, n = base, 1
        while stem.lower() in taken or any(os.path.realpath(os.path.join(out, f"{stem}_{kind}.png")) in inputs
                                           for kind in ("labels", "overlay")):
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def main(argv: Optional[List[str]] = None, command_line: bool = False) -> int:
    ap, args = parse(argv)
    if command_line and args.fast and args.device.type == "cpu":
        restart_in_interpreter()
    try:
        from PIL import Image  # noqa: F401
        from tqdm import tqdm
    except ImportError as e:
        ap.exit(2, f"{ap.prog}: error: needs Pillow and tqdm (pip install 'internvit-fast[segment]'): {e}\n")
    from ..checkpoint import CheckpointError
    from ..segmentation.segmentor import Segmentor

    with torch.device(args.device):
        torch.manual_seed(0)
        seg = Segmentor.build(args.config, fast=args.fast, cuda_graphs=args.cuda_graphs,
                              dtype=torch.bfloat16 if args.device.type == "cuda" else torch.float32,
                              max_windows=args.batch_windows)
    if args.checkpoint:
        try:
            seg.load_checkpoint(args.checkpoint)
        except CheckpointError as e:
            fail(ap, f"--checkpoint: {str(e).splitlines()[0][:800]}")
    else:
        print(f"{ap.prog}: no --checkpoint: the weights are random, so the masks mean nothing "
              "(it shows the command runs)", file=sys.stderr)
    records, failed = [], 0
    bar = tqdm(list(zip(args.images, output_stems(args.images, args.out))), unit="image", file=sys.stderr,
               disable=None)  # None: no bar when stderr is not a terminal
    for path, stem in bar:
        t0 = time.perf_counter()
        try:
            image = read_image(path)
            labels = seg.predict(image)[0]  # resized on the CPU (OpenCV's resize, as mmseg), then moved
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            info = save_outputs(image, labels, stem, args.out)
        except Exception as e:  # noqa: BLE001 - one bad image is reported, the others go on
            failed += 1
            tqdm.write(f"{ap.prog}: {show(path)}: skipped ({first_line(e)})", file=sys.stderr)
            records.append(dict(image=path, error=first_line(e)))
            continue
        seconds = time.perf_counter() - t0
        records.append(dict(image=path, size=list(image.shape[1:]), seconds=round(seconds, 3),
                            labels=os.path.join(args.out, f"{stem}_labels.png"),
                            overlay=os.path.join(args.out, f"{stem}_overlay.png"), **info))
    bar.close()
    done = [r for r in records if "error" not in r]
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        total = sum(r["seconds"] for r in done)
        print(f"segmented {len(done)} of {len(records)} images into {show(args.out)}"
              + (f" ({len(done) / total:.2f} images/s)" if total else ""))
        for r in done:
            top = ", ".join(f"{c['name']} {c['share']:.0%}" for c in r["classes"][:3])
            print(f"  {show(r['image'])}: {r['size'][0]}x{r['size'][1]}, {r['seconds']:.2f} s: {top}")
    return 1 if failed else 0
