"""Fused Triton kernels for InternViT-6B, one op per file, each beside its torch reference.

Installed as ``internvit_fast.kernels``. Each op is a torch custom op
(``torch.ops.internvit_fast.*``), so torch.compile traces through it without a
graph break; ``*_launch`` writes into a caller's buffer (the tests poison it),
``*_ref`` is the plain-torch statement of the math.
"""
from ._common import INTERPRETING, kernels_can_run_on
from .gelu_linear import gelu_linear, gelu_linear_launch, gelu_linear_ref
from .qk_norm import qk_norm, qk_norm_launch, qk_norm_ref
from .residual_rms_norm import residual_rms_norm, residual_rms_norm_launch, residual_rms_norm_ref
from .rms_norm import rms_norm, rms_norm_launch, rms_norm_ref

__all__ = [
    "INTERPRETING", "kernels_can_run_on",
    "gelu_linear", "gelu_linear_launch", "gelu_linear_ref",
    "qk_norm", "qk_norm_launch", "qk_norm_ref",
    "residual_rms_norm", "residual_rms_norm_launch", "residual_rms_norm_ref",
    "rms_norm", "rms_norm_launch", "rms_norm_ref",
]
