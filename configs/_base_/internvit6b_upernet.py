# InternViT-6B + UPerNet on ADE20K at 504x504: upstream's full-tuning recipe
# (OpenGVLab/InternVL segmentation/configs/intern_vit_6b/full_tuning/
# upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5.py) restated for MMSegmentation 1.x,
# on internvit-fast. The configs in this folder start from it.
# mmseg's schedule_80k.py is not inherited: everything it sets is restated below, and its
# SGD `optimizer` would stay in the dumped config beside the AdamW that runs.
_base_ = [
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
]
custom_imports = dict(imports=['internvit_fast.mmseg'], allow_failed_imports=False)

crop_size = (504, 504)
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    # mmseg's EncoderDecoder with the sliding windows of a batch run together (max_windows).
    type='BatchedSlideEncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='InternViT6B',
        fast=True,  # the fused Triton kernels wherever no gradient flows through the ViT
        # bf16, as upstream's ToBFloat16Hook arranges (the heads stay fp32: mmseg builds them so)
        dtype='bfloat16',
        img_size=504,
        patch_size=14,
        pretrain_size=224,
        embed_dim=3200,
        depth=48,
        num_heads=25,
        mlp_ratio=4,
        qkv_bias=False,
        qk_normalization=True,
        init_values=0.1,
        drop_path_rate=0.4,
        layerscale_force_fp32=False,
        use_flash_attn=True,
        with_cp=True,
        out_indices=[11, 23, 35, 47],
        with_fpn=True,
        freeze_vit=False,
        # Weights: pretrained='path/to/intern_vit_6b_224px.pth' here (upstream's), or
        # init_cfg=dict(type='Pretrained', checkpoint=...); both use internvit_fast's loader.
        pretrained=None),
    decode_head=dict(
        type='UPerHead',
        in_channels=[3200, 3200, 3200, 3200],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=1536,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=3200,
        in_index=2,
        channels=1536,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(322, 322), max_windows=8))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(2016, 504), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
# Upstream: SETR_Resize to a short side of 504 (keep ratio), then sides to multiples of 14.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2016, 504), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=14),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
# 8 GPUs x 2 images = 16 per iteration, as upstream trains.
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Plain OptimWrapper (no AMP): upstream trains the bf16 backbone with fp32 heads directly.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='InternViTLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=48, layer_decay_rate=0.95))
# mmcv's poly schedule with a linear warm-up over its first 1500 iterations: both from 0,
# multiplied (mmengine chains schedulers that overlap).
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=0, end=80000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=80000, val_interval=1000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1000, max_keep_ckpts=2, save_best='mIoU'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
# BatchNorm statistics averaged over the processes after every iteration, so validation, test
# and the saved checkpoint agree (SyncBN's are the same everywhere already; see internvit_fast/mmseg/wrappers.py).
custom_hooks = [dict(type='SyncNormStatsHook')]
