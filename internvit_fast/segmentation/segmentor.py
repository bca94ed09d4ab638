"""Semantic segmentation without MMSegmentation: backbone + head + sliding windows.

    seg = Segmentor.build("upernet", fast=True)         # upstream's UPerNet, 150 ADE20K classes
    seg.load_checkpoint("upernet_intern_vit_6b_504_80k_ade20k.pth")   # mmseg's keys, safe loader
    labels = seg.predict([image])[0]                    # (3, H, W) RGB 0..255 -> (H, W) class ids

What mmseg's test pipeline and ``EncoderDecoder`` do, in plain torch: each image resized so
its short side is the crop size (its long side at most 4x that, keeping the ratio), then to
multiples of the patch size; normalised with ImageNet's mean and std; cut into mmseg's
window grid (``slide.py``, the windows of an image batched ``max_windows`` per backbone
call); each window's logits resized to the window and averaged where windows overlap; the
image's logits resized back to its original size; the arg max. Inference only: mmseg
(``internvit_fast.mmseg``) stays the path for training.

The resizes of a uint8 image on the CPU are OpenCV's ``cv2.resize`` (bilinear), as mmcv
calls it, when OpenCV is installed: the model then sees exactly what mmseg's pipeline gives
it. Without OpenCV (or for float or GPU images) they are torch's bilinear with half-pixel
centres, rounded to uint8 after each as OpenCV leaves them: OpenCV's weights are fixed
point, so a pixel may then differ by one grey level. Given the same resized input, the
logits and labels are mmseg's (tests/test_segmentor.py).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import BNHead, FCNHead, UPerHead
from ..model import InternViT6B
from .presets import PRESETS
from .slide import slide_logits

MEAN = (123.675, 116.28, 103.53)  # ImageNet's, in 0..255 RGB (mmseg's data preprocessor)
STD = (58.395, 57.12, 57.375)

# The head of each backbone preset, as upstream's configs build it (ADE20K: 150 classes).
HEADS: Dict[str, dict] = {
    "upernet": dict(decode=lambda c: UPerHead([c] * 4, 1536, 150),
                    auxiliary=lambda c: FCNHead(c, 1536, 150, num_convs=1, concat_input=False, in_index=2)),
    "linear": dict(decode=lambda c: BNHead(c, c, 150, in_index=0, dropout_ratio=0.0), auxiliary=None),
    # the small CPU stand-in: UPerNet's structure at a width a CPU runs in seconds
    "small": dict(decode=lambda c: UPerHead([c] * 4, 32, 150),
                  auxiliary=lambda c: FCNHead(c, 32, 150, num_convs=1, concat_input=False, in_index=2)),
}


def resized_size(h: int, w: int, short: int, long: int, multiple: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """mmseg's test resizes for an (h, w) image: ``Resize(scale=(long, short), keep_ratio=True)``
    (mmcv's rescale: the largest factor that keeps the long side <= long and the short side
    <= short, sizes rounded half up), then ``ResizeToMultiple(multiple)`` (each side rounded
    up to a multiple). Returns both (h, w) sizes."""
    factor = min(long / max(h, w), short / min(h, w))
    first = (int(h * factor + 0.5), int(w * factor + 0.5))
    return first, tuple(math.ceil(s / multiple) * multiple for s in first)


def head_flops(config: str, img_hw: Optional[Tuple[int, int]] = None) -> float:
    """FLOPs of the decode head of a preset on one image (the backbone's crop size by
    default), counted by torch's FlopCounterMode over meta tensors: no memory, no compute."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = PRESETS[config]
    h, w = img_hw or (cfg["img_size"], cfg["img_size"])
    gh, gw = h // cfg["patch_size"], w // cfg["patch_size"]
    c = cfg["embed_dim"]
    with torch.device("meta"):
        head = HEADS[config]["decode"](c).eval()
        if cfg.get("with_fpn"):  # the FPN's levels: 4x, 2x, 1x and 0.5x the patch grid
            feats = [torch.empty(1, c, int(gh * f), int(gw * f)) for f in (4, 2, 1, 0.5)]
        else:
            feats = [torch.empty(1, c, gh, gw) for _ in cfg["out_indices"]]
        with FlopCounterMode(display=False) as counter:
            head(feats)
    return float(counter.get_total_flops())


