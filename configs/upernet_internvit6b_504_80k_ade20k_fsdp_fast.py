# Full fine-tuning sharded over the GPUs with FSDP (torch's fully_shard): parameters, gradients
# and AdamW state split over the processes, each ViT block gathered only for its forward and
# backward, activations recomputed (with_cp). Launch:
#   torchrun --nproc_per_node 8 -m internvit_fast.mmseg train configs/upernet_internvit6b_504_80k_ade20k_fsdp_fast.py
# Checkpoints are sharded folders (iter_N/: weights, optimizer state, training state) that
# `--resume` continues from and internvit_fast.load_checkpoint reads whole (the weights).
# `--fp32-master` keeps the sharded weights in fp32 and computes in bf16 (FSDP2's policy).
_base_ = ['./upernet_internvit6b_504_80k_ade20k_fast.py']
model_wrapper_cfg = dict(type='InternViTFSDP')
default_hooks = dict(checkpoint=None)
custom_hooks = [dict(type='SyncNormStatsHook'),
                dict(type='ShardedCheckpointHook', interval=1000, max_keep_ckpts=2, save_best='mIoU')]
