"""The one image reader of the command lines: every image a user names comes from the
internet, so it is opened only if it is a regular file, decoded by Pillow within its pixel
limit (a decompression bomb is refused), turned upright by its EXIF orientation, 16-bit
samples scaled to 8 bits (the high byte), as mmcv's OpenCV loader gives images to mmseg."""
from __future__ import annotations

import os
import stat
import warnings

import torch

from ..segmentation.segmentor import MEAN, STD  # upstream's data_preprocessor (RGB)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def open_rgb(path: str):
    """The image at ``path`` as an 8-bit RGB Pillow image, read as the module docstring says."""
    import numpy as np
    from PIL import Image, ImageOps
    if not regular(path):  # checked at the moment of reading: it may have changed since it was named
        raise ValueError("not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey: Pillow would clamp, not scale
                img = Image.fromarray((np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
            return img.convert("RGB")


def read_image(path: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB (see ``open_rgb``)."""
    import numpy as np
    return torch.from_numpy(np.asarray(open_rgb(path)).copy()).permute(2, 0, 1)


def load_image(path: str, size: int) -> torch.Tensor:
    """(3, size, size) float for the backbone alone: short side resized to ``size`` (bicubic),
    centre crop, normalised with upstream's mean and std. Exits with a message naming the
    file when it cannot be read."""
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("reading images needs Pillow (pip install pillow)") from None
    import numpy as np
    try:
        img = open_rgb(path)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise SystemExit(f"{path}: cannot read it as an image ({e})") from None
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))),
                     Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