def _opencv():
    try:
        import cv2
    except ImportError:
        return None
    return cv2


class Segmentor(nn.Module):
    """An InternViT6B backbone and a decode head (and the auxiliary head a training run
    saved, kept so its checkpoint loads strictly; it does not run), with mmseg's slide
    inference. ``head_dtype``: the heads' dtype (default the backbone's, bf16; float32 gives
    mmseg's numbers, which runs its heads in fp32). ``channels_last``: the heads'
    convolutions in channels-last memory format (faster on GPUs)."""

    def __init__(self, backbone: InternViT6B, decode_head: nn.Module, auxiliary_head: Optional[nn.Module] = None,
                 crop_size: Tuple[int, int] = (504, 504), stride: Tuple[int, int] = (322, 322),
                 max_windows: int = 8, head_dtype: Optional[torch.dtype] = None, channels_last: bool = True):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        for name, pair in (("crop_size", crop_size), ("stride", stride)):
            if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair):
                raise ValueError(f"{name} must be two positive ints, got {pair!r}")
        if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
            raise ValueError(f"stride {stride} must not exceed crop_size {crop_size}")
        if any(c % backbone.patch_size for c in crop_size):
            raise ValueError(f"crop_size {crop_size} must be multiples of the patch size {backbone.patch_size}")
        if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows <= 0:
            raise ValueError(f"max_windows must be a positive int, got {max_windows!r}")
        self.crop_size, self.stride, self.max_windows = tuple(crop_size), tuple(stride), max_windows
        self.channels_last = bool(channels_last)
        self.set_head_dtype(head_dtype or backbone.dtype)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def build(cls, config: str = "upernet", fast: bool = True, cuda_graphs: Union[bool, int] = False,
              dtype: torch.dtype = torch.bfloat16, **kwargs) -> "Segmentor":
        """Upstream's segmentor for a backbone preset ("upernet", "linear", or "small", the
        CPU stand-in) with random weights; ``load_checkpoint`` then loads a trained one."""
        if config not in HEADS:
            raise ValueError(f"config must be one of {sorted(HEADS)}, got {config!r}")
        backbone = InternViT6B(**PRESETS[config], fast=fast, cuda_graphs=cuda_graphs, dtype=dtype,
                               drop_path_rate=0.0, with_cp=False)
        heads = HEADS[config]
        crop = backbone.img_size
        aux = heads["auxiliary"](backbone.embed_dim) if heads["auxiliary"] else None
        kwargs.setdefault("crop_size", (crop, crop))
        kwargs.setdefault("stride", ((crop * 322 + 503) // 504,) * 2)  # upstream's 322 at crop 504
        return cls(backbone, heads["decode"](backbone.embed_dim), aux, **kwargs).eval()

    def set_head_dtype(self, dtype: torch.dtype) -> None:
        self.head_dtype = dtype
        for head in (self.decode_head, self.auxiliary_head):
            if head is not None:
                head.to(dtype=dtype, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def load_checkpoint(self, path, strict: bool = True):
        """A segmentor checkpoint (mmseg's or mmengine's runner's: backbone.*, decode_head.*,
        auxiliary_head.*) through the package's safe loader; see checkpoint.load_checkpoint."""
        from ..checkpoint import load_checkpoint
        # A file without the auxiliary head (saved for inference, or of a recipe without one)
        # loads: inference never runs it. Upstream's linear probe is its own FCNHead with
        # num_convs=0 and with_norm, which names BNHead's norm `norm`.
        out = load_checkpoint(self, path, strict=strict, may_miss=("auxiliary_head.",),
                              renames={"decode_head.norm.": "decode_head.bn."})
        self.set_head_dtype(self.head_dtype)  # loading copies into the existing tensors; keep the layout
        return out

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def encode_decode(self, windows: Tensor) -> Tensor:
        """Logits (M, classes, h, w) of normalised windows (M, 3, h, w), fp32, resized to the
        windows as mmseg's decode head does."""
        feats = self.backbone(windows)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        feats = [f.to(dtype=self.head_dtype).contiguous(memory_format=fmt) for f in feats]
        logits = self.decode_head(feats).float()
        return F.interpolate(logits, size=windows.shape[2:], mode="bilinear",
                             align_corners=self.decode_head.align_corners)

    def slide(self, inputs: Tensor) -> Tensor:
        """Logits (N, classes, H, W) of normalised images (N, 3, H, W) by mmseg's sliding windows."""
        return slide_logits(self.encode_decode, inputs, self.crop_size, self.stride, self.num_classes,
                            self.max_windows)

    def prepare(self, image: Tensor) -> Tensor:
        """One image (3, H, W), RGB 0..255 (uint8 or float), as mmseg's test pipeline gives it
        to the model: resized (see ``resized_size``) and normalised, (1, 3, h, w) fp32."""
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image must be a (3, H, W) RGB tensor, got "
                             f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise ValueError(f"an image must be uint8 or float (0..255), got {image.dtype}")
        h, w = image.shape[1:]
        if h == 0 or w == 0:
            raise ValueError(f"the image is empty ({h}x{w})")
        short = min(self.crop_size)
        sizes = resized_size(h, w, short, 4 * short, self.backbone.patch_size)
        least = self.backbone.patch_size * (2 if self.backbone.with_fpn else 1)
        if min(sizes[0]) < 1 or min(sizes[1]) < least:
            raise ValueError(f"the image is {h}x{w}: too elongated for the model (resized to a short side of at "
                             f"most {short} and a long side of at most {4 * short}, it would be "
                             f"{sizes[0][0]}x{sizes[0][1]}; the model needs at least {least} pixels a side)")
        cv2 = _opencv() if image.dtype == torch.uint8 and image.device.type == "cpu" else None
        if cv2 is not None:
            arr = image.permute(1, 2, 0).contiguous().numpy()
            for size in sizes:
                if arr.shape[:2] != size:
                    arr = cv2.resize(arr, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
            x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(self.mean.device, torch.float32)
        else:
            x = image.to(self.mean.device, torch.float32)[None]
            for size in sizes:
                if tuple(x.shape[2:]) != size:
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                    x = x.round().clamp(0, 255)  # OpenCV returns uint8
        return (x - self.mean) / self.std

    @torch.no_grad()
    def predict(self, images: Union[Tensor, Sequence[Tensor]], return_logits: bool = False):
        """Per-pixel class ids (H, W) int64 for each image (3, H, W) RGB 0..255, at its own
        size; with ``return_logits`` also the (classes, H, W) fp32 logits. A (N, 3, H, W)
        tensor is N images."""
        if isinstance(images, Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, Tensor):
            images = [images]
        labels, logits = [], []
        for image in images:
            small = self.slide(self.prepare(image))
            if return_logits:
                out = self._to_size(small, image.shape[1:])
                labels.append(out.argmax(0))
                logits.append(out)
            else:
                labels.append(self._labels(small, image.shape[1:]))
        return (labels, logits) if return_logits else labels

    def _to_size(self, logits: Tensor, size) -> Tensor:
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=self.decode_head.align_corners)[0]

    def _labels(self, logits: Tensor, size, classes_at_once: int = 8) -> Tensor:
        """argmax over classes of the logits resized to ``size``, ``classes_at_once`` classes
        resized at a time: a 12-megapixel photo's 150 fp32 maps would take 7 GB at once. Each
        class resizes independently, and a later class wins only when strictly greater, so
        this is the full resize's argmax exactly (the first maximum, as argmax)."""
        best = labels = None
        for c in range(0, logits.shape[1], classes_at_once):
            part = self._to_size(logits[:, c:c + classes_at_once], size)
            top, idx = part.max(0)
            if best is None:
                best, labels = top, idx
            else:
                better = top > best
                best = torch.where(better, top, best)
                labels = torch.where(better, idx + c, labels)
        return labels
