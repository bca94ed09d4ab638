"""Training as upstream does it, on MMSegmentation 1.x: layer-wise lr decay, the recipes, more
than one process (DDP and FSDP on CPU with gloo), sharded checkpoints, the train/test entry."""
import json
import os
import subprocess
import sys

import pytest
import torch

if not os.environ.get("CI"):
    pytest.importorskip("mmseg", reason="mmsegmentation not installed (pip install -e '.[mmseg]', see README)")

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

from test_mmseg import CONFIGS, ROOT, _sample, shrunk  # noqa: E402

register_all_modules()
FULL, FSDP, HEAD, LINEAR = (os.path.join(ROOT, "configs", n) for n in (
    "upernet_internvit6b_504_80k_ade20k_fast.py", "upernet_internvit6b_504_80k_ade20k_fsdp_fast.py",
    "upernet_internvit6b_504_80k_ade20k_frozen_fast.py", "linear_internvit6b_504_80k_ade20k_frozen_fast.py"))


# --- layer-wise lr decay ------------------------------------------------------------------

def _groups(path, **paramwise):
    cfg = shrunk(path)
    model = MODELS.build(cfg.model)
    ow = dict(cfg.optim_wrapper)
    ow["paramwise_cfg"] = dict(ow["paramwise_cfg"], num_layers=4, **paramwise)  # the shrunk depth
    optim = build_optim_wrapper(model, Config(dict(optim_wrapper=ow)).optim_wrapper).optimizer
    return {n: g for g in optim.param_groups for n in g["param_names"]}


def test_layer_decay_scales_and_weight_decay_as_upstream():
    by_name = _groups(FULL)
    base, wd, rate, layers = 4e-5, 0.05, 0.95, 4 + 2
    want = {  # name: (layer id, weight decay)
        "backbone.cls_token": (0, wd),  # upstream's no-decay test misses prefixed names: decayed
        "backbone.pos_embed": (0, wd),
        "backbone.patch_embed.proj.weight": (0, wd),
        "backbone.patch_embed.proj.bias": (0, 0.0),
        "backbone.blocks.0.attn.qkv.weight": (1, wd),
        "backbone.blocks.0.norm1.weight": (1, 0.0),
        "backbone.blocks.2.ls1.gamma": (3, 0.0),
        "backbone.blocks.3.mlp.fc2.weight": (4, wd),
        "backbone.blocks.3.mlp.fc2.bias": (4, 0.0),
        "backbone.up1.0.weight": (5, wd),
        "decode_head.conv_seg.weight": (5, wd),
        "auxiliary_head.conv_seg.bias": (5, 0.0),
    }
    for name, (lid, decay) in want.items():
        g = by_name[name]
        assert g["lr"] == pytest.approx(base * rate ** (layers - 1 - lid), rel=1e-12), name
        assert g["weight_decay"] == decay, name
    assert by_name["backbone.cls_token"]["lr"] == pytest.approx(4e-5 * 0.95 ** 5)
    fixed = _groups(FULL, embed_no_decay=True)
    assert fixed["backbone.pos_embed"]["weight_decay"] == 0.0 and fixed["backbone.cls_token"]["weight_decay"] == 0.0


def test_frozen_recipes_optimise_only_what_trains():
    head = _groups(HEAD)
    assert not any(n.startswith("backbone.blocks.") for n in head)
    assert {g["lr"] for g in head.values()} == {4e-5}  # layer decay 1.0
    linear = _groups(LINEAR)
    assert set(n.split(".")[0] for n in linear) == {"decode_head"}
    assert {g["weight_decay"] for g in linear.values()} == {0.0}


# --- the recipes: upstream's values, as its configs state them ------------------------------

