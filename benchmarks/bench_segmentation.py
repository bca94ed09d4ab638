"""Whole-image slide inference, as segmentation users run it: time per image.

An image is cut into 504x504 windows 322 apart (mmseg's slide grid, internvit_fast.segmentation.slide),
each window runs the UPerNet-configuration backbone (bf16) and upstream's decode head, the
native UPerHead (internvit_fast.segmentation.heads: 4 x 3200 channels in, 1536, 150 classes; its logits
equal mmseg's, tests/test_heads.py), and the logits are stitched back. Paths, on the same
weights:

  sequential-reference   one window position per call, the reference backbone and the
                         head in fp32 (what mmseg's EncoderDecoder does with upstream's)
  sequential-fast        the same loop with fast=True
  batched-fast           all windows of the batch together, max_windows=8 per call, the
                         head in bf16 and channels-last (internvit_fast.Segmentor's default)
  batched-fast-graphs    the same, the backbone replayed from CUDA graphs (cuda_graphs=2)
  batched-fast-backbone-only, batched-fast-head-only
                         the batched path's backbone calls alone, and its head on the same
                         windows' features alone: the backbone's and the head's shares

Sizes: ADE20K-like 512x683 (4 windows) and 512x512, and Cityscapes-like 1024x2048 (18).
Reported: images/s, ms per image, and the shares. On CPU: the small preset with its small
head at tiny sizes through the interpreter (a smoke run).
"""
import pytest
import torch

from benchmarks import harness
from benchmarks.bench_backbone import model_for, path_settings
from internvit_fast.segmentation.presets import PRESETS
from internvit_fast.segmentation.segmentor import HEADS, Segmentor
from internvit_fast.segmentation.slide import window_boxes

if harness.CUDA:
    CONFIG, CROP, STRIDE, SIZES = "upernet", (504, 504), (322, 322), [(512, 683), (512, 512), (1024, 2048)]
else:
    CONFIG, CROP, STRIDE, SIZES = "small", (56, 56), (42, 42), [(56, 84)]
PATHS = ["sequential-reference", "sequential-fast", "batched-fast", "batched-fast-backbone-only",
         "batched-fast-head-only", "batched-fast-graphs"]
CASES = [(size, path) for size in SIZES for path in PATHS]

_heads = {}


def segmentor_for(config: str, batched: bool) -> Segmentor:
    """The shared backbone with upstream's head for the preset (random weights, the same for
    every path): fp32 and contiguous in mmseg's sequential loop (mmseg runs its heads in
    fp32), bf16 and channels-last when batched (Segmentor's default); one window per
    backbone call (mmseg's loop, for one image) or eight."""
    if config not in _heads:
        torch.manual_seed(1)
        for key in (False, True):
            _heads[config, key] = HEADS[config]["decode"](PRESETS[config]["embed_dim"]).to(harness.DEVICE).eval()
        _heads[config, True].load_state_dict(_heads[config, False].state_dict())
    return Segmentor(model_for(config), _heads[config, batched], crop_size=CROP, stride=STRIDE,
                     max_windows=8 if batched else 1, head_dtype=torch.bfloat16 if batched else torch.float32,
                     channels_last=batched)


@pytest.mark.slow
@pytest.mark.parametrize("size, path", harness.params(
    CASES, [f"{h}x{w}-{p}" for (h, w), p in CASES], group=lambda size, p: f"slide {size[0]}x{size[1]}", kind="slow"))
def test_slide_inference(bench, size, path):
    if "graphs" in path and not harness.CUDA:
        pytest.skip("not measured: CUDA graphs need a GPU")
    seg = segmentor_for(CONFIG, path.startswith("batched"))
    model, head = seg.backbone, seg.decode_head
    img = torch.randn(1, 3, *size, device=harness.DEVICE)
    windows = len(window_boxes(*size, CROP, STRIDE))
    saved = model._graphs
    if "graphs" in path:
        from internvit_fast.graphs import GraphCache
        model._graphs = GraphCache(2)  # full chunks of 8 and the last, shorter one
    try:
        with path_settings(model, fast=path != "sequential-reference"), torch.inference_mode():
            crops = img.new_empty(windows, 3, *[min(c, s) for c, s in zip(CROP, size)]).normal_()
            if path.endswith("backbone-only"):
                # The same backbone calls with the head and the stitching left out: the
                # backbone's share of the batched path's time.
                def target():
                    return [model(part) for part in crops.split(seg.max_windows)]
            elif path.endswith("head-only"):
                # The head on the same windows' features, in the same chunks: its share.
                feats = [[f.to(seg.head_dtype).contiguous(memory_format=torch.channels_last) for f in model(part)]
                         for part in crops.split(seg.max_windows)]

                def target():
                    return [head(f) for f in feats]
            else:
                def target():
                    return seg.slide(img)
            target()  # JIT compilation and graph capture outside the timed rounds
            out = bench(target)
    finally:
        model._graphs = saved
    if not path.endswith("-only"):
        assert out.shape == (1, seg.num_classes, *size) and torch.isfinite(out).all()
    harness.record(bench, config=CONFIG, size=list(size), path=path, windows=windows, max_windows=seg.max_windows,
                   images=1)
