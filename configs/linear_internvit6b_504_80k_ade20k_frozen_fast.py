# Linear probing: features after block 44 (no FPN), a BatchNorm + 1x1 classifier
# (upstream's BNHead, registered by internvit_fast.mmseg), the ViT frozen.
_base_ = ['./upernet_internvit6b_504_80k_ade20k_frozen_fast.py']
model = dict(
    backbone=dict(out_indices=[44], with_fpn=False),
    decode_head=dict(
        _delete_=True,
        type='BNHead',
        in_channels=3200,
        in_index=0,
        channels=3200,
        dropout_ratio=0.0,
        num_classes=150,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=None)
