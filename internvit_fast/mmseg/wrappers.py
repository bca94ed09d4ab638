"""More than one process: ``InternViTDDP`` and ``InternViTFSDP`` (model wrappers) and
``SyncNormStatsHook`` (BatchNorm statistics the same on every process)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.model import MMDistributedDataParallel
# mmengine's root registry: the runner looks wrappers up there (children find them too)
from mmengine.registry import HOOKS, MODEL_WRAPPERS
from torch import nn


def _local_device(module: nn.Module) -> Optional[list]:
    """DDP's device_ids: the local GPU, or None for a CPU module (gloo)."""
    dev = next(module.parameters()).device
    return [dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", 0))] if dev.type == "cuda" else None


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


@HOOKS.register_module(name="SyncNormStatsHook", force=True)
class SyncNormStatsHook(Hook):
    """BatchNorm running statistics averaged over the processes after every training iteration.

    Plain BatchNorm (a CPU run, or a config without SyncBN) updates its running statistics
    from each process's own images, so the processes would validate with different ones and
    the checkpoint would hold rank 0's. Averaging them every iteration (a few KB) keeps every
    process, the validation, the test and the checkpoint on the same statistics. SyncBN's are
    already the same everywhere and are left alone."""
    priority = "ABOVE_NORMAL"  # before the checkpoint hook saves the iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        stats = [t for m in runner.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                 for t in (m.running_mean, m.running_var) if t is not None]
        if not stats:
            return
        flat = torch.cat([t.detach().float().reshape(-1) for t in stats])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        with torch.no_grad():
            for t, part in zip(stats, flat.split([t.numel() for t in stats])):
                t.copy_(part.view_as(t))
