"""MMSegmentation adapter: registers ``InternViT6B``, upstream's linear-probe ``BNHead``,
``BatchedSlideEncoderDecoder`` (mmseg's EncoderDecoder with its sliding windows batched),
upstream's layer-wise lr decay (``InternViTLayerDecayOptimizerConstructor``), and the
multi-process wrappers ``InternViTDDP`` and ``InternViTFSDP``; ``mmseg_runner`` adds what a
training run needs (safe checkpoint reading for the runner, ``ShardedCheckpointHook``,
``SyncNormStatsHook``, ``FP32MasterOptimWrapper``, the command line).

    python -m internvit_fast.mmseg train CONFIG [--resume [PATH]] [--load-from PATH] [--crop-size N]
                                                [--fp32-master] [--work-dir DIR] [--cfg-options k=v ...]
    python -m internvit_fast.mmseg test CONFIG CHECKPOINT [--crop-size N] [--work-dir DIR] [--cfg-options ...]
    torchrun --nproc_per_node 8 -m internvit_fast.mmseg train CONFIG     (DDP, or FSDP by config)

In a config::

    custom_imports = dict(imports=['internvit_fast.mmseg'], allow_failed_imports=False)
    model = dict(type='BatchedSlideEncoderDecoder', backbone=dict(type='InternViT6B', fast=True, ...),
                 test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322), max_windows=8), ...)

With MMSegmentation 1.x the classes go into ``mmseg.registry.MODELS``; with 0.x into
``BACKBONES``/``HEADS``. The core package never imports mmseg or mmcv: only this module does.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .model import InternViT6B as _InternViT6B
from .slide import slide_logits

try:  # MMSegmentation 1.x
    from mmengine.model import BaseModule
    from mmengine.logging import print_log
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.models.segmentors import EncoderDecoder
    from mmseg.registry import MODELS as _BACKBONES
    # mmengine's root registry: the runner looks wrappers up there (children find them too)
    from mmengine.registry import MODEL_WRAPPERS
    from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
    _HEADS = _BACKBONES
    MMSEG_1X = True
except ImportError:  # MMSegmentation 0.x
    from mmcv.runner import BaseModule
    from mmseg.models.builder import BACKBONES as _BACKBONES
    from mmseg.models.builder import HEADS as _HEADS
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    MMSEG_1X = False


@_BACKBONES.register_module(name="InternViT6B", force=True)
class InternViT6B(_InternViT6B, BaseModule):
    """internvit_fast.InternViT6B as an mmengine BaseModule (every argument, ``fast`` included).

    The state_dict keys are the plain model's, so a segmentor's keys are upstream's
    (``backbone.blocks.N...``). ``pretrained=`` loads at construction and
    ``init_cfg=dict(type='Pretrained', checkpoint=...)`` at ``init_weights()``, both
    through internvit_fast's loader (InternVL layouts, safetensors, resizing, strict keys).
    """

    def __init__(self, *args, init_cfg=None, **kwargs):
        # MRO: _InternViT6B.__init__ -> BaseModule.__init__() -> nn.Module.__init__().
        super().__init__(*args, **kwargs)
        self.init_cfg = copy.deepcopy(init_cfg)

    def init_weights(self):
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            load_checkpoint(self, cfg["checkpoint"], strict=cfg.get("strict", True))
            self._is_init = True
            return
        # No pretrained weights: the constructor already initialised every parameter
        # as upstream does; other init_cfg types go through mmengine.
        if cfg:
            super().init_weights()


@_HEADS.register_module(name="BNHead", force=True)
class BNHead(BaseDecodeHead):
    """Upstream's linear-probing head: BatchNorm over the (concatenated) features, then
    the 1x1 classifier. ``in_channels`` must equal ``channels``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.in_channels != self.channels:
            raise ValueError(f"BNHead: in_channels ({self.in_channels}) must equal channels ({self.channels})")
        norm = (self.norm_cfg or {}).get("type", "BN")
        self.bn = nn.SyncBatchNorm(self.channels) if norm == "SyncBN" else nn.BatchNorm2d(self.channels)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        if isinstance(x, (list, tuple)):
            x = torch.cat(x, dim=1)
        return self.cls_seg(self.bn(x))


if MMSEG_1X:
    @_BACKBONES.register_module(name="BatchedSlideEncoderDecoder", force=True)
    class BatchedSlideEncoderDecoder(EncoderDecoder):
        """mmseg's EncoderDecoder whose slide inference runs the windows of all images in the
        batch together, ``test_cfg.max_windows`` (default 8) per backbone call.

        Same window grid, same overlap averaging, same resizes as ``EncoderDecoder``
        (internvit_fast.slide): the predictions are mmseg's, computed in fewer, larger calls.
        """

        def slide_inference(self, inputs, batch_img_metas):
            crop, stride = tuple(self.test_cfg.crop_size), tuple(self.test_cfg.stride)
            h, w = inputs.shape[-2:]
            # As mmseg does: the head resizes its logits to the window's shape (a torch.Size:
            # that type is how mmseg's decode heads recognise slide inference).
            batch_img_metas[0]["img_shape"] = torch.Size((min(crop[0], h), min(crop[1], w)))
            return slide_logits(lambda windows: self.encode_decode(windows, batch_img_metas), inputs, crop, stride,
                                self.out_channels, self.test_cfg.get("max_windows", 8))


