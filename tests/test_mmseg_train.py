"""Training as upstream does it, on MMSegmentation 1.x: layer-wise lr decay, the recipes, more
than one process (DDP and FSDP on CPU with gloo), sharded checkpoints, the train/test entry."""
import glob
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.mmseg

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
    ow["paramwise_cfg"] = dict(ow["paramwise_cfg"], **dict(dict(num_layers=4), **paramwise))  # the shrunk depth
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
        from internvit_fast.checkpoint import dcp
        dcp.save(os.path.join(out_dir, "sharded"),
                 {f"model.{k}": v for k, v in get_model_state_dict(module).items()}, {})
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


@pytest.mark.slow
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
    decode_head=dict(in_channels=[96, 96, 96, 96], channels=16{norm}),
    auxiliary_head=dict(in_channels=96, channels=16{norm}),
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
BN = ", norm_cfg=dict(type='BN', requires_grad=True)"  # the heads' norm in TINY (SyncBN: the recipe's own)
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


@pytest.mark.slow
def test_train_and_test_entry_points(tmp_path):
    data = tmp_path / "ade"
    _tiny_dataset(data)
    cfg_path = tmp_path / "tiny.py"
    cfg_path.write_text(TINY.format(base=FULL, data=str(data), hooks=HOOKS["plain"], norm=BN))
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
    loaded = re.findall(r"loaded (\d+) tensors into the segmentor", p.stdout + p.stderr)
    # the same checkpoint (bf16) tested with the backbone in FP8: quantized as it loads
    p = subprocess.run([sys.executable, "-m", "internvit_fast.mmseg", "test", str(cfg_path), str(work / "iter_2.pth"),
                        "--work-dir", str(work), "--precision", "fp8"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "mIoU" in p.stdout + p.stderr
    loaded8 = re.findall(r"loaded (\d+) tensors into the segmentor", p.stdout + p.stderr)
    depth = 4  # (TINY's backbone) one weight_scale more for each of a block's four linear layers
    assert loaded and loaded8 and int(loaded8[0]) == int(loaded[0]) + 4 * depth, (loaded, loaded8)
    bad = subprocess.run([sys.executable, "-m", "internvit_fast.mmseg", "test", str(cfg_path), "/nonexistent.pth"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert bad.returncode == 2 and "checkpoint /nonexistent.pth: no such file or folder" in bad.stderr


def _free_port():
    """A port nothing listens on now: a fixed or hashed one collides with a run still in TIME_WAIT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, work_env=None, torchrun=False, timeout=900):
    """python -m internvit_fast.mmseg ARGS (under torchrun with two processes when asked)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port())] if torchrun else [sys.executable]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", **(work_env or {}))
    p = subprocess.run(head + ["-m", "internvit_fast.mmseg", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


# Deterministic runs to compare: no dropout, no drop path, a fixed seed, a short warm-up.
EXACT = ["randomness.seed=0", "model.backbone.drop_path_rate=0.0", "model.decode_head.dropout_ratio=0.0",
         "model.auxiliary_head.dropout_ratio=0.0", "param_scheduler.0.end=4"]

BN_DUMP = """
import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class BNDumpHook(Hook):
    priority = 'LOWEST'

    def after_train(self, runner):
        module = getattr(runner.model, 'module', runner.model)
        stats = {n: b.clone() for n, b in module.named_buffers() if 'running_' in n}
        torch.save(stats, f'{runner.work_dir}/bn_rank{dist.get_rank()}.pt')
"""


# What a resumed run must have restored, dumped before every training iteration: every param
# group's hyperparameters (the optimizer wrapper's base_param_settings included: the logged
# base_lr), the schedulers, the message hub's information and lr history, the seed.
STATE_DUMP = """
import json
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

# where the run writes and how long it takes: the two runs differ there by design
RUN_SPECIFIC = ('cfg', 'eta', 'time', 'data_time', 'experiment_name', 'last_ckpt', 'sharded_keep_iters',
                'sharded_best_folder')


def plain(v):
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items() if k not in ('params', 'param_names')}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


@HOOKS.register_module(force=True)
class StateDumpHook(Hook):
    priority = 'LOWEST'

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        w, hub, scheds = runner.optim_wrapper, runner.message_hub, runner.param_schedulers
        state = dict(
            iter=runner.iter, epoch=runner.epoch, seed=runner.seed,
            param_groups=plain(w.param_groups), base_param_settings=plain(getattr(w, 'base_param_settings', None)),
            lr=plain(w.get_lr()), schedulers=plain([s.state_dict() for s in (scheds or [])]),
            runtime_info=plain({k: v for k, v in hub.runtime_info.items()
                                if k not in RUN_SPECIFIC}),
            lr_history=plain({k: b.data[0].tolist() for k, b in hub.log_scalars.items() if k.endswith('lr')}))
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(f'{runner.work_dir}/state_iter{runner.iter}_rank{rank}.json', 'w') as f:
            json.dump(state, f, indent=1, sort_keys=True)
"""


def _dumped(work, iteration: int, ranks: int = 1) -> list:
    return [json.loads((work / f"state_iter{iteration}_rank{r}.json").read_text()) for r in range(ranks)]


def _same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        if isinstance(want[key], dict):
            for sub in set(want[key]) | set(got[key]):
                assert got[key].get(sub) == want[key].get(sub), (key, sub, got[key].get(sub), want[key].get(sub))
        else:
            assert got[key] == want[key], (key, got[key], want[key])


@pytest.mark.slow
def test_torchrun_with_the_recipes_syncbn_on_cpu_keeps_one_set_of_norm_statistics(tmp_path):
    """The shipped recipe's heads (SyncBN) under torchrun without CUDA: reverted to BatchNorm with
    a log line; after training every process holds the same running statistics, and the
    checkpoint holds those (each process trained on its own images)."""
    data = tmp_path / "ade"
    _tiny_dataset(data)
    (tmp_path / "bn_dump.py").write_text(BN_DUMP)
    hooks = HOOKS["plain"] + "\ncustom_imports = dict(imports=['internvit_fast.mmseg', 'bn_dump'])\n" \
        "custom_hooks = [dict(type='SyncNormStatsHook'), dict(type='BNDumpHook')]"
    cfg_path = tmp_path / "tiny.py"
    cfg_path.write_text(TINY.format(base=FULL, data=str(data), hooks=hooks, norm=""))
    work = tmp_path / "work"
    rc, log = _run(["train", cfg_path, "--work-dir", work, "--cfg-options", "model.backbone.fast=False"],
                   {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}, torchrun=True)
    assert rc == 0, log[-4000:]
    assert "SyncBN norm layers reverted to BatchNorm" in log
    ranks = [torch.load(work / f"bn_rank{r}.pt", weights_only=True) for r in range(2)]
    from internvit_fast.mmseg import read_runner_file
    saved = read_runner_file(str(work / "iter_2.pth"))["state_dict"]
    assert ranks[0] and set(ranks[0]) == set(ranks[1])
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name}: the processes ended with different statistics"
        assert torch.equal(value, saved[name]), f"{name}: the checkpoint holds other statistics"


@pytest.mark.slow
def test_fsdp_run_keeps_its_checkpoints_resumes_exactly_and_tests(tmp_path):
    """torchrun, FSDP: iter_N folders named after N iterations, the last two kept, the best
    kept apart, last_checkpoint, no temporary folder left; --resume from one continues to the
    same weights and optimizer state as the uninterrupted run; test under torchrun."""
    data = tmp_path / "ade"
    _tiny_dataset(data)
    cfg_path = tmp_path / "tiny.py"
    (tmp_path / "state_dump.py").write_text(STATE_DUMP)
    hooks = ("default_hooks = dict(logger=dict(interval=1))\n"
             "custom_imports = dict(imports=['internvit_fast.mmseg', 'state_dump'])\n"
             "custom_hooks = [dict(type='ShardedCheckpointHook', interval=1, max_keep_ckpts=2, save_best='mIoU'),"
             " dict(type='StateDumpHook')]")
    cfg_path.write_text(TINY.format(base=FSDP, data=str(data), hooks=hooks, norm=BN))
    opts = ["--cfg-options", "train_cfg.max_iters=4", *EXACT]
    first, second = tmp_path / "first", tmp_path / "second"
    env = {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    rc, log = _run(["train", cfg_path, "--work-dir", first, *opts], env, torchrun=True)
    assert rc == 0, log[-4000:]
    folders = sorted(p.name for p in first.iterdir() if p.is_dir() and (p / ".metadata").exists())
    best = [f for f in folders if f.startswith("best_mIoU_iter_")]
    assert [f for f in folders if f.startswith("iter_")] == ["iter_3", "iter_4"] and len(best) == 1, folders
    assert not [p for p in first.iterdir() if p.name.endswith(".tmp")]
    assert (first / "last_checkpoint").read_text().strip() == str(first / "iter_4")
    assert "layer-wise lr decay: 12 parameter groups" in _mmengine_log(first)  # in mmengine's log file

    rc, log = _run(["train", cfg_path, "--work-dir", second, "--resume", first / "iter_3", *opts], env,
                   torchrun=True)
    assert rc == 0, log[-4000:]
    assert "resumed from" in log and "iter 3" in log
    # everything an unsharded resume restores (test_resume_and_load_from_in_one_process), on every process
    want, got = _dumped(first, 3, ranks=2), _dumped(second, 3, ranks=2)
    assert want[0]["base_param_settings"] and want[0]["lr"]["base_lr"]
    for g, w in zip(got, want):
        _same_state(g, w)
    from internvit_fast.checkpoint import read_state_dict
    a, b = read_state_dict(first / "iter_4"), read_state_dict(second / "iter_4")
    assert set(a) == set(b) and any(k.startswith("optimizer.state.") for k in a)
    for k in a:
        assert torch.equal(a[k].load(), b[k].load()), f"{k}: the resumed run differs"

    rc, log = _run(["test", cfg_path, first / "iter_4", "--work-dir", tmp_path / "test"], env, torchrun=True)
    assert rc == 0, log[-4000:]
    assert "mIoU" in log


def _mmengine_log(work) -> str:
    (log,) = glob.glob(str(work / "*" / "*.log"))
    return open(log).read()


@pytest.mark.slow
def test_resume_and_load_from_in_one_process(tmp_path):
    """A run of 2 iterations resumed to 4 (--resume: the newest checkpoint of the work dir, read
    through the safe loader) ends where an uninterrupted run of 4 ends; --load-from starts from
    a checkpoint's weights at iteration 0, and the loader's decisions are in mmengine's log."""
    data = tmp_path / "ade"
    _tiny_dataset(data)
    cfg_path = tmp_path / "tiny.py"
    (tmp_path / "state_dump.py").write_text(STATE_DUMP)
    hooks = HOOKS["plain"] + "\ncustom_imports = dict(imports=['internvit_fast.mmseg', 'state_dump'])\n" \
        "custom_hooks = [dict(type='StateDumpHook')]"
    cfg_path.write_text(TINY.format(base=FULL, data=str(data), hooks=hooks, norm=BN))
    opts = ["--cfg-options", "model.backbone.fast=False", *EXACT]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    env = {"PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    rc, log = _run(["train", cfg_path, "--work-dir", whole, *opts, "train_cfg.max_iters=4"], env)
    assert rc == 0, log[-4000:]
    rc, log = _run(["train", cfg_path, "--work-dir", parts, *opts, "train_cfg.max_iters=2"], env)
    assert rc == 0, log[-4000:]
    rc, log = _run(["train", cfg_path, "--work-dir", parts, "--resume", *opts, "train_cfg.max_iters=4"], env)
    assert rc == 0, log[-4000:]
    assert "resumed epoch: 0, iter: 2" in log
    (want,), (got,) = _dumped(whole, 2), _dumped(parts, 2)
    assert want["base_param_settings"]
    _same_state(got, want)  # mmengine's own resume restores all of it
    from internvit_fast.mmseg import read_runner_file
    a, b = (read_runner_file(str(w / "iter_4.pth")) for w in (whole, parts))
    assert a["meta"]["iter"] == b["meta"]["iter"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k}: the resumed run differs"
    rc, log = _run(["train", cfg_path, "--work-dir", tmp_path / "loaded", "--load-from", whole / "iter_4.pth", *opts,
                    "train_cfg.max_iters=1"], env)
    assert rc == 0, log[-4000:]
    assert "Load checkpoint from" in log and "resumed" not in log


@pytest.mark.slow
def test_test_with_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    data = tmp_path / "ade"
    _tiny_dataset(data)
    cfg_path = tmp_path / "tiny.py"
    cfg_path.write_text(TINY.format(base=FULL, data=str(data), hooks=HOOKS["plain"], norm=BN))
    model = MODELS.build(shrunk(LINEAR).model)  # another architecture: no FPN, a BNHead
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "linear.pth")
    rc, log = _run(["test", cfg_path, tmp_path / "linear.pth", "--work-dir", tmp_path / "w"])
    assert rc == 2, log[-3000:]
    last = log.strip().splitlines()[-1]
    assert "error:" in last and "linear.pth" in last and "'" in last and "Traceback" not in log


@pytest.mark.slow
@pytest.mark.parametrize("path", [FULL, HEAD, LINEAR], ids=os.path.basename)
def test_every_shipped_config_tests_under_torchrun(tmp_path, path):
    """(FSDP: in test_fsdp_run_keeps_its_checkpoints_resumes_exactly_and_tests.) Each recipe
    as it ships (SyncBN heads, reverted on a machine without CUDA), shrunk."""
    data = tmp_path / "ade"
    _tiny_dataset(data)
    cfg = shrunk(path)
    for head in (cfg.model.decode_head, cfg.model.get("auxiliary_head")):
        if head:
            head.norm_cfg = dict(type="SyncBN", requires_grad=True)  # as the recipes ship
    cfg.model.decode_head.num_classes = 150
    if cfg.model.get("auxiliary_head"):
        cfg.model.auxiliary_head.num_classes = 150
    cfg.test_dataloader.update(batch_size=1, num_workers=0, persistent_workers=False)
    cfg.test_dataloader.dataset.data_root = str(data)
    cfg.test_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'), dict(type='Resize', scale=(224, 56), keep_ratio=True),
        dict(type='ResizeToMultiple', size_divisor=14), dict(type='LoadAnnotations', reduce_zero_label=True),
        dict(type='PackSegInputs')]
    cfg.env_cfg = dict(dist_cfg=dict(backend="gloo"))
    cfg.optim_wrapper.paramwise_cfg.num_layers = 4
    cfg.dump(str(tmp_path / "cfg.py"))
    torch.manual_seed(0)
    built = cfg.model.copy()
    for head in (built.decode_head, built.get("auxiliary_head")):
        if head:
            head.norm_cfg = dict(type="BN", requires_grad=True)
    model = MODELS.build(built)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "seg.pth")
    rc, log = _run(["test", tmp_path / "cfg.py", tmp_path / "seg.pth", "--work-dir", tmp_path / "w"], torchrun=True)
    assert rc == 0, log[-4000:]
    assert "mIoU" in log and "reverted to BatchNorm" in log


# --- the pieces, one at a time ------------------------------------------------------------------

def evil_statistic(self):
    return 0


def test_runner_checkpoints_are_read_with_exactly_mmengines_types(tmp_path):
    """What a Runner saves comes back (HistoryBuffer, numpy values); anything else is an inert
    placeholder; and a file cannot add to HistoryBuffer's class-wide statistics registry."""
    import numpy as np
    from mmengine.logging import HistoryBuffer, MessageHub

    from internvit_fast.mmseg import read_runner_file
    hub = MessageHub.get_instance("internvit_fast_resume_test")
    hub.update_scalar("train/loss", 0.5)
    hub.update_scalar("train/loss", 0.25)
    HistoryBuffer.register_statistics(evil_statistic)  # registered while saving, removed before loading
    try:
        torch.save({"meta": {"iter": np.int64(7), "lr": np.float64(1e-4), "hist": np.arange(3.0)},
                    "message_hub": hub.state_dict(), "state_dict": {"w": torch.ones(2)},
                    "evil": __import__("builtins").eval}, tmp_path / "ck.pth")
    finally:
        HistoryBuffer._statistics_methods.pop("evil_statistic")
    got = read_runner_file(str(tmp_path / "ck.pth"))
    buf = got["message_hub"]["log_scalars"]["train/loss"]
    assert type(buf) is HistoryBuffer and buf.mean() == 0.375 and buf.current() == 0.25
    assert got["meta"]["iter"] == 7 and np.array_equal(got["meta"]["hist"], np.arange(3.0))
    assert "evil_statistic" not in HistoryBuffer._statistics_methods
    from internvit_fast.checkpoint.safe_pickle import Placeholder
    assert issubclass(got["evil"], Placeholder) and got["evil"].name == "builtins.eval"  # not eval itself
    assert torch.equal(got["state_dict"]["w"], torch.ones(2))


def test_layer_decay_needs_num_layers_equal_to_the_depth():
    with pytest.raises(ValueError, match=r"paramwise_cfg.num_layers=48 but the backbone has depth=4"):
        _groups(FULL, num_layers=48)


def test_dumped_config_holds_only_the_optimizer_that_runs():
    text = Config.fromfile(FULL).pretty_text
    assert "SGD" not in text and "AdamW" in text


def test_one_knob_sets_every_crop_size():
    from internvit_fast.mmseg import set_crop_size
    cfg = Config.fromfile(FULL)
    set_crop_size(cfg, 448)
    assert cfg.model.backbone.img_size == 448 and tuple(cfg.model.data_preprocessor.size) == (448, 448)
    assert tuple(cfg.model.test_cfg.crop_size) == (448, 448) and cfg.model.test_cfg.stride[0] <= 448
    assert cfg.model.test_cfg.stride[0] % 14 == 0
    crop = [s for s in cfg.train_dataloader.dataset.pipeline if s["type"] == "RandomCrop"][0]
    assert tuple(crop["crop_size"]) == (448, 448)
    assert "504" not in Config(cfg.to_dict()).pretty_text.replace("50400", "")  # nothing left at the old size
    with pytest.raises(ValueError, match="multiple of the patch size"):
        set_crop_size(cfg, 450)


def _small_updates(wrapper_type: str):
    """50 AdamW steps at lr 1e-4 on a backbone initialised as upstream's (norm weights 1,
    LayerScale 0.1): each step moves a weight by about lr, below half a bf16 step there
    (0.0039 at 1, 0.00024 at 0.1); 50 of them add up to more."""
    from mmengine.optim import build_optim_wrapper

    import internvit_fast.mmseg  # noqa: F401 - registers the wrapper, as a config's custom_imports does
    from helpers import SMALL
    from internvit_fast import InternViT6B
    torch.manual_seed(0)
    model = InternViT6B(**dict(SMALL, dtype=torch.bfloat16, with_cp=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ow = build_optim_wrapper(model, dict(type=wrapper_type, optimizer=dict(type="AdamW", lr=1e-4,
                                                                             weight_decay=0.0)))
    img = torch.randn(2, 3, 56, 56)
    for _ in range(50):
        ow.update_params(sum(f.float().square().mean() for f in model(img)))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    return changed, ow


@pytest.mark.slow
def test_fp32_master_weights_accumulate_small_updates():
    norms = [k for k in _fresh_names() if k.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "gamma"))]
    default, _ = _small_updates("OptimWrapper")
    master, ow = _small_updates("FP32MasterOptimWrapper")
    assert norms and not set(norms) & default, "bf16 updates of the norm weights should be lost (upstream's default)"
    assert set(norms) <= master, "the fp32 masters should carry the small updates into the weights"
    sd = ow.state_dict()
    assert len(sd["fp32_master"]) > 0 and all(m.dtype == torch.float32 for m in sd["fp32_master"])


def _fresh_names():
    from helpers import small_model
    return list(small_model(dtype=torch.bfloat16).state_dict())


def test_all_configs_are_listed():
    assert set(CONFIGS) == {FULL, FSDP, HEAD, LINEAR}
    json.dumps(UPSTREAM, default=str)  # the table is plain data
