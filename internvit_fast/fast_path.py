"""The fast path: the blocks' forward through the fused Triton kernels.

``use_kernels`` is the one place that decides between this and the reference
blocks; ``InternViT6B.forward_features`` asks it once per call. Both read the
same modules and parameters, so a model's state_dict does not depend on ``fast``.

Per block (x: residual stream, h: normalised input of the next sub-layer)::

    qkv  = h @ Wqkv^T                      cuBLAS
    q,k,v = qk_norm(qkv)                   kernel: split + both RMSNorms + attention layout
    a    = proj(attention(q, k, v))        SDPA / flash-attn / naive, then cuBLAS
    x, h = x + ls1 * a, norm2(...)         kernel: residual + LayerScale + RMSNorm
    m    = fc2(gelu_linear(h))             kernel: fc1 GEMM with bias + erf GELU; cuBLAS fc2
    x, h = x + ls2 * m, next norm1(...)    kernel: the next block's norm1 fused in
"""
from __future__ import annotations

import warnings
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import attention
from .kernels import gelu_linear, kernels_can_run_on, qk_norm, residual_rms_norm, rms_norm
from .kernels._common import FLOAT_DTYPES

_warned_cpu = False


def use_kernels(model, x: torch.Tensor) -> bool:
    """Whether this forward of ``model`` on tokens ``x`` runs the Triton kernels.

    The kernels have no backward: whenever autograd needs gradients through the
    blocks (grad enabled and the tokens or any block weight require grad), the
    reference ops run for that call, so gradients are always the reference's.
    Active stochastic depth (training with drop_path > 0) also runs the reference.
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
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.blocks.parameters())):
        return False
    if model.training and any(getattr(m, "drop_prob", 0.0) > 0 for m in model.blocks.modules()):
        return False
    return True


def _gamma(ls: nn.Module):
    return getattr(ls, "gamma", None)  # nn.Identity when init_values is falsy


def _attention(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    B, N, C = h.shape
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
    if attn.qk_normalization:
        q, k, v = qk_norm(qkv, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps).unbind(0)
    else:  # nothing to normalise: views of the projection, no copy
        q, k, v = qkv.split(C, dim=-1)
    q, k, v = (t.view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    out = attention.attend(q, k, v, attn.scale, attn.use_flash_attn)
    return F.linear(out.transpose(1, 2).reshape(B, N, C), attn.proj.weight, attn.proj.bias)


def forward_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, out_indices: Sequence[int]) -> List[torch.Tensor]:
    """Run ``blocks`` on tokens ``x``; return the residual stream after each of out_indices."""
    feats = []
    h = rms_norm(x, blocks[0].norm1.weight, blocks[0].norm1.eps)
    for i, blk in enumerate(blocks):
        a = _attention(blk.attn, h)
        x, h = residual_rms_norm(x, a, _gamma(blk.ls1), blk.norm2.weight, blk.norm2.eps)
        m = F.linear(gelu_linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else None
        x, h = residual_rms_norm(x, m, _gamma(blk.ls2), nxt.weight if nxt is not None else None,
                                 nxt.eps if nxt is not None else 1e-6)
        if i in out_indices:
            feats.append(x)
    return feats
