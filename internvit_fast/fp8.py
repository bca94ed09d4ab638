"""``precision="fp8"``: the blocks' linear layers with FP8 (e4m3) weights, for inference.

``InternViT6B(..., precision="fp8")`` (or ``model.precision = "fp8"`` on a built or loaded
model) replaces each block's qkv, proj, fc1 and fc2 ``nn.Linear`` by an ``Fp8Linear``: the
weight quantized once per 128 x 128 block (kernels/fp8.py), held in e4m3 with its fp32
scales (1 byte a weight: the 6B model's weights take ~6 GB instead of ~12), the bias in the
model's dtype. Everything else (patch embedding, norms, LayerScale, the residual stream,
the FPN) keeps the model's dtype and upstream's rounding points; only the GEMMs' inputs are
FP8, activations quantized per 1 x 128 group.

Both paths compute the same thing: the reference path (``fast=False``, or where the kernels
cannot run) through ``Fp8Linear.forward`` in plain torch, the fast path through the FP8
kernels (kernels/block_ops.py dispatches on the layer). A checkpoint in bf16 (any published
one) loads into an FP8 model, quantized as it loads; a saved FP8 state_dict (weights e4m3 plus
``weight_scale``) loads as it is. There is no way back to bf16 without the original weights.
"""
from __future__ import annotations


import torch
from torch import nn

from .checkpoint.fp8 import SCALE, scale_problem, weight_problem
from .kernels.common import FP8
from .kernels.fp8 import groups, linear_ref, quantize_ref, quantize_weight

PRECISIONS = ("bf16", "fp8")  # "bf16": the model's own dtype (the default)
LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # a block's linear layers


class Fp8Linear(nn.Module):
    """nn.Linear with an e4m3 weight and one fp32 scale per 128 x 128 block (inference only).

    ``forward`` is the reference: x quantized per 1 x 128 group along K, the product of the
    dequantized operands summed in fp32, bias added there, rounded to x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer(SCALE, torch.ones(groups(out_features), groups(in_features), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "Fp8Linear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.dtype,
                  layer.weight.device)
        with torch.no_grad():
            new.set_weight(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new.bias.requires_grad_(False) if new.bias is not None else None
        return new

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantize a full-precision (out, in) weight into this layer."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Fp8Linear: weight shape {tuple(w.shape)}, expected {(self.out_features, self.in_features)}")
        q, s = quantize_weight(w.to(self.weight.device))
        self.weight.copy_(q)
        getattr(self, SCALE).copy_(s)

    def _apply(self, fn, recurse=True):
        # model.to(dtype), .half(), .bfloat16() cast every floating tensor: the e4m3 weight and
        # its fp32 scales keep their dtypes (and follow only the move to another device).
        kept = {name: self._buffers[name] for name in ("weight", SCALE)}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            new = self._buffers[name]
            if new.dtype != t.dtype:
                self._buffers[name] = t.to(new.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, s = quantize_ref(x)
        return linear_ref(q, s, self.weight, getattr(self, SCALE), self.bias, x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A full-precision weight (any published checkpoint) is quantized as it loads.
        w, scale = state_dict.get(prefix + "weight"), state_dict.get(prefix + SCALE)
        if w is None and scale is not None:
            error_msgs.append(f"{prefix}{SCALE}: a {SCALE} without its weight (it would pair with the old weight)")
            return
        if isinstance(w, torch.Tensor) and w.dtype == FP8 and isinstance(scale, torch.Tensor):
            problem = scale_problem(scale, (self.out_features, self.in_features)) or weight_problem(w)
            if problem:
                error_msgs.append(f"{prefix}weight: {problem}")
                return
        if isinstance(w, torch.Tensor) and w.dtype != FP8 and prefix + SCALE in state_dict:
            error_msgs.append(f"{prefix}weight: a {w.dtype} weight with a {SCALE} (only e4m3 weights carry scales)")
            return
        if isinstance(w, torch.Tensor) and w.dtype != FP8:
            if not w.is_floating_point() or tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: cannot quantize a {w.dtype} {tuple(w.shape)} tensor into "
                                  f"Fp8Linear({self.in_features}, {self.out_features})")
                return
            state_dict = dict(state_dict)
            # (a layer built on the meta device and loaded with assign=True: quantized where w is)
            where = w.device if self.weight.is_meta else self.weight.device
            state_dict[prefix + "weight"], state_dict[prefix + SCALE] = quantize_weight(w.to(where))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def _parent(block: nn.Module, path: str):
    owner, name = path.rsplit(".", 1)
    return block.get_submodule(owner), name


def convert_block(block: nn.Module) -> None:
    """Replace a block's four linear layers by Fp8Linear (in place; idempotent)."""
    for path in LAYERS:
        owner, name = _parent(block, path)
        layer = getattr(owner, name)
        if isinstance(layer, nn.Linear):
            setattr(owner, name, Fp8Linear.from_linear(layer))


def is_fp8(block: nn.Module) -> bool:
    return is_fp8_layer(block.get_submodule(LAYERS[0]))


def is_fp8_layer(layer: nn.Module) -> bool:
    return isinstance(layer, Fp8Linear)


def check_card(device: torch.device) -> None:
    """The FP8 kernels need FP8 tensor cores: sm_89 (Ada) or later."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise RuntimeError(
                f"precision='fp8' with fast=True needs a GPU with FP8 tensor cores (sm_89 or later: L4, L40, "
                f"H100, H200); {torch.cuda.get_device_name(device)} is sm_{major}{minor}. Use precision='bf16'.")
