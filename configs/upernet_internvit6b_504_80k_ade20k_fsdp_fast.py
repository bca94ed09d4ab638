# Full fine-tuning sharded over the GPUs with FSDP (torch's fully_shard): parameters, gradients
# and AdamW state split over the processes, each ViT block gathered only for its forward and
# backward, activations recomputed (with_cp). Launch:
#   torchrun --nproc_per_node 8 -m internvit_fast.mmseg train configs/upernet_internvit6b_504_80k_ade20k_fsdp_fast.py
# Checkpoints are sharded folders (iter_N/), which internvit_fast.load_checkpoint reads whole.
_base_ = ['./upernet_internvit6b_504_80k_ade20k_fast.py']
model_wrapper_cfg = dict(type='InternViTFSDP')
default_hooks = dict(checkpoint=None)
custom_hooks = [dict(type='ShardedCheckpointHook', interval=1000)]
