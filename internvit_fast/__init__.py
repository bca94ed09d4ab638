"""internvit-fast: a drop-in, faster InternViT-6B backbone for semantic segmentation."""
from .checkpoint import load_checkpoint
from .model import InternViT6B
from .segmentation.segmentor import Segmentor

__all__ = ["InternViT6B", "Segmentor", "load_checkpoint"]
__version__ = "0.1.0"
