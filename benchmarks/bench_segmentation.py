"""Whole-image slide inference, as segmentation users run it: time per image.

An image is cut into 504x504 windows 322 apart (mmseg's slide grid, internvit_fast.slide),
each window runs the UPerNet-configuration backbone (bf16) and a decode head, and the
logits are stitched back. Paths, on the same weights:

  sequential-reference   one window position per call, the reference backbone (what
                         mmseg's EncoderDecoder does with upstream's backbone)
  sequential-fast        the same loop with fast=True
  batched-fast           all windows of the batch together, max_windows=8 per call
                         (BatchedSlideEncoderDecoder)
  batched-fast-graphs    the same, the backbone replayed from CUDA graphs (cuda_graphs=2)

Sizes: ADE20K-like 512x683 (4 windows) and 512x512, and Cityscapes-like 1024x2048 (18).
Reported: images/s, ms per image, and the share of the time in the backbone (the path
``batched-fast-backbone-only``: the same windows through the backbone alone, in the same
group). The head is a light stand-in (a 1x1 classifier per FPN level, summed at the
finest): the GPU machine has no mmcv, so mmseg's UPerHead cannot run there; the
backbone's share is therefore an upper bound for UPerNet. On CPU: the small
preset at tiny sizes through the interpreter (a smoke run).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness
from benchmarks.bench_backbone import model_for, path_settings
from internvit_fast.presets import PRESETS
from internvit_fast.slide import slide_logits, window_boxes

if harness.CUDA:
    CONFIG, CROP, STRIDE, SIZES = "upernet", (504, 504), (322, 322), [(512, 683), (512, 512), (1024, 2048)]
else:
    CONFIG, CROP, STRIDE, SIZES = "small", (56, 56), (42, 42), [(56, 84)]
PATHS = ["sequential-reference", "sequential-fast", "batched-fast", "batched-fast-backbone-only",
         "batched-fast-graphs"]
CASES = [(size, path) for size in SIZES for path in PATHS]
CLASSES = 150


class StandInHead(nn.Module):
    """A 1x1 classifier on each FPN level, upsampled to the finest and summed (fp32)."""

    def __init__(self, channels: int, levels: int):
        super().__init__()
        self.cls = nn.ModuleList(nn.Conv2d(channels, CLASSES, 1) for _ in range(levels))

    def forward(self, feats):
        size = feats[0].shape[-2:]
        return sum(F.interpolate(c(f), size=size, mode="bilinear", align_corners=False)
                   for c, f in zip(self.cls, feats))


_heads = {}


def head_for(config):
    if config not in _heads:
        cfg = PRESETS[config]
        _heads[config] = StandInHead(cfg["embed_dim"], len(cfg["out_indices"])).to(harness.DEVICE).eval()
    return _heads[config]


def segmenter(backbone, head):
    def encode_decode(windows):
        logits = head(backbone(windows))
        return F.interpolate(logits, size=windows.shape[-2:], mode="bilinear", align_corners=False)
    return encode_decode


@pytest.mark.parametrize("size, path", harness.params(
    CASES, [f"{h}x{w}-{p}" for (h, w), p in CASES], group=lambda size, p: f"slide {size[0]}x{size[1]}", kind="slow"))
def test_slide_inference(bench, size, path):
    model, head = model_for(CONFIG), head_for(CONFIG)
    img = torch.randn(1, 3, *size, device=harness.DEVICE)
    max_windows = None if path.startswith("sequential") else 8
    windows = len(window_boxes(*size, CROP, STRIDE))
    if "graphs" in path and not harness.CUDA:
        pytest.skip("not measured: CUDA graphs need a GPU")
    saved = model._graphs
    if "graphs" in path:
        from internvit_fast.graphs import GraphCache
        model._graphs = GraphCache(2)  # full chunks of 8 and the last, shorter one
    try:
        with path_settings(model, fast=path != "sequential-reference"), torch.inference_mode():
            run = segmenter(model, head)
            if path.endswith("backbone-only"):
                # The same backbone calls with the head and the stitching left out: the
                # backbone's share of the batched path's time.
                crops = img.new_empty(windows, 3, *[min(c, s) for c, s in zip(CROP, size)]).normal_()

                def target():
                    return [model(part) for part in crops.split(max_windows)]
            else:
                def target():
                    return slide_logits(run, img, CROP, STRIDE, CLASSES, max_windows)
            target()  # JIT compilation and graph capture outside the timed rounds
            out = bench(target)
    finally:
        model._graphs = saved
    if not path.endswith("backbone-only"):
        assert out.shape == (1, CLASSES, *size) and torch.isfinite(out).all()
    harness.record(bench, config=CONFIG, size=list(size), path=path, windows=windows, max_windows=max_windows,
                   images=1)
