# Full fine-tuning: upstream's full_tuning/upernet_intern_vit_6b_504_80k_ade20k_bs16_lr4e-5.py
# (ADE20K mIoU 58.9 upstream). drop_path 0.4, layer-wise lr decay 0.95, AdamW lr 4e-5 wd 0.05,
# poly with 1500 warm-up iterations, 80k iterations, 8 GPUs x 2 images. The ViT trains through the
# kernels (forward and backward, drop path included) and validates through the inference kernels.
# The 6B backbone with AdamW does not fit plain DDP on an 80 GB card: see the _fsdp config.
_base_ = ['./_base_/internvit6b_upernet.py']
