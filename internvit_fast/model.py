"""InternViT-6B segmentation backbone: the reference (naive) model.

The module tree and the state_dict keys are those of the upstream MMSegmentation
backbone (InternVL's ``segmentation/mmseg_custom/models/backbones/intern_vit_6b.py``),
so upstream checkpoints load unchanged. ``fast=True`` keeps every module and only
routes the blocks' forward through the Triton kernels (see ``fast_path.py``).
"""
from __future__ import annotations

import itertools
import logging
import math
import numbers
import os
from typing import List, Optional, Sequence

import torch
import torch.utils.checkpoint as cp
from torch import nn

from . import attention, fp8, graphs
from .posembed import resize_pos_table  # noqa: F401 - part of this module's API
from .kernels import attention_residual, mlp_residual, qk_norm
from .kernels.attention_fp8 import attend_fp8, takes as fp8_attention_takes
from .kernels.block_ops import linear, norm_input
from .kernels.common import FP8_GROUP
from .kernels.fp8 import Fp8Activation

logger = logging.getLogger("internvit_fast")

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32.

    The normalised value is cast back to the input dtype *before* the weight
    multiply, as upstream does, so the multiply rounds in the input dtype.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float, force_fp32: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))
        self.force_fp32 = force_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.force_fp32:
            return (x.float() * self.gamma.float()).to(x.dtype)
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}, force_fp32={self.force_fp32}"


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's semantics: survivors scaled by 1/keep)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.sample_scale(x)
        return x if scale is None else x * scale

    def sample_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The per-sample scale (0 or 1/keep), shaped to broadcast over ``x``; None when inactive.
        The fast path draws it the same way (same random numbers) and hands it to a kernel."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_normalization: bool,
                 use_flash_attn: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_flash_attn = use_flash_attn
        self.qk_normalization = qk_normalization
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # Over the full C-wide q and k (all heads together), not per head.
        self.q_norm = RMSNorm(dim) if qk_normalization else nn.Identity()
        self.k_norm = RMSNorm(dim) if qk_normalization else nn.Identity()
        self.fp8_attention = None  # InternViT6B.fp8_attention: None (the tuned table), True, False

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, N, C) q, k, v (any row strides) -> attention output (B, N, C), before proj."""
        B, N, C = q.shape
        # (B, N, C) -> (B, H, N, D) as views: head-major columns within q, k, v.
        q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = attention.attend(q, k, v, self.scale, self.use_flash_attn)
        return out.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[-1]
        q, k, v = self.qkv(x).split(C, dim=-1)  # columns ordered (q | k | v)
        return self.proj(self._attend(self.q_norm(q), self.k_norm(k), v))

    def forward_fused(self, h) -> torch.Tensor:
        """forward() up to proj, through the QK-norm kernel: q and k are written once in
        attention's layout, v is read in place from the projection (a strided view). ``h``:
        norm1's output (for an FP8 model quantized, kernels.fp8.Fp8Activation)."""
        C = self.qkv.in_features
        qkv = linear(h, self.qkv)  # cuBLAS (or the FP8 GEMM)
        if self._attends_in_fp8(qkv):  # q, k, v in e4m3 (kernels/attention_fp8.py)
            quantized = fp8.is_fp8_layer(self.proj) and self.head_dim == FP8_GROUP  # written as proj's FP8 input
            out, scale = attend_fp8(qkv, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.num_heads,
                                    self.scale, quantized)
            return Fp8Activation(out, scale, qkv.dtype) if quantized else out
        if self.qk_normalization:
            q, k = qk_norm(qkv, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps).unbind(0)
        else:
            q, k = qkv[..., :C], qkv[..., C:2 * C]
        return self._attend(q, k, qkv[..., 2 * C:])

    def _attends_in_fp8(self, qkv: torch.Tensor) -> bool:
        """FP8 attention on the fast path of an FP8 model with QK-norm: where the kernel takes the
        heads and the card, and fp8_attention is True, or None and the tuned table picks it."""
        if self.fp8_attention is False or not self.qk_normalization or not fp8.is_fp8_layer(self.qkv):
            return False
        return fp8_attention_takes(qkv, self.num_heads, table=self.fp8_attention is None)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as upstream
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 init_values: Optional[float], drop_path: float, use_flash_attn: bool,
                 with_cp: bool, qk_normalization: bool, layerscale_force_fp32: bool):
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_normalization, use_flash_attn)
        self.ls1 = LayerScale(dim, init_values, layerscale_force_fp32) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = RMSNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values, layerscale_force_fp32) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad and torch.is_grad_enabled():
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def forward_fused(self, x: torch.Tensor, h: Optional[torch.Tensor], next_norm: Optional[RMSNorm]):
        """_forward through the fused kernels (fast_path.forward_blocks), as the diagram reads.

        ``x`` is the residual stream and ``h = norm1(x)``, which the previous block's last op
        already computed (None: computed here). Returns the new stream and ``next_norm`` of
        it (the next block's norm1; an empty tensor when None), so no norm reads the stream
        twice. The ops run fused for inference and as differentiable kernels when gradients
        flow or drop path is active (kernels/block_ops.py); drop path's row scales are drawn
        as DropPath draws them.
        """
        if h is None:
            h = norm_input(x, self.norm1, self.attn.qkv)
        a = self.attn.forward_fused(h)
        x, h = attention_residual(a, self.attn.proj, _gamma(self.ls1), x, self.norm2, self._rowscale(1, x))
        return mlp_residual(h, self.mlp, _gamma(self.ls2), x, next_norm, self._rowscale(2, x), self.norm2.eps)

    def _rowscale(self, which: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Drop path's scale per row of ``like`` (B, N, C) -> (B, N), or None."""
        dp = self.drop_path1 if which == 1 else self.drop_path2
        scale = dp.sample_scale(like) if isinstance(dp, DropPath) else None
        return None if scale is None else scale.reshape(-1, 1).expand(like.shape[:-1]).contiguous()


def _init_fpn(m: nn.Module) -> None:
    """Upstream's ``_init_weights`` as it applies to the FPN (no pretrained file holds the FPN,
    so this is where fine-tuning starts): transposed convolutions N(0, sqrt(2 / fan_out))
    with fan_out = kh * kw * out_channels / groups and zero bias; norms weight 1, bias 0."""
    if isinstance(m, nn.ConvTranspose2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, LayerNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _gamma(ls: nn.Module) -> Optional[torch.Tensor]:
    return getattr(ls, "gamma", None)  # nn.Identity when init_values is falsy


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        _, _, H, W = x.shape
        return x.flatten(2).transpose(1, 2), H, W


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight.float()[:, None, None] * x + self.bias.float()[:, None, None]
        return x.to(dtype)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_out_indices(out_indices, depth: int) -> List[int]:
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence):
        raise ValueError(f"out_indices must be a list of block indices, got {out_indices!r}")
    bad = [i for i in out_indices if not _is_int(i)]
    if bad:
        raise ValueError(f"out_indices {list(out_indices)}: {bad} are not integers")
    idx = [int(i) for i in out_indices]
    if not idx:
        raise ValueError("out_indices must name at least one block")
    bad = [i for i in idx if not 0 <= i < depth]
    if bad:
        raise ValueError(f"out_indices {idx}: {bad} out of range for depth={depth} (valid 0..{depth - 1})")
    if len(set(idx)) != len(idx):
        raise ValueError(f"out_indices {idx} has duplicates")
    if idx != sorted(idx):
        raise ValueError(f"out_indices {idx} must be sorted ascending")
    return idx


def _check_arguments(a: dict) -> None:
    """Every constructor argument, checked before anything is built: a ValueError names it."""
    def need(ok, name, what):
        if not ok:
            raise ValueError(f"{name}={a[name]!r}: {what}")

    for name in ("in_chans", "patch_size", "img_size", "pretrain_size", "embed_dim", "num_heads", "depth"):
        need(_is_int(a[name]) and a[name] > 0, name, "must be a positive integer")
    need(a["embed_dim"] % a["num_heads"] == 0, "embed_dim", f"is not divisible by num_heads={a['num_heads']}")
    need(a["img_size"] % a["patch_size"] == 0, "img_size", f"is not a multiple of patch_size={a['patch_size']}")
    need(isinstance(a["mlp_ratio"], numbers.Real) and not isinstance(a["mlp_ratio"], bool)
         and math.isfinite(a["mlp_ratio"]) and a["mlp_ratio"] > 0 and int(a["embed_dim"] * a["mlp_ratio"]) > 0,
         "mlp_ratio", "must be a positive, finite number")
    rate = a["drop_path_rate"]
    need(isinstance(rate, numbers.Real) and not isinstance(rate, bool) and 0 <= rate < 1, "drop_path_rate",
         "must be a number in [0, 1)")
    iv = a["init_values"]
    need(iv is None or (isinstance(iv, numbers.Real) and not isinstance(iv, bool) and math.isfinite(iv)),
         "init_values", "must be a number (or None/0 for no LayerScale)")
    for name in ("qkv_bias", "qk_normalization", "with_cp", "layerscale_force_fp32", "freeze_vit", "with_fpn",
                 "with_final_norm", "fast"):
        need(isinstance(a[name], bool), name, "must be True or False")
    flash = a["use_flash_attn"]
    if isinstance(flash, (list, tuple)):
        need(len(flash) == a["depth"] and all(isinstance(f, bool) for f in flash), "use_flash_attn",
             f"as a list must hold one bool per block (depth={a['depth']})")
    else:
        need(isinstance(flash, bool), "use_flash_attn", "must be True, False or a list of one bool per block")
    need(a["dtype"] in _DTYPES, "dtype", f"not supported; expected one of {_DTYPES}")
    need(a["precision"] in fp8.PRECISIONS, "precision", f"must be one of {fp8.PRECISIONS}")
    need(a["fp8_attention"] is None or isinstance(a["fp8_attention"], bool), "fp8_attention", "must be None (the tuned table), True or False")
    need(a["pretrained"] is None or isinstance(a["pretrained"], (str, os.PathLike)), "pretrained",
         "must be a checkpoint path or None")
    need(isinstance(a["cuda_graphs"], bool) or (_is_int(a["cuda_graphs"]) and a["cuda_graphs"] >= 0),
         "cuda_graphs", "must be True, False or how many input shapes to keep graphs for")


class InternViT6B(nn.Module):
    """InternViT-6B segmentation backbone (upstream arguments, names and defaults).

    Extra arguments: ``fast`` routes inference through the fused Triton kernels
    (same modules, same state_dict); ``dtype`` is the parameter dtype (upstream
    casts the whole module to bf16); ``cuda_graphs`` replays inference forwards from
    CUDA graphs, one per input shape (True: the last 2 shapes; an int N: the last N;
    see graphs.py); ``precision`` "bf16" (the model's dtype, the default) or "fp8": the
    blocks' linear layers with e4m3 weights and activations, for inference (see fp8.py; also
    settable on a loaded model: ``model.precision = "fp8"``); ``fp8_attention``, for an FP8
    model on the fast path: attention on e4m3 q, k and v too (kernels/attention_fp8.py) where
    the card's tuned table picks it (None, the default; the FP8 kernel where nothing was
    measured), always (True) or never (False); settable on a model.
    """

    def __init__(self, in_chans=3, patch_size=14, img_size=224, pretrain_size=224, qkv_bias=False,
                 drop_path_rate=0.0, embed_dim=3200, num_heads=25, mlp_ratio=4, init_values=0.1,
                 qk_normalization=True, depth=48, use_flash_attn=True, with_cp=True,
                 layerscale_force_fp32=False, out_indices=(7, 11, 15, 23), freeze_vit=False,
                 with_fpn=False, with_final_norm=False, pretrained=None, fast=False,
                 dtype=torch.bfloat16, cuda_graphs=False, precision="bf16", fp8_attention=None):
        super().__init__()
        if isinstance(dtype, str):  # configs (mmseg) name it: 'bfloat16', 'float16', 'float32'
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype, dtype)
        _check_arguments(dict(locals()))
        self.out_indices = _check_out_indices(out_indices, depth)
        if with_fpn and len(self.out_indices) != 4:
            raise ValueError(f"with_fpn needs exactly four out_indices, got {self.out_indices}")
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.img_size = img_size
        self.pretrain_size = pretrain_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.with_fpn = with_fpn
        self.freeze_vit = freeze_vit
        self.fast = fast
        self._has_data = False  # see _check_has_data
        n_graphs = 2 if cuda_graphs is True else int(cuda_graphs)
        self._graphs = graphs.GraphCache(n_graphs) if n_graphs else None

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        # On the CPU whatever the default device: under torch.device("meta") .item() has no value.
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        # Upstream takes one flag or one per block.
        flash = list(use_flash_attn) if isinstance(use_flash_attn, (list, tuple)) else [use_flash_attn] * depth

        def built(module: nn.Module) -> nn.Module:
            # Initialise in fp32, then cast block by block: a 6B model never exists in
            # fp32 all at once (24 GB), only in the target dtype plus one block (and an FP8
            # model never in bf16).
            module = module.apply(self._init_weights).to(dtype)
            if precision == "fp8":
                fp8.convert_block(module)
            return module

        self.blocks = nn.ModuleList([
            built(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, dpr[i],
                        flash[i], with_cp, qk_normalization, layerscale_force_fp32))
            for i in range(depth)])

        if with_fpn:
            def final_norm():
                return LayerNorm2d(embed_dim) if with_final_norm else nn.Identity()

            def up():
                return nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)

            self.up1 = nn.Sequential(up(), LayerNorm2d(embed_dim), nn.GELU(), up(), final_norm())
            self.up2 = nn.Sequential(up(), final_norm())
            self.up3 = nn.Sequential(nn.Identity(), final_norm())
            self.up4 = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=2), final_norm())
            self.init_fpn()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.to(dtype)

        self.fp8_attention = fp8_attention
        if pretrained is not None:
            from .checkpoint import load_checkpoint
            load_checkpoint(self, pretrained)
        if freeze_vit:
            for p in self.vit_parameters():
                p.requires_grad_(False)

    def init_fpn(self) -> None:
        """(Re)initialise the FPN as upstream does (no pretrained file holds it)."""
        for m in (self.up1, self.up2, self.up3, self.up4):
            m.apply(_init_fpn)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.cls_token.dtype

    @property
    def precision(self) -> str:
        return "fp8" if fp8.is_fp8(self.blocks[0]) else "bf16"

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in fp8.PRECISIONS:
            raise ValueError(f"precision={value!r}: must be one of {fp8.PRECISIONS}")
        if value == "bf16" and self.precision == "fp8":
            raise ValueError("precision='bf16' on an FP8 model: the full-precision weights are gone; "
                             "build the model again and load the checkpoint")
        if value == "fp8":
            for blk in self.blocks:
                fp8.convert_block(blk)

    @property
    def fp8_attention(self) -> Optional[bool]:
        return self.blocks[0].attn.fp8_attention

    @fp8_attention.setter
    def fp8_attention(self, value: Optional[bool]) -> None:
        if not (value is None or isinstance(value, bool)):  # (1 == True: not `in (None, True, False)`)
            raise ValueError(f"fp8_attention={value!r}: must be None (the tuned table), True or False")
        for blk in self.blocks:
            blk.attn.fp8_attention = value

    def vit_parameters(self):
        """Every parameter except the FPN's (what freeze_vit freezes)."""
        for name, p in self.named_parameters():
            if not name.startswith(("up1.", "up2.", "up3.", "up4.")):
                yield p

    # --- input checks and position table -------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not self._has_data:
            self._check_has_data()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x has dtype {x.dtype}; the backbone takes normalised float images (a {x.dtype} "
                             "image is usually raw pixels: convert and normalise it first)")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x has {x.shape[1]} channels, expected in_chans={self.in_chans}")
        if x.shape[0] == 0:
            raise ValueError("x holds no images (batch size 0)")
        if x.device != self.cls_token.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.cls_token.device}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
            raise ValueError(f"x height and width ({h}, {w}) must be positive multiples of "
                             f"patch_size={self.patch_size}")
        if self.with_fpn and min(h, w) < 2 * self.patch_size:
            raise ValueError(f"x is {h}x{w}: with the FPN (whose last level halves the patch grid) each side "
                             f"must be at least {2 * self.patch_size} pixels (a 2x2 grid of patches)")

    def _check_has_data(self) -> None:
        """Refuse to run a model whose weights are (partly) on the meta device: built under
        torch.device("meta") and not loaded yet. Checked once (a few ms for the 6B model's 636
        tensors), again after a move (``_apply``: .to, .cuda, .to_empty)."""
        # (not state_dict(): under FSDP2 its hooks put the sharded parameters back mid-forward)
        meta = [k for k, t in itertools.chain(self.named_parameters(), self.named_buffers()) if t.is_meta]
        if meta:
            raise ValueError(
                f"InternViT6B: {len(meta)} of its tensors are on the meta device, without data (e.g. {meta[0]!r}): "
                "a model built under torch.device('meta') runs once its weights are loaded, with "
                "load_checkpoint(model, path, device=...) or load_state_dict(state_dict, assign=True)")
        self._has_data = True

    def _apply(self, fn, recurse=True):
        self._has_data = False
        return super()._apply(fn, recurse)

    def pos_embed_for(self, grid_hw) -> torch.Tensor:
        """The position table for a (h, w) patch grid: the loaded table at the model's own grid,
        else that table resized bicubically.

        Not cached: a cache keyed on the parameter cannot see every update (fused optimizers
        and ``.data`` writes leave its version counter alone), and the resize is one small
        interpolation of a (C, g, g) map per forward, next to 48 blocks of GEMMs."""
        grid_hw = tuple(grid_hw)
        if grid_hw == (self.img_size // self.patch_size,) * 2:
            return self.pos_embed
        return resize_pos_table(self.pos_embed, grid_hw)

    # --- forward -------------------------------------------------------------------

    def embed(self, x: torch.Tensor):
        x, H, W = self.patch_embed(x.to(self.dtype))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_for((H, W))
        return x, H, W

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        self._check_input(x)
        if self.precision == "fp8" and torch.is_grad_enabled() and self.training and not self.freeze_vit:
            raise RuntimeError("precision='fp8' is for inference: call model.eval() (or run under "
                               "torch.no_grad()); FP8 weights are not trained")
        tokens, H, W = self.embed(x)
        # Blocks after the last requested output cannot change the outputs: skip them.
        blocks = self.blocks[: self.out_indices[-1] + 1]
        from . import fast_path  # the one place where fast and naive part ways
        if fast_path.use_kernels(self, tokens):
            feats = fast_path.forward_blocks(blocks, tokens, self.out_indices)
        else:
            feats = []
            for i, blk in enumerate(blocks):
                tokens = blk(tokens)
                if i in self.out_indices:
                    feats.append(tokens)
        B = x.shape[0]
        return [f[:, 1:].transpose(1, 2).reshape(B, self.embed_dim, H, W) for f in feats]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self._graphs is not None and isinstance(x, torch.Tensor) and not graphs.needs_eager(self, x):
            self._check_input(x)
            return self._graphs.run(self, self._forward, x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = self.forward_features(x)
        if self.with_fpn:
            outs = [up(f) for up, f in zip((self.up1, self.up2, self.up3, self.up4), outs)]
        return [o.float().contiguous() for o in outs]

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, out_indices={self.out_indices}, fast={self.fast}, precision={self.precision}, "
                f"with_fpn={self.with_fpn}, freeze_vit={self.freeze_vit}")