# From OpenGVLab/InternVL segmentation/configs/intern_vit_6b/{full_tuning,head_tuning,
# linear_probing}/*_504_80k_ade20k_bs16_lr4e-5*.py and their _base_ (upernet_r50.py,
# ade20k_504x504.py, schedule_80k.py), read at commit 2410d1d.
UPSTREAM = {
    "common": {
        "model.backbone.img_size": 504, "model.backbone.patch_size": 14, "model.backbone.pretrain_size": 224,
        "model.backbone.embed_dim": 3200, "model.backbone.depth": 48, "model.backbone.num_heads": 25,
        "model.backbone.mlp_ratio": 4, "model.backbone.qkv_bias": False, "model.backbone.init_values": 0.1,
        "model.backbone.qk_normalization": True, "model.backbone.with_cp": True,
        "model.backbone.layerscale_force_fp32": False, "model.test_cfg.mode": "slide",
        "model.test_cfg.crop_size": (504, 504), "model.test_cfg.stride": (322, 322),
        "optim_wrapper.optimizer.type": "AdamW", "optim_wrapper.optimizer.lr": 4e-5,
        "optim_wrapper.optimizer.betas": (0.9, 0.999), "optim_wrapper.paramwise_cfg.num_layers": 48,
        "train_cfg.max_iters": 80000, "train_dataloader.batch_size": 2,
        "model.data_preprocessor.mean": [123.675, 116.28, 103.53],
        "model.data_preprocessor.std": [58.395, 57.12, 57.375], "model.data_preprocessor.bgr_to_rgb": True,
        "param_scheduler.0.end": 1500, "param_scheduler.0.start_factor": 1e-6, "param_scheduler.1.power": 1.0,
        "param_scheduler.1.eta_min": 0.0,
        "train_dataloader.dataset.pipeline.2.scale": (2016, 504),
        "train_dataloader.dataset.pipeline.2.ratio_range": (0.5, 2.0),
        "train_dataloader.dataset.pipeline.3.crop_size": (504, 504),
        "train_dataloader.dataset.pipeline.3.cat_max_ratio": 0.75,
        "test_dataloader.dataset.pipeline.1.scale": (2016, 504),
        "test_dataloader.dataset.pipeline.2.size_divisor": 14,
        "model.backbone.dtype": "bfloat16", "optim_wrapper.type": "OptimWrapper",
    },
    FULL: {"model.backbone.drop_path_rate": 0.4, "model.backbone.freeze_vit": False,
           "model.backbone.with_fpn": True, "model.backbone.out_indices": [11, 23, 35, 47],
           "optim_wrapper.paramwise_cfg.layer_decay_rate": 0.95, "optim_wrapper.optimizer.weight_decay": 0.05,
           "model.decode_head.type": "UPerHead", "model.decode_head.channels": 1536,
           "model.decode_head.pool_scales": (1, 2, 3, 6), "model.decode_head.dropout_ratio": 0.1,
           "model.auxiliary_head.type": "FCNHead", "model.auxiliary_head.channels": 1536,
           "model.auxiliary_head.in_index": 2, "model.auxiliary_head.loss_decode.loss_weight": 0.4},
    HEAD: {"model.backbone.drop_path_rate": 0.0, "model.backbone.freeze_vit": True,
           "model.backbone.with_fpn": True, "optim_wrapper.paramwise_cfg.layer_decay_rate": 1.0,
           "optim_wrapper.optimizer.weight_decay": 0.05, "model.decode_head.channels": 1536,
           "model.auxiliary_head.channels": 1536, "model.auxiliary_head.in_index": 1},
    LINEAR: {"model.backbone.drop_path_rate": 0.0, "model.backbone.freeze_vit": True,
             "model.backbone.with_fpn": False, "model.backbone.out_indices": [44],
             "optim_wrapper.paramwise_cfg.layer_decay_rate": 1.0, "optim_wrapper.optimizer.weight_decay": 0.0,
             "model.decode_head.channels": 3200, "model.decode_head.in_channels": 3200,
             "model.decode_head.dropout_ratio": 0.0, "model.auxiliary_head": None},
}
UPSTREAM[FSDP] = dict(UPSTREAM[FULL])


def _get(cfg, dotted):
    v = cfg
    for part in dotted.split("."):
        v = v[int(part)] if isinstance(v, (list, tuple)) else v.get(part)
    return v


@pytest.mark.parametrize("path", [FULL, FSDP, HEAD, LINEAR], ids=os.path.basename)
def test_recipe_matches_upstreams(path):
    cfg = Config.fromfile(path)
    want = dict(UPSTREAM["common"], **UPSTREAM[path])
    for key, value in want.items():
        got = _get(cfg, key)
        got = tuple(got) if isinstance(value, tuple) and got is not None else got
        assert got == value, f"{key}: {got!r} != upstream's {value!r}"
    assert cfg.model.type == "BatchedSlideEncoderDecoder" and cfg.model.backbone.fast is True
    model = MODELS.build(shrunk(path).model)
    assert model.backbone.dtype == torch.bfloat16  # the bf16 backbone, fp32 heads of upstream's hook
    assert next(model.decode_head.parameters()).dtype == torch.float32


