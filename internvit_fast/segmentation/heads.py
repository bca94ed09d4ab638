"""Segmentation heads in plain torch, with MMSegmentation 1.2.2's parameter names.

    UPerHead   pyramid pooling (1, 2, 3, 6) on the last level + FPN over all four, then a
               3x3 fusion conv and the 1x1 classifier (upstream: 4 x 3200 in, 1536, 150)
    FCNHead    the auxiliary head: ``num_convs`` 3x3 ConvModules on one level, classifier
    BNHead     upstream's linear probe: BatchNorm over the (concatenated) levels, classifier

Each ConvModule is mmcv's default: conv without bias, BatchNorm, ReLU, under the keys
``conv.*`` and ``bn.*``; the classifier is ``conv_seg`` (1x1 with bias) after a
Dropout2d. So ``decode_head.*`` / ``auxiliary_head.*`` of a checkpoint saved by mmseg (or
by mmengine's runner, upstream's released segmentors included) load into these modules
unchanged, and their logits equal mmseg's (tests/test_heads.py builds both). Inference
only: training stays with mmseg (``internvit_fast.mmseg``). No mmcv or mmseg import here.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvModule(nn.Module):
    """mmcv's ConvModule with a BatchNorm and a ReLU: conv (no bias) -> bn -> relu."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


def _resize(x: Tensor, size, align_corners: bool) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _Head(nn.Module):
    """What mmseg's BaseDecodeHead gives every head: which levels it reads, the dropout and
    the 1x1 classifier ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, in_index: Union[int, Sequence[int]],
                 dropout_ratio: float, align_corners: bool):
        super().__init__()
        self.channels = _positive("channels", channels)
        self.num_classes = _positive("num_classes", num_classes)
        if not 0.0 <= dropout_ratio < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {dropout_ratio!r}")
        self.in_index = in_index
        self.align_corners = bool(align_corners)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def _select(self, inputs: Sequence[Tensor]):
        levels = list(self.in_index) if isinstance(self.in_index, (list, tuple)) else [self.in_index]
        if any(not -len(inputs) <= i < len(inputs) for i in levels):
            raise ValueError(f"{type(self).__name__}: in_index {self.in_index} but the backbone gave "
                             f"{len(inputs)} feature maps")
        picked = [inputs[i] for i in levels]
        return picked if isinstance(self.in_index, (list, tuple)) else picked[0]

    def cls_seg(self, feat: Tensor) -> Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)


class UPerHead(_Head):
    """UPerNet's head (mmseg's ``UPerHead``): PPM on the last selected level, lateral 1x1
    convs on the others, a top-down path of bilinear upsampling and sums, 3x3 convs on each
    level, everything upsampled to the finest level, concatenated and fused by a 3x3 conv."""

    def __init__(self, in_channels: Sequence[int] = (3200, 3200, 3200, 3200), channels: int = 1536,
                 num_classes: int = 150, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 in_index: Sequence[int] = (0, 1, 2, 3), dropout_ratio: float = 0.1, align_corners: bool = False):
        in_channels, in_index = list(in_channels), list(in_index)
        if not in_channels or len(in_channels) != len(in_index):
            raise ValueError(f"UPerHead: in_channels {in_channels} and in_index {in_index} must have the same, "
                             "non-zero length")
        for c in in_channels:
            _positive("in_channels", c)
        if not pool_scales or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in pool_scales):
            raise ValueError(f"UPerHead: pool_scales must be positive ints, got {pool_scales!r}")
        super().__init__(channels, num_classes, in_index, dropout_ratio, align_corners)
        self.in_channels = in_channels
        self.pool_scales = tuple(pool_scales)
        # mmseg's PPM is a ModuleList of (AdaptiveAvgPool2d, ConvModule) pairs: keys psp_modules.I.1.*
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1)) for s in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)

    def _psp(self, x: Tensor) -> Tensor:
        outs = [x] + [_resize(ppm(x), x.shape[2:], self.align_corners) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        feats = self._select(inputs)
        laterals = [conv(feats[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self._psp(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down, in mmseg's order
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        for i in range(len(outs) - 1, 0, -1):
            outs[i] = _resize(outs[i], outs[0].shape[2:], self.align_corners)
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(_Head):
    """mmseg's ``FCNHead``: ``num_convs`` ConvModules (keys convs.I.*) on one level, optionally
    concatenated with the input and fused (``concat_input``: conv_cat.*), then the classifier.
    Upstream's auxiliary head: 3200 -> 1536, one 3x3 conv, no concatenation."""

    def __init__(self, in_channels: int = 3200, channels: int = 1536, num_classes: int = 150, num_convs: int = 1,
                 kernel_size: int = 3, concat_input: bool = False, in_index: int = 2, dropout_ratio: float = 0.1,
                 align_corners: bool = False):
        if isinstance(num_convs, bool) or not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"FCNHead: num_convs must be an int >= 0, got {num_convs!r}")
        _positive("in_channels", in_channels)
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"FCNHead: with num_convs=0, in_channels ({in_channels}) must equal channels ({channels})")
        super().__init__(channels, num_classes, in_index, dropout_ratio, align_corners)
        pad = _positive("kernel_size", kernel_size) // 2
        convs = [ConvModule(in_channels if i == 0 else channels, channels, kernel_size, padding=pad)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.concat_input = bool(concat_input)
        if self.concat_input:
            self.conv_cat = ConvModule(in_channels + channels, channels, kernel_size, padding=pad)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        x = self._select(inputs)
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.cls_seg(feats)


class BNHead(_Head):
    """Upstream's linear-probing head (``internvit_fast.mmseg.BNHead`` for mmseg): the selected
    levels concatenated, BatchNorm (key bn.*), the 1x1 classifier. in_channels == channels."""

    def __init__(self, in_channels: int = 3200, channels: int = 3200, num_classes: int = 150,
                 in_index: Union[int, List[int]] = 0, dropout_ratio: float = 0.0, align_corners: bool = False):
        if in_channels != channels:
            raise ValueError(f"BNHead: in_channels ({in_channels}) must equal channels ({channels})")
        super().__init__(channels, num_classes, in_index, dropout_ratio, align_corners)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        x = self._select(inputs)
        if isinstance(x, list):
            x = torch.cat(x, dim=1)
        return self.cls_seg(self.bn(x))
