"""Sliding-window inference, as MMSegmentation does it, with the windows batched.

mmseg's ``EncoderDecoder.slide_inference`` cuts a (padded) batch of images into a grid of
``crop``-sized windows ``stride`` apart (the last row and column shifted back inside the
image; a side smaller than the crop is one window of that side), runs the backbone and
head on one window position at a time for all images, adds each window's logits into
the image and divides by how many windows covered each pixel. ``slide_logits`` computes
the same thing with the same grid and the same order of additions, but runs the windows
of every position together, ``max_windows`` at a time: one backbone call of batch 8
instead of eight of batch 1, which is what keeps the GPU busy. Plain torch: the mmseg
model type in ``internvit_fast.mmseg`` and the benchmarks both use it.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor


def window_boxes(h_img: int, w_img: int, crop: Tuple[int, int], stride: Tuple[int, int]
                 ) -> List[Tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of every window, in mmseg's order (rows outer, columns inner)."""
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    if min(h_crop, w_crop, h_stride, w_stride) <= 0:
        raise ValueError(f"crop {crop} and stride {stride} must be positive")
    if h_stride > h_crop or w_stride > w_crop:
        # Windows further apart than they are wide leave pixels no window covers (0/0 logits).
        raise ValueError(f"stride {stride} must not exceed crop {crop}: pixels between windows would get no "
                         "prediction")
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, h_img)
            x2 = min(w_idx * w_stride + w_crop, w_img)
            boxes.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return boxes


def slide_logits(encode_decode: Callable[[Tensor], Tensor], inputs: Tensor, crop: Tuple[int, int],
                 stride: Tuple[int, int], out_channels: int, max_windows: Optional[int] = None) -> Tensor:
    """Per-pixel logits (N, out_channels, H, W) of ``inputs`` (N, C, H, W) by sliding windows.

    ``encode_decode`` maps a batch of windows (M, C, h, w) to logits (M, out_channels, h, w).
    ``max_windows``: windows per call (None: one window position per call, N windows, as
    mmseg runs them). Every window of an image has the same size, so any of them batch.
    """
    n, _, h_img, w_img = inputs.shape
    boxes = window_boxes(h_img, w_img, crop, stride)
    per_call = n if max_windows is None else max_windows
    if per_call <= 0:
        raise ValueError(f"max_windows must be positive, got {max_windows}")
    preds = inputs.new_zeros((n, out_channels, h_img, w_img))
    count = inputs.new_zeros((n, 1, h_img, w_img))
    # Window-major order: row r is window r // n of image r % n. A call computes per_call
    # rows; every window whose n rows are done is added, windows in mmseg's order.
    total = len(boxes) * n
    held, done = None, 0
    for start in range(0, total, per_call):
        rows = []
        for r in range(start, min(start + per_call, total)):
            y1, y2, x1, x2 = boxes[r // n]
            rows.append(inputs[r % n, :, y1:y2, x1:x2])
        out = encode_decode(torch.stack(rows))
        held = out if held is None else torch.cat([held, out])
        ready = held.shape[0] // n
        for i in range(ready):
            y1, y2, x1, x2 = boxes[done + i]
            preds[:, :, y1:y2, x1:x2] += held[i * n:(i + 1) * n]
            count[:, :, y1:y2, x1:x2] += 1
        done += ready
        held = held[ready * n:]
    return preds / count