# --- more than one process: DDP and FSDP on CPU with gloo ---------------------------------------

def _data(n_images, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [dict(inputs=[torch.randint(0, 256, (3, 56, 56), generator=g, dtype=torch.uint8)],
                 data_samples=[_sample(56, 56)]) for _ in range(n_images)]


def _train_cfg(path=FULL):
    """The shrunk recipe in fp32, without randomness (dropout, drop path) and without batch
    statistics (GN for SyncBN: SyncBN needs CUDA, and BN couples the images of a batch)."""
    cfg = shrunk(path, dtype="float32", fast=False, drop_path_rate=0.0, with_cp=True)
    for head in (cfg.model.decode_head, cfg.model.get("auxiliary_head")):
        if head:
            head.dropout_ratio = 0.0
            head.norm_cfg = dict(type="GN", num_groups=4, requires_grad=True)
    return cfg


def _worker(rank, world, wrapper, init_file, out_dir):
    import torch.distributed as dist
    from mmengine.optim import OptimWrapper
    register_all_modules()
    import internvit_fast.mmseg  # noqa: F401 (registers the wrappers)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights in every process (FSDP does not broadcast)
    model = MODELS.build(_train_cfg().model)
    model.init_weights()  # as mmengine's runner does (the heads' own initialisation)
    from mmseg.registry import MODEL_WRAPPERS
    wrapped = MODEL_WRAPPERS.build(dict(type=wrapper), default_args=dict(module=model))
    module = wrapped.module
    optim = OptimWrapper(torch.optim.SGD(module.parameters(), lr=1.0))
    batch = _data(world)[rank]  # each process one of the images
    wrapped.train_step(batch, optim)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if wrapper == "InternViTFSDP":
        from internvit_fast.mmseg import save_sharded_checkpoint
        save_sharded_checkpoint(wrapped, os.path.join(out_dir, "sharded"))
    else:  # evaluation through the wrapper: each process predicts its image
        module.eval()
        pred = wrapped.test_step(dict(inputs=batch["inputs"], data_samples=[_sample(56, 56, labels=False)]))[0]
        torch.save(pred.seg_logits.data, os.path.join(out_dir, f"pred{rank}.pt"))
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "after.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _single_process_step():
    from mmengine.optim import OptimWrapper
    torch.manual_seed(0)
    model = MODELS.build(_train_cfg().model)
    model.init_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=1.0))
    both = _data(2)
    data = dict(inputs=[d["inputs"][0] for d in both], data_samples=[d["data_samples"][0] for d in both])
    model.train_step(data, optim)
    return model, before, both


@pytest.mark.parametrize("wrapper", ["InternViTDDP", "InternViTFSDP"])
def test_two_processes_give_the_single_process_gradients(tmp_path, wrapper):
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(2, wrapper, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, before, both = _single_process_step()
    after = torch.load(tmp_path / "after.pt", weights_only=True)
    moved = 0
    for k, v in model.state_dict().items():
        if k not in after or not v.is_floating_point():
            continue
        # SGD with lr 1: the update is the gradient; the two runs must agree on it
        torch.testing.assert_close(after[k], v, rtol=1e-4, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, before[k]))
    assert moved > 50, "the step changed too few parameters to compare"
    if wrapper == "InternViTFSDP":
        from internvit_fast import InternViT6B, load_checkpoint
        fresh = InternViT6B(**{k: v for k, v in _train_cfg().model.backbone.items() if k != "type"})
        load_checkpoint(fresh, str(tmp_path / "sharded"))  # the sharded folder, read whole
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, model.backbone.state_dict()[k].to(v.dtype)) or torch.allclose(
                v, model.backbone.state_dict()[k], rtol=1e-4, atol=1e-6), k
    else:
        model.eval()
        with torch.no_grad():
            for rank in range(2):
                want = model.test_step(dict(inputs=both[rank]["inputs"],
                                            data_samples=[_sample(56, 56, labels=False)]))[0]
                got = torch.load(tmp_path / f"pred{rank}.pt", weights_only=True)
                torch.testing.assert_close(got, want.seg_logits.data, rtol=1e-4, atol=1e-5)


