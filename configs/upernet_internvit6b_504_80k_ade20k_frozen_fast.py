# Head tuning: upstream's head_tuning/upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5_frozen.py
# (ADE20K mIoU 54.9 upstream). The ViT frozen (the FPN and the heads train), no drop path, no
# layer decay, the auxiliary head on the second level. Nothing needs a gradient through the ViT,
# so its forward runs the Triton kernels in training too.
_base_ = ['./upernet_internvit6b_504_80k_ade20k_fast.py']
model = dict(
    backbone=dict(freeze_vit=True, drop_path_rate=0.0),
    auxiliary_head=dict(in_index=1))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=48, layer_decay_rate=1.0))
