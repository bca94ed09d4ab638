# Head tuning: the same UPerNet model with the ViT frozen (the FPN and the heads train).
# Nothing needs a gradient through the ViT, so its forward runs the Triton kernels in
# training too.
_base_ = ['./upernet_internvit6b_504_80k_ade20k_fast.py']
model = dict(backbone=dict(freeze_vit=True, drop_path_rate=0.0, with_cp=False))
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=4e-5, betas=(0.9, 0.999), weight_decay=0.05))
