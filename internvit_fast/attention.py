"""The attention call itself, shared by the reference and the fast path.

use_flash_attn=True: flash-attn when it is installed and takes the input, else
torch's scaled_dot_product_attention. use_flash_attn=False: upstream's naive path,
softmax materialised in the input dtype. Upstream crashes when flash-attn is absent;
here it never needs it.

SDPA backend on Hopper (sm_90): cuDNN attention first, then FlashAttention-2, then
the others (``SM90_PRIORITY``). Torch's own default order puts flash first and reaches
cuDNN only when asked (torch 2.13 on the project's machines); cuDNN's Hopper kernels
are usually the faster ones at head_dim 128. ``sdpa_backend`` names the backend SDPA
picks for given inputs; the GPU run records it. cuDNN can accept inputs and then fail
when it runs them (pytorch/pytorch#140930, "No execution plans support the graph"): the
first such failure of an eager call is warned about once and the process goes on with
torch's own order (``CUDNN_FAILED``), rather than every attention call failing.

Layouts handed over without a copy (read in torch's aten/src/ATen/native/transformers/
cuda/sdp_utils.cpp): flash and cuDNN need only a unit stride in the last dimension
(``check_last_dim_stride_equals_1_dense``); the other strides go to the kernels as
batch/row/head strides. The fast path gives q and k as views of one (2, B, N, C) buffer
(strides (N*C, D, C, 1) as (B, H, N, D)) and v as a view of the qkv projection (strides
(N*3C, D, 3C, 1)); cuDNN's older layout check accepted exactly these two forms too
(unpacked q/k, packed-QKV v).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional: a broken install (wrong CUDA, missing symbols) counts as absent
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001
    flash_attn_func = None

SM90_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
_NAMES = {int(b): b.name.lower() for b in SM90_PRIORITY}
# The first cuDNN attention failure of this process (see attend); from then on SDPA runs in
# torch's own backend order, in eager and in graphs compiled afterwards.
CUDNN_FAILED: list = []


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


def sdpa_priority(q: torch.Tensor):
    """The context that orders SDPA's backends for ``q``: cuDNN first on sm_90, else torch's."""
    # Also while torch.compile traces (dynamo traces this context manager): a compiled model
    # must run the same attention backend as eager, or a comparison measures backends.
    if cudnn_first(q):
        return sdpa_kernel(SM90_PRIORITY, set_priority=True)
    return contextlib.nullcontext()


def cudnn_first(q: torch.Tensor) -> bool:
    """Whether SDPA asks cuDNN first for ``q``: on sm_90, until cuDNN has failed once here."""
    return q.is_cuda and not CUDNN_FAILED and torch.cuda.get_device_capability(q.device)[0] == 9


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> str:
    """The SDPA backend torch picks for these inputs under our priority ("cudnn_attention", ...)."""
    with sdpa_priority(q):
        return _NAMES.get(int(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale)), "math")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           use_flash_attn: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, H, N, D) inputs; returns (B, H, N, D)."""
    backend = backend_name(q, use_flash_attn)
    if backend == "naive":
        return naive_attention(q, k, v, scale)
    if backend == "flash_attn":  # takes (B, N, H, D): a free transpose of our layout
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    if torch.compiler.is_compiling() or not cudnn_first(q):
        with sdpa_priority(q):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    try:
        with sdpa_priority(q):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        # Only cuDNN's own failure ("cuDNN Frontend error: ..."; not a CUDA fault of an earlier
        # kernel surfacing here), and not inside a CUDA graph capture (which it invalidated).
        if ("cudnn" not in str(e).lower() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
                or sdpa_backend(q, k, v, scale) != "cudnn_attention"):
            raise
        CUDNN_FAILED.append(f"{type(e).__name__}: {e}"[:500])
        warnings.warn(f"cuDNN attention failed on inputs {tuple(q.shape)} {q.dtype} ({CUDNN_FAILED[0]}); SDPA runs "
                      "in torch's own backend order from now on in this process", RuntimeWarning)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
