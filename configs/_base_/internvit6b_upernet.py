# InternViT-6B + UPerNet, the upstream ADE20K segmentation model restated for
# MMSegmentation 1.x, on internvit-fast. Shared by the configs in this folder.
custom_imports = dict(imports=['internvit_fast.mmseg'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(504, 504))
model = dict(
    # mmseg's EncoderDecoder with the sliding windows of a batch run together (max_windows).
    type='BatchedSlideEncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='InternViT6B',
        fast=True,  # the fused Triton kernels wherever no gradient flows through the ViT
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
        # Weights: pretrained='path/to/intern_vit_6b_224px.pth' here, or
        # init_cfg=dict(type='Pretrained', checkpoint=...); both use internvit_fast's loader.
        pretrained=None),
    decode_head=dict(
        type='UPerHead',
        in_channels=[3200, 3200, 3200, 3200],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=3200,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(504, 504), stride=(341, 341), max_windows=8))
