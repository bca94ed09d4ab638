"""MMSegmentation adapter. ``custom_imports=dict(imports=['internvit_fast.mmseg'])`` in a config
registers, in mmseg's and mmengine's registries:

- the model classes (backbone.py): ``InternViT6B``, upstream's linear-probe ``BNHead``,
  ``BatchedSlideEncoderDecoder`` (mmseg's EncoderDecoder with its sliding windows batched);
- optimisation (optim.py): upstream's layer-wise lr decay
  (``InternViTLayerDecayOptimizerConstructor``), ``FP32MasterOptimWrapper`` (opt-in);
- more than one process (wrappers.py): ``InternViTDDP``, ``InternViTFSDP``, ``SyncNormStatsHook``;
- safe checkpoint reading for the runner (loading.py: every local path it reads goes through
  this package's safe loader) and ``load_segmentor_weights``;
- sharded training checkpoints (sharded.py): ``ShardedCheckpointHook``, ``resume_sharded``;
- the command line (cli.py)::

    python -m internvit_fast.mmseg train CONFIG [--resume [PATH]] [--load-from PATH] [--crop-size N]
                                                [--fp32-master] [--work-dir DIR] [--cfg-options k=v ...]
    python -m internvit_fast.mmseg test CONFIG CHECKPOINT [--crop-size N] [--work-dir DIR] [--cfg-options ...]
    torchrun --nproc_per_node 8 -m internvit_fast.mmseg train CONFIG     (DDP, or FSDP by config)

In a config::

    custom_imports = dict(imports=['internvit_fast.mmseg'], allow_failed_imports=False)
    model = dict(type='BatchedSlideEncoderDecoder', backbone=dict(type='InternViT6B', fast=True, ...),
                 test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(322, 322), max_windows=8), ...)

With MMSegmentation 0.x only the model classes register (into ``BACKBONES``/``HEADS``). The
core package never imports mmseg or mmcv: only this one does.
"""
from .backbone import MMSEG_1X, BNHead, InternViT6B

__all__ = ["BNHead", "InternViT6B", "MMSEG_1X"]

if MMSEG_1X:
    from .backbone import BatchedSlideEncoderDecoder
    from .cli import main, revert_sync_bn, set_crop_size
    from .loading import load_segmentor_weights, mmengine_state_types, read_runner_file, segmentor_state
    from .optim import FP32MasterOptimWrapper, InternViTLayerDecayOptimizerConstructor, layer_id
    from .sharded import ShardedCheckpointHook, resume_sharded
    from .wrappers import InternViTDDP, InternViTFSDP, SyncNormStatsHook

    __all__ += ["BatchedSlideEncoderDecoder", "FP32MasterOptimWrapper", "InternViTDDP", "InternViTFSDP",
                "InternViTLayerDecayOptimizerConstructor", "ShardedCheckpointHook", "SyncNormStatsHook",
                "layer_id", "load_segmentor_weights", "main", "mmengine_state_types", "read_runner_file",
                "resume_sharded", "revert_sync_bn", "segmentor_state", "set_crop_size"]
