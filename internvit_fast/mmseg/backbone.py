"""The registered model classes: ``InternViT6B`` (the backbone as an mmengine BaseModule),
upstream's linear-probe ``BNHead``, and ``BatchedSlideEncoderDecoder`` (mmseg's
EncoderDecoder with its sliding windows batched). With MMSegmentation 1.x they go into
``mmseg.registry.MODELS``; with 0.x into ``BACKBONES``/``HEADS``."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..model import InternViT6B as _InternViT6B
from ..segmentation.slide import slide_logits

try:  # MMSegmentation 1.x
    from mmengine.model import BaseModule
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.models.segmentors import EncoderDecoder
    from mmseg.registry import MODELS as BACKBONES
    HEADS = BACKBONES
    MMSEG_1X = True
except ImportError:  # MMSegmentation 0.x
    from mmcv.runner import BaseModule
    from mmseg.models.builder import BACKBONES as BACKBONES
    from mmseg.models.builder import HEADS as HEADS
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    MMSEG_1X = False


@BACKBONES.register_module(name="InternViT6B", force=True)
class InternViT6B(_InternViT6B, BaseModule):
    """internvit_fast.InternViT6B as an mmengine BaseModule (every argument, ``fast`` included).

    The state_dict keys are the plain model's, so a segmentor's keys are upstream's
    (``backbone.blocks.N...``). ``pretrained=`` loads at construction and
    ``init_cfg=dict(type='Pretrained', checkpoint=...)`` at ``init_weights()``, both
    through internvit_fast's loader (InternVL layouts, safetensors, resizing, strict keys).
    """

    def __init__(self, *args, init_cfg=None, **kwargs):
        # MRO: _InternViT6B.__init__ -> BaseModule.__init__() -> nn.Module.__init__().
        super().__init__(*args, **kwargs)
        self.init_cfg = copy.deepcopy(init_cfg)

    def init_weights(self):
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            load_checkpoint(self, cfg["checkpoint"], strict=cfg.get("strict", True))
            self._is_init = True
            return
        # No pretrained weights: the constructor already initialised every parameter
        # as upstream does; other init_cfg types go through mmengine.
        if cfg:
            super().init_weights()


@HEADS.register_module(name="BNHead", force=True)
class BNHead(BaseDecodeHead):
    """Upstream's linear-probing head: BatchNorm over the (concatenated) features, then
    the 1x1 classifier. ``in_channels`` must equal ``channels``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.in_channels != self.channels:
            raise ValueError(f"BNHead: in_channels ({self.in_channels}) must equal channels ({self.channels})")
        norm = (self.norm_cfg or {}).get("type", "BN")
        self.bn = nn.SyncBatchNorm(self.channels) if norm == "SyncBN" else nn.BatchNorm2d(self.channels)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        if isinstance(x, (list, tuple)):
            x = torch.cat(x, dim=1)
        return self.cls_seg(self.bn(x))


if MMSEG_1X:
    @BACKBONES.register_module(name="BatchedSlideEncoderDecoder", force=True)
    class BatchedSlideEncoderDecoder(EncoderDecoder):
        """mmseg's EncoderDecoder whose slide inference runs the windows of all images in the
        batch together, ``test_cfg.max_windows`` (default 8) per backbone call.

        Same window grid, same overlap averaging, same resizes as ``EncoderDecoder``
        (internvit_fast.slide): the predictions are mmseg's, computed in fewer, larger calls.
        """

        def slide_inference(self, inputs, batch_img_metas):
            crop, stride = tuple(self.test_cfg.crop_size), tuple(self.test_cfg.stride)
            h, w = inputs.shape[-2:]
            # As mmseg does: the head resizes its logits to the window's shape (a torch.Size:
            # that type is how mmseg's decode heads recognise slide inference).
            batch_img_metas[0]["img_shape"] = torch.Size((min(crop[0], h), min(crop[1], w)))
            return slide_logits(lambda windows: self.encode_decode(windows, batch_img_metas), inputs, crop, stride,
                                self.out_channels, self.test_cfg.get("max_windows", 8))
