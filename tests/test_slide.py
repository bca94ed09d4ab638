"""Sliding-window inference (internvit_fast/slide.py) against a plain statement of mmseg's
``EncoderDecoder.slide_inference`` loop, written out here so it runs without mmseg."""
import pytest
import torch

from internvit_fast.segmentation.slide import slide_logits, window_boxes


def mmseg_slide(encode_decode, inputs, crop, stride, num_classes):
    """mmseg 1.2.2's slide_inference, restated: one window position at a time for the batch."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = inputs.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = inputs.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = inputs.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_seg_logit = encode_decode(inputs[:, :, y1:y2, x1:x2])
            preds += torch.nn.functional.pad(crop_seg_logit,
                                             (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def _head(windows):
    # Depends on every pixel of the window and on its position inside it, so a shifted or
    # mis-sized window changes the result.
    b, _, h, w = windows.shape
    ramp = torch.linspace(0.5, 1.5, h * w, dtype=windows.dtype).view(1, 1, h, w)
    mixed = windows.sum(1, keepdim=True) * ramp
    return torch.cat([mixed, mixed.mean((2, 3), keepdim=True).expand(b, 1, h, w), windows[:, :1] ** 2], 1)


@pytest.mark.parametrize("size, crop, stride", [
    ((70, 98), (28, 28), (14, 14)),
    ((70, 98), (28, 42), (21, 14)),
    ((20, 112), (28, 28), (28, 28)),     # shorter than a window
    ((57, 61), (28, 28), (27, 13)),
    ((28, 28), (28, 28), (14, 14)),
    ((71, 99), (28, 28), (14, 14)),       # one pixel past a whole number of strides
])
@pytest.mark.parametrize("max_windows", [None, 1, 3, 8])
def test_slide_equals_mmseg_window_loop(size, crop, stride, max_windows):
    inputs = torch.randn(2, 3, *size, dtype=torch.float64)
    got = slide_logits(_head, inputs, crop, stride, 3, max_windows)
    want = mmseg_slide(_head, inputs, crop, stride, 3)
    # Same windows, same order of additions: equal, not merely close.
    assert torch.equal(got, want)


def test_window_boxes_follow_mmseg_order():
    boxes = window_boxes(70, 98, (28, 28), (21, 21))
    assert boxes[0] == (0, 28, 0, 28) and boxes[-1] == (42, 70, 70, 98)
    assert len(boxes) == 15 and [b[:2] for b in boxes[:5]] == [(0, 28)] * 5  # rows outer, columns inner


@pytest.mark.parametrize("crop, stride, msg", [
    ((28, 28), (29, 14), "must not exceed crop"),
    ((28, 28), (14, 40), "must not exceed crop"),
    ((28, 28), (0, 14), "must be positive"),
    ((0, 28), (14, 14), "must be positive"),
])
def test_bad_crop_or_stride_is_refused_before_any_window_runs(crop, stride, msg):
    calls = []
    with pytest.raises(ValueError, match=msg):
        slide_logits(lambda w: calls.append(w) or w, torch.randn(1, 3, 70, 98), crop, stride, 3)
    assert not calls
