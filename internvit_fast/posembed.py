"""The position table's bicubic resize, below both the model and the checkpoint loader."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def resize_pos_table(table: torch.Tensor, grid_hw: Sequence[int]) -> torch.Tensor:
    """Resize a (1, 1 + g*g, C) position table to grid (h, w), cls entry kept.

    Bicubic, align_corners=False, in fp32, cast back to the table's dtype.
    """
    n = table.shape[1] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"position table has {n} patch entries, not a square grid")
    h, w = grid_hw
    if (h, w) == (g, g):
        return table
    patches = table[:, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(h, w), mode="bicubic", align_corners=False)
    patches = patches.flatten(2).transpose(1, 2).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1)
