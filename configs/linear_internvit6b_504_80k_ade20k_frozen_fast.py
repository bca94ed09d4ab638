# Linear probing: upstream's linear_probing/linear_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5_frozen.py
# (ADE20K mIoU 47.2 upstream). Features after block 44 (no FPN), the ViT frozen, a BatchNorm +
# 1x1 classifier (upstream's FCNHead with num_convs=0 and with_norm: BNHead here), no weight
# decay, no layer decay.
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
optim_wrapper = dict(optimizer=dict(weight_decay=0.0))
