"""internvit-fast precision: what precision="fp8" changes in the features.

Runs the backbone in bf16, then the same weights converted to FP8 (``model.precision =
"fp8"``), on the same inputs (the images of ``--images DIR``, resized to the model's size
and normalised as upstream does, else random pixels), and prints per out_index the
relative L2 error and the cosine similarity of the FP8 features against bf16 and, where a
float64 copy fits (``--float64``, default on a CPU), against float64. FP8 runs both ways
attention can go on the fast path: bf16 attention (``fp8``: the FP8 GEMMs alone) and FP8
attention (``fp8_attn``: q, k, v and P in e4m3 too; ``fp8_attention=True``), where the
kernels run and the heads allow it. This measures
features; what FP8 does to a segmentation metric must be measured on the user's data
(``python -m internvit_fast.mmseg test CONFIG CKPT --precision fp8`` gives the mIoU).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List

import torch

from ..segmentation.presets import PRESETS
from .images import IMAGE_EXTENSIONS, load_image, regular
from .interpreter import restart_in_interpreter



def _inputs(args, size: int) -> torch.Tensor:
    if not args.images:
        torch.manual_seed(0)
        return torch.randn(args.batch, 3, size, size)
    if not os.path.isdir(args.images):
        raise SystemExit(f"--images {args.images}: not a folder")
    names = sorted(n for n in os.listdir(args.images)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and regular(os.path.join(args.images, n)))[: args.batch]
    if not names:
        raise SystemExit(f"--images {args.images}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return torch.cat([load_image(os.path.join(args.images, n), size) for n in names])


def _features(model, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad():
        return [f.double().cpu() for f in model(x.to(model.cls_token.device, model.dtype))]


def compare(got: List[torch.Tensor], ref: List[torch.Tensor]) -> List[dict]:
    return [dict(rel=((g - r).norm() / r.norm()).item(),
                 cos=torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), 0).item())
            for g, r in zip(got, ref)]


def main(argv=None, command_line: bool = False) -> int:
    ap = argparse.ArgumentParser(prog="internvit-fast precision", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="weights to load (default: random weights)")
    ap.add_argument("--images", help="a folder of images to run (default: random pixels)")
    ap.add_argument("--config", choices=sorted(PRESETS), help="default: upernet on a GPU, small on a CPU")
    ap.add_argument("--batch", type=int, default=2, help="images per run (default 2)")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--float64", action=argparse.BooleanOptionalAction, default=None,
                    help="also compare against a float64 copy (default: on a CPU only: 6B in float64 is 48 GB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error("--batch must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if command_line and device.type == "cpu":  # the command line: the kernels in the interpreter
        restart_in_interpreter()
    config = args.config or ("upernet" if device.type == "cuda" else "small")
    cfg = dict(PRESETS[config], with_fpn=False)  # the ViT's own features
    from .. import InternViT6B
    from ..kernels import kernels_can_run_on
    fast = kernels_can_run_on(device)
    model = InternViT6B(**cfg, with_cp=False, fast=fast, pretrained=args.checkpoint).to(device).eval()
    x = _inputs(args, cfg["img_size"])
    with_f64 = device.type == "cpu" if args.float64 is None else args.float64
    exact = None
    if with_f64:
        ref64 = InternViT6B(**cfg, with_cp=False, dtype=torch.float32).eval()
        ref64.load_state_dict(model.state_dict())
        exact = _features(ref64.double(), x)
        del ref64
    bf16 = _features(model, x)
    model.precision = "fp8"
    model.fp8_attention = False
    runs = {"fp8": _features(model, x)}
    from ..kernels.qk_norm import head_dim_problem
    fp8_attn = fast and not head_dim_problem(cfg["embed_dim"], cfg["num_heads"])
    if fp8_attn:
        model.fp8_attention = True
        runs["fp8_attn"] = _features(model, x)
    rows = []
    for i, idx in enumerate(model.out_indices):
        row = dict(out_index=idx)
        for name, feats in runs.items():
            row[f"{name}_vs_bf16"] = compare(feats, bf16)[i]
            if exact is not None:
                row[f"{name}_vs_float64"] = compare(feats, exact)[i]
        if exact is not None:
            row["bf16_vs_float64"] = compare(bf16, exact)[i]
        rows.append(row)
    result = dict(config=config, device=str(device), fast=fast, checkpoint=args.checkpoint, images=args.images,
                  batch=int(x.shape[0]), fp8_attention=fp8_attn, rows=rows)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"InternViT6B {config} on {device} ({'kernels' if fast else 'reference ops'}), "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}, "
          f"{args.images or 'random pixels'}, batch {x.shape[0]}")
    if not fp8_attn:
        print("(FP8 attention not run: " + ("the reference ops have none)" if not fast else
                                           f"{head_dim_problem(cfg['embed_dim'], cfg['num_heads'])})"))
    cols = [c for c in rows[0] if c != "out_index"]
    print("out_index  " + "  ".join(f"{c:>26}" for c in cols))  # (fp8_attn: FP8 attention too)
    for r in rows:
        print(f"{r['out_index']:>9}  " + "  ".join(f"{'rel %.4f  cos %.6f' % (r[c]['rel'], r[c]['cos']):>26}"
                                                  for c in cols))
    return 0

