"""The fast path's switch and loop: when the blocks run through the fused kernels.

``use_kernels`` is the one place that decides between the fused and the reference
blocks; ``InternViT6B.forward_features`` asks it once per call. Both read the same
modules and parameters, so a model's state_dict does not depend on ``fast``. What
each block computes on the fast path is ``Block.forward_fused`` in model.py, beside
its reference ``Block._forward``. Per block (x: residual stream, h: its RMSNorm)::

    qkv   = h @ Wqkv^T                    cuBLAS
    q, k  = qk_norm(qkv)                  kernel: both RMSNorms, attention's layout; v is a view of qkv
    a     = attention(q, k, v)            SDPA (cuDNN first on sm_90) / flash-attn / naive
    x, h  = x + ls1 * (a Wproj^T + b), norm2(x)                 attention_residual
    x, h  = x + ls2 * (GELU(h Wfc1^T + b) Wfc2^T + b), norm1'(x)  mlp_residual

(kernels/block_ops.py): for inference the GEMMs with fused epilogues (linear_gelu, then
linear_residual_norm: the residual epilogue and rms_norm), each falling back to its
unfused alternative where the tuned table for the card says that measured faster
(kernels/tuned/); in training the differentiable kernels.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence

import torch
import torch.utils.checkpoint as cp
from torch import nn

from .kernels import kernels_can_run_on
from .kernels.block_ops import norm_input
from .kernels.common import FLOAT_DTYPES

_warned_cpu = False


def use_kernels(model, x: torch.Tensor) -> bool:
    """Whether this forward of ``model`` on tokens ``x`` runs the Triton kernels.

    They run for inference and for training (the fused ops have backward kernels; drop path
    is a per-row scale inside them). The reference ops run instead for float64 models, on
    a CPU without Triton's interpreter, under autocast to a dtype other than the tokens'
    (an fp32 model under bf16 autocast: the kernels take one dtype, autocast would mix two),
    and with weights sharded by FSDP (each block gathers its weights only when called as a
    module).
    """
    global _warned_cpu
    if not model.fast:
        return False
    if x.dtype not in FLOAT_DTYPES:  # e.g. a model cast to float64: the kernels take 16/32-bit floats
        return False
    if not kernels_can_run_on(x.device):
        if not _warned_cpu:
            warnings.warn(f"InternViT6B(fast=True) on {x.device}: the Triton kernels need CUDA "
                          "(or TRITON_INTERPRET=1 on CPU); running the reference ops", stacklevel=3)
            _warned_cpu = True
        return False
    if _sharded(model):  # FSDP: a block's weights are whole only inside its own forward call
        return False
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != x.dtype:
        return False
    return True


def _sharded(model) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(model.blocks[0].norm1.weight, DTensor)


def forward_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, out_indices: Sequence[int]) -> List[torch.Tensor]:
    """Run ``blocks`` on tokens ``x`` through Block.forward_fused; return the residual stream
    after each of out_indices.

    Each block's last kernel also normalises the stream for the next block. With activation
    checkpointing (``with_cp`` while gradients flow) a block recomputes from its input
    stream alone, as the reference's blocks do: there each block computes its own norm1, so
    only the stream is kept between blocks.
    """
    from .fp8 import check_card, is_fp8
    if is_fp8(blocks[0]):
        check_card(x.device)
    feats = []
    checkpointed = blocks[0].with_cp and torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in blocks[0].parameters()))
    h = None if checkpointed else norm_input(x, blocks[0].norm1, blocks[0].attn.qkv)
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) and not checkpointed else None
        if checkpointed:
            x = cp.checkpoint(lambda t, b=blk: b.forward_fused(t, None, None)[0], x, use_reentrant=False)
        else:
            x, h = blk.forward_fused(x, h, nxt)
        if i in out_indices:
            feats.append(x)
    return feats