# --- python -m internvit_fast.mmseg train / test ---------------------------------------------

# A shrunk recipe on a two-image dataset: 2 iterations, then validation.
TINY = """
_base_ = [{base!r}]
model = dict(
    backbone=dict(embed_dim=96, num_heads=3, depth=4, img_size=56, pretrain_size=56, out_indices=[0, 1, 2, 3],
                  drop_path_rate=0.1, fast=True),
    data_preprocessor=dict(size=(56, 56)),
    decode_head=dict(in_channels=[96, 96, 96, 96], channels=16, norm_cfg=dict(type='BN', requires_grad=True)),
    auxiliary_head=dict(in_channels=96, channels=16, norm_cfg=dict(type='BN', requires_grad=True)),
    test_cfg=dict(crop_size=(56, 56), stride=(42, 42), max_windows=3))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=4))
crop_size = (56, 56)
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(224, 56), ratio_range=(1.0, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size), dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=(224, 56), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=14), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root={data!r}, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root={data!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
{hooks}
"""
HOOKS = {"plain": "default_hooks = dict(checkpoint=dict(interval=2, save_best=None), logger=dict(interval=1))",
         "sharded": "default_hooks = dict(logger=dict(interval=1))\n"
                    "custom_hooks = [dict(type='ShardedCheckpointHook', interval=2)]"}


def _tiny_dataset(root):
    from PIL import Image
    g = torch.Generator().manual_seed(3)
    for split in ("training", "validation"):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "annotations" / split)
        for i in range(2):
            img = torch.randint(0, 256, (70, 84, 3), generator=g, dtype=torch.uint8).numpy()
            seg = torch.randint(0, 6, (70, 84), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(img).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(seg).save(root / "annotations" / split / f"{i}.png")


def test_train_and_test_entry_points(tmp_path):
    data = tmp_path / "ade"
    _tiny_dataset(data)
    cfg_path = tmp_path / "tiny.py"
    cfg_path.write_text(TINY.format(base=FULL, data=str(data), hooks=HOOKS["plain"]))
    env = dict(os.environ, TRITON_INTERPRET="1")
    work = tmp_path / "work"
    p = subprocess.run([sys.executable, "-m", "internvit_fast.mmseg", "train", str(cfg_path), "--work-dir",
                        str(work), "--cfg-options", "randomness.seed=0"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (work / "iter_2.pth").exists() and "mIoU" in p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-m", "internvit_fast.mmseg", "test", str(cfg_path), str(work / "iter_2.pth"),
                        "--work-dir", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "mIoU" in p.stdout + p.stderr
    bad = subprocess.run([sys.executable, "-m", "internvit_fast.mmseg", "test", str(cfg_path), "/nonexistent.pth"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_torchrun_trains_with_two_processes_through_mmengines_runner(tmp_path, wrapper):
    data = tmp_path / "ade"
    _tiny_dataset(data)
    cfg_path = tmp_path / "tiny.py"
    cfg_path.write_text(TINY.format(base=FULL if wrapper == "ddp" else FSDP, data=str(data),
                                    hooks=HOOKS["plain" if wrapper == "ddp" else "sharded"]))
    work = tmp_path / "work"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), "-m", "internvit_fast.mmseg", "train", str(cfg_path),
                        "--work-dir", str(work)], cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1",
                                                                     OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=900)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "mIoU" in log
    if wrapper == "fsdp":
        assert (work / "iter_2" / ".metadata").exists()
        from internvit_fast import InternViT6B, load_checkpoint
        fresh = InternViT6B(embed_dim=96, num_heads=3, depth=4, img_size=56, pretrain_size=56,
                            out_indices=[0, 1, 2, 3], with_fpn=True)
        load_checkpoint(fresh, str(work / "iter_2"))
    else:
        assert (work / "iter_2.pth").exists()


def test_all_configs_are_listed():
    assert set(CONFIGS) == {FULL, FSDP, HEAD, LINEAR}
    json.dumps(UPSTREAM, default=str)  # the table is plain data
