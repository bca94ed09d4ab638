"""Optimisation for InternViT-6B segmentors: upstream's layer-wise lr decay
(``InternViTLayerDecayOptimizerConstructor``) and fp32 master weights for the bf16 backbone
(``FP32MasterOptimWrapper``)."""
from __future__ import annotations

import json
from typing import List, Tuple

import torch
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS

from ..checkpoint import CheckpointError


def layer_id(name: str, num_layers: int) -> int:
    """Upstream's layer id of a segmentor parameter (BEiT-style layer decay): the embeddings
    are layer 0, ``backbone.blocks.N`` layer N + 1, everything else (FPN, heads) the last."""
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed") or \
            name.startswith(("backbone.patch_embed", "backbone.visual_embed")):
        return 0
    if name.startswith(("backbone.blocks.", "backbone.layers.")):
        return int(name.split(".")[2]) + 1
    return num_layers - 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="InternViTLayerDecayOptimizerConstructor", force=True)
class InternViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise learning-rate decay for InternViT-6B segmentors, as upstream trains them.

    ``paramwise_cfg=dict(num_layers=48, layer_decay_rate=0.95)``: ``num_layers + 2`` groups
    (see ``layer_id``), each with lr ``base_lr * layer_decay_rate ** (num_layers + 1 - id)``;
    1-D parameters and biases get no weight decay. Upstream also meant to exempt
    ``pos_embed`` and ``cls_token``, but compared the prefixed names (``backbone.pos_embed``)
    with bare ones, so they did get weight decay in its runs: so they do here, unless
    ``paramwise_cfg.embed_no_decay=True``. Frozen parameters are left out.
    """

    def add_params(self, params, module, **kwargs):
        depth = getattr(getattr(module, "backbone", None), "depth", None)
        if depth is not None and self.paramwise_cfg["num_layers"] != depth:
            # A shrunk or 45-block backbone with num_layers=48 would get every scale wrong.
            raise ValueError(f"paramwise_cfg.num_layers={self.paramwise_cfg['num_layers']} but the backbone has "
                             f"depth={depth}: set paramwise_cfg.num_layers={depth}")
        num_layers = self.paramwise_cfg["num_layers"] + 2
        rate = self.paramwise_cfg["layer_decay_rate"]
        embed_no_decay = self.paramwise_cfg.get("embed_no_decay", False)
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith(".bias") or (
                embed_no_decay and name in ("backbone.pos_embed", "backbone.cls_token"))
            lid = layer_id(name, num_layers)
            key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
            if key not in groups:
                scale = rate ** (num_layers - lid - 1)
                groups[key] = dict(params=[], param_names=[], group_name=key, lr_scale=scale,
                                   lr=scale * self.base_lr,
                                   weight_decay=0.0 if no_decay else (self.base_wd or 0.0))
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
        params.extend(groups.values())
        # As upstream's constructor logs them: each group's parameters, lr scale and decay.
        info = {k: {n: g[n] for n in ("param_names", "lr_scale", "lr", "weight_decay")} for k, g in groups.items()}
        print_log(f"layer-wise lr decay: {len(groups)} parameter groups = {json.dumps(info, indent=2)}",
                  logger="current")


@OPTIM_WRAPPERS.register_module(name="FP32MasterOptimWrapper", force=True)
class FP32MasterOptimWrapper(OptimWrapper):
    """fp32 master weights for a model held in bf16 (or fp16): the optimizer updates fp32
    copies of the low-precision parameters; after each step the parameters are set to the
    copies, rounded. Forward and backward (the fast path's kernels included) stay in bf16.

    Upstream trains the bf16 backbone with plain AdamW on bf16 weights: an update smaller
    than half a bf16 step of a weight is lost (at lr 4e-5, every RMSNorm, QK-norm and
    LayerScale weight of the backbone stays bit-unchanged). Here updates accumulate in the
    masters. Memory: 4 bytes per low-precision parameter for the master, and the optimizer
    state in fp32 (AdamW: 8 more bytes) instead of bf16 (4). The masters are part of the
    state dict, so a resumed run continues from them.
    ``optim_wrapper=dict(type='FP32MasterOptimWrapper', optimizer=...)`` or ``--fp32-master``."""

    def __init__(self, optimizer, **kwargs):
        self._pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if p.dtype in (torch.bfloat16, torch.float16):
                    master = p.detach().float().clone().requires_grad_(p.requires_grad)
                    self._pairs.append((p, master))
                    params.append(master)
                else:
                    params.append(p)
            group["params"] = params
        super().__init__(optimizer, **kwargs)

    def step(self, **kwargs) -> None:
        for p, master in self._pairs:
            master.grad = None if p.grad is None else p.grad.float()
        super().step(**kwargs)
        with torch.no_grad():
            for p, master in self._pairs:
                p.copy_(master)
                master.grad = None

    def zero_grad(self, **kwargs) -> None:
        super().zero_grad(**kwargs)
        for p, _ in self._pairs:
            p.grad = None

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["fp32_master"] = [m.detach().clone() for _, m in self._pairs]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("fp32_master", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            if len(masters) != len(self._pairs):
                raise CheckpointError(f"the checkpoint holds {len(masters)} fp32 master tensors, this run has "
                                      f"{len(self._pairs)}")
            with torch.no_grad():
                for (p, master), saved in zip(self._pairs, masters):
                    master.copy_(saved)
                    p.copy_(master)
