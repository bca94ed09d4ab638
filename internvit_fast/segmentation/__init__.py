"""Segmentation without MMSegmentation: the ``Segmentor`` (backbone, FPN and upstream's
heads, mmseg's keys), the heads, batched sliding-window inference, the upstream
configurations (presets) and ADE20K's classes and palette."""
from .segmentor import HEADS, Segmentor

__all__ = ["HEADS", "Segmentor"]
