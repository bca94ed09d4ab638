"""The attention call itself, shared by the reference and the fast path.

use_flash_attn=True: flash-attn when it is installed and takes the input, else
torch's scaled_dot_product_attention (fused flash/cuDNN/efficient kernels on
GPU). use_flash_attn=False: upstream's naive path, softmax materialised in the
input dtype. Upstream crashes when flash-attn is absent; here it never needs it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: a broken install (wrong CUDA, missing symbols) counts as absent
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001
    flash_attn_func = None


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    attn = (q * scale) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def flash_attn_takes(q: torch.Tensor) -> bool:
    return (flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


def backend_name(q: torch.Tensor, use_flash_attn: bool) -> str:
    if not use_flash_attn:
        return "naive"
    return "flash_attn" if flash_attn_takes(q) else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           use_flash_attn: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, H, N, D) inputs; returns (B, H, N, D)."""
    backend = backend_name(q, use_flash_attn)
    if backend == "naive":
        return naive_attention(q, k, v, scale)
    if backend == "flash_attn":  # takes (B, N, H, D): a free transpose of our layout
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
