"""internvit-fast: a drop-in, faster InternViT-6B backbone for semantic segmentation."""
from .checkpoint import load_checkpoint
from .model import InternViT6B

__all__ = ["InternViT6B", "load_checkpoint"]
__version__ = "0.1.0"
