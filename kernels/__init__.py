"""Fused Triton kernels for InternViT-6B, one op per file, each beside its torch reference.

Installed as ``internvit_fast.kernels``. Each op is a torch custom op
(``torch.ops.internvit_fast.*``), so torch.compile traces through it without a
graph break; ``*_launch`` writes into a caller's buffer (the tests poison it),
``*_ref`` is the plain-torch statement of the math, ``plan_*`` the launch decision as a
value (launch.py). ``REGISTRY`` lists what each kernel file states about itself
(registry.KernelSpec); the compile gate, the tuner, the benchmarks and the tests loop
over it.
"""
# The modules first: importing an op named like its module (rms_norm) rebinds the name.
from . import (attention_fp8 as _attention_fp8, block_ops as _block_ops, fp8 as _fp8, gelu as _gelu, qk_norm as _qk_norm,
               rms_norm as _rms_norm)
from .common import INTERPRETING, kernels_can_run_on
from .block_ops import attention_residual, linear_gelu, linear_residual_norm, mlp_residual, mlp_residual_norm
from .gelu import gelu_launch, gelu_ref
from .gemm import linear_launch, linear_ref
from .qk_norm import qk_norm, qk_norm_launch, qk_norm_ref
from .rms_norm import residual_rms_norm, residual_rms_norm_launch, rms_norm, rms_norm_launch, rms_norm_ref

REGISTRY = [_rms_norm.SPEC, _rms_norm.RES_SPEC, _qk_norm.SPEC, _gelu.SPEC, _block_ops.GELU_SPEC,
            _block_ops.PROJ_SPEC, _block_ops.FC2_SPEC,
            # the backward kernels
            _rms_norm.BWD_SPEC, _block_ops.GELU_GRAD_SPEC,
            # FP8 inference (precision="fp8")
            _fp8.NORM_SPEC, _fp8.RES_NORM_SPEC, _fp8.QUANT_SPEC, _fp8.QKV_SPEC, _fp8.GELU_SPEC, _fp8.PROJ_SPEC, _fp8.FC2_SPEC,
            *_attention_fp8.SPECS]

__all__ = [
    "INTERPRETING", "REGISTRY", "kernels_can_run_on",
    "attention_residual", "mlp_residual",
    "gelu_launch", "gelu_ref",
    "linear_gelu", "linear_launch", "linear_ref", "linear_residual_norm", "mlp_residual_norm",
    "qk_norm", "qk_norm_launch", "qk_norm_ref",
    "residual_rms_norm", "residual_rms_norm_launch", "rms_norm", "rms_norm_launch", "rms_norm_ref",
]