def layer_id(name: str, num_layers: int) -> int:
    """Upstream's layer id of a segmentor parameter (BEiT-style layer decay): the embeddings
    are layer 0, ``backbone.blocks.N`` layer N + 1, everything else (FPN, heads) the last."""
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed") or \
            name.startswith(("backbone.patch_embed", "backbone.visual_embed")):
        return 0
    if name.startswith(("backbone.blocks.", "backbone.layers.")):
        return int(name.split(".")[2]) + 1
    return num_layers - 1


if MMSEG_1X:
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


# --- more than one process --------------------------------------------------------------

def _local_device(module: nn.Module) -> Optional[list]:
    """DDP's device_ids: the local GPU, or None for a CPU module (gloo)."""
    dev = next(module.parameters()).device
    return [dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", 0))] if dev.type == "cuda" else None


if MMSEG_1X:
    from mmengine.model import MMDistributedDataParallel

    @MODEL_WRAPPERS.register_module(name="InternViTDDP", force=True)
    class InternViTDDP:
        """mmengine's MMDistributedDataParallel with device_ids right for the module's device.

        mmengine's runner passes ``device_ids=[LOCAL_RANK]`` to DDP subclasses, which DDP
        refuses for a CPU module; this builds the same wrapper with ``None`` there (gloo on
        CPU) and the local GPU otherwise. ``model_wrapper_cfg=dict(type='InternViTDDP')``.
        Buffers are not broadcast from rank 0 at every forward: ``SyncNormStatsHook`` (in the
        configs) averages the BatchNorm statistics after every iteration instead, so every
        process validates with, and every checkpoint holds, the same statistics.
        """

        def __new__(cls, module, **kwargs):
            kwargs.setdefault("broadcast_buffers", False)
            return MMDistributedDataParallel(module=module, device_ids=_local_device(module), **kwargs)

    @MODEL_WRAPPERS.register_module(name="InternViTFSDP", force=True)
    class InternViTFSDP(nn.Module):
        """Fully sharded data parallel (torch's ``fully_shard``, FSDP2) for full fine-tuning.

        Each ViT block is a unit (its weights gathered for its forward and backward only),
        then the rest of the backbone, then the root (the heads): parameters, gradients and
        AdamW state are split over the processes. With ``with_cp=True`` the blocks recompute
        their activations in the backward. ``model_wrapper_cfg=dict(type='InternViTFSDP')``;
        save with ``ShardedCheckpointHook`` (each process writes its shards and its optimizer
        state; ``--resume`` reads back each process's part, ``load_checkpoint`` reads the
        weights whole). Train through ``python -m internvit_fast.mmseg train``: mmengine's
        runner would otherwise broadcast the sharded weights after building them, which fails.

        ``fp32_master=True``: the backbone is built in fp32 (``dtype='float32'``) and its units
        compute in bf16 under FSDP2's mixed-precision policy (gradients reduced in fp32), so
        the sharded fp32 parameters are the master weights the optimizer updates.
        """

        def __init__(self, module, reshard_after_forward: bool = True, fp32_master: bool = False):
            super().__init__()
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            blocks = getattr(getattr(module, "backbone", None), "blocks", None)
            if blocks is None:
                raise ValueError("InternViTFSDP: the model has no backbone.blocks to shard")
            if fp32_master and module.backbone.dtype != torch.float32:
                raise ValueError("InternViTFSDP(fp32_master=True) needs the backbone built in fp32 "
                                 f"(backbone dtype='float32'), got {module.backbone.dtype}")
            # Weights (pretrained ones included) are set on the whole tensors, before sharding:
            # every process builds the same model (mmengine seeds them alike), then keeps its
            # shards. Later init_weights calls (the runner's) must not touch sharded tensors.
            if hasattr(module, "init_weights"):
                module.init_weights()
                module.init_weights = lambda: None
            self.initialised = True
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if fp32_master \
                else MixedPrecisionPolicy()
            # One unit per block, then the rest of the backbone, then the root: the heads
            # (fp32; FSDP wants one dtype per unit). The heads cannot be units of their own:
            # mmseg calls their forward() directly, past the hooks that gather a unit's weights.
            for unit in list(blocks) + [module.backbone]:
                fully_shard(unit, reshard_after_forward=reshard_after_forward, mp_policy=policy)
            fully_shard(module, reshard_after_forward=reshard_after_forward)
            self.module = module

        def train_step(self, data, optim_wrapper):
            return self.module.train_step(data, optim_wrapper)

        def val_step(self, data):
            return self.module.val_step(data)

        def test_step(self, data):
            return self.module.test_step(data)

    # The run's plumbing (checkpoints, hooks, the fp32-master optimizer wrapper, the CLI)
    # registers itself in mmengine's registries when imported.
    from . import mmseg_runner  # noqa: E402,F401


def main(argv=None) -> int:
    from .mmseg_runner import main as run_main
    return run_main(argv)


if __name__ == "__main__":
    import logging
    import sys
    code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # Under torchrun: everything is done and written, and the process group is gone, yet
        # the interpreter's teardown now and then destroys a C++ thread of torch.distributed
        # that is still joinable ("terminate called without an active exception", SIGABRT),
        # which fails the whole run. Flush and leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code or 0)
    sys.exit(code)
