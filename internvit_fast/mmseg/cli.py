"""``python -m internvit_fast.mmseg train|test``: an MMSegmentation config run with
internvit_fast's classes, safe checkpoint reading and sharded checkpoints; config fixes
(SyncBN reverted to BatchNorm without CUDA, one knob for the crop size)."""
from __future__ import annotations

import argparse
import logging
import os

import torch
from mmengine.logging import MMLogger

from ..checkpoint import CheckpointError
from .loading import load_segmentor_weights, module_of
from .sharded import load_or_resume


def revert_sync_bn(cfg) -> int:
    """SyncBN needs CUDA: without it every ``norm_cfg`` of type SyncBN becomes BN (as
    mmengine's revert_sync_batchnorm does for built models). Returns how many changed."""
    changed = 0

    def walk(node):
        nonlocal changed
        if isinstance(node, dict):
            if node.get("type") == "SyncBN":
                node["type"] = "BN"
                changed += 1
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)
    walk(cfg.model)
    return changed


def set_crop_size(cfg, size: int) -> None:
    """One knob for the crop size: the backbone's position table, the data preprocessor's
    padding, the training crop and resize range, the sliding windows and their stride (in
    upstream's ratio 322/504, a multiple of the patch size), the test resize."""
    patch = cfg.model.backbone.get("patch_size", 14)
    if size <= 0 or size % patch:
        raise ValueError(f"--crop-size {size}: must be a positive multiple of the patch size ({patch})")
    crop = (size, size)
    stride = max(patch, round(size * 322 / 504 / patch) * patch)
    cfg.crop_size = crop
    cfg.model.backbone.img_size = size
    cfg.model.data_preprocessor.size = crop
    if cfg.get("data_preprocessor"):
        cfg.data_preprocessor.size = crop
    cfg.model.test_cfg.crop_size = crop
    cfg.model.test_cfg.stride = (stride, stride)
    pipelines = [cfg.get(loader, {}).get("dataset", {}).get("pipeline", [])
                 for loader in ("train_dataloader", "val_dataloader", "test_dataloader")]
    pipelines += [v for k, v in cfg.items() if k.endswith("pipeline") and isinstance(v, list)]  # as dumped
    for pipeline in pipelines:
        for step in pipeline:
            if step.get("type") == "RandomCrop":
                step["crop_size"] = crop
            elif step.get("type") in ("RandomResize", "Resize") and "scale" in step:
                step["scale"] = (4 * size, size)  # upstream: (2016, 504), short side the crop


# --- the command line ------------------------------------------------------------------------------

class _ToMMLogger(logging.Handler):
    """internvit_fast's log lines (the checkpoint loader's decisions) into mmengine's log."""

    def emit(self, record):
        MMLogger.get_current_instance().handle(record)


def _forward_logs() -> None:
    ours = logging.getLogger("internvit_fast")
    if not any(isinstance(h, _ToMMLogger) for h in ours.handlers):
        ours.addHandler(_ToMMLogger())
    ours.setLevel(logging.INFO)
    ours.propagate = False  # mmengine's handlers print it; the root logger would print warnings again


def _exists(ap, what: str, path: str) -> str:
    if not os.path.exists(path):
        ap.error(f"{what} {path}: no such file or folder")
    return path


def main(argv=None) -> int:
    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner

    ap = argparse.ArgumentParser(prog="python -m internvit_fast.mmseg",
                                 description="Train or test an MMSegmentation config with internvit_fast.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("train", "test"):
        p = sub.add_parser(name)
        p.add_argument("config")
        if name == "test":
            p.add_argument("checkpoint", help="a segmentor checkpoint: a runner's .pth or a sharded iter_N/ folder")
            p.add_argument("--precision", choices=["bf16", "fp8"],
                           help="the backbone's precision (fp8: FP8 GEMMs, inference only; default: the config's)")
        else:
            p.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                           help="continue a run: from the newest checkpoint in the work dir (no PATH), or from "
                                "PATH (a .pth or a sharded iter_N/ folder)")
            p.add_argument("--load-from", metavar="PATH", help="start from these weights (iteration 0)")
            p.add_argument("--fp32-master", action="store_true",
                           help="keep fp32 master weights (the optimizer's), compute in bf16; default: upstream's "
                                "bf16 weights and updates")
        p.add_argument("--crop-size", type=int, help="the crop (and window) size, e.g. 448; default: the config's")
        p.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
        p.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                       help="override config keys, e.g. train_cfg.max_iters=100")
        p.add_argument("--launcher", choices=["none", "pytorch"],
                       help="default: pytorch under torchrun (WORLD_SIZE set), else none")
    args = ap.parse_args(argv)
    cfg = Config.fromfile(_exists(ap, "config", args.config))
    cfg.merge_from_dict(args.cfg_options)
    if getattr(args, "precision", None):
        cfg.model.backbone.precision = args.precision
    if args.crop_size is not None:
        try:
            set_crop_size(cfg, args.crop_size)
        except ValueError as e:
            ap.error(str(e))
    fsdp = (cfg.get("model_wrapper_cfg") or {}).get("type") == "InternViTFSDP"
    if getattr(args, "fp32_master", False):
        if fsdp:
            cfg.model.backbone.dtype = "float32"
            cfg.model_wrapper_cfg.fp32_master = True
        else:
            cfg.optim_wrapper.type = "FP32MasterOptimWrapper"
    reverted = 0 if torch.cuda.is_available() else revert_sync_bn(cfg)
    cfg.launcher = args.launcher or ("pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none")
    if cfg.launcher == "pytorch" and not torch.cuda.is_available():
        # mmengine's pytorch launcher calls torch.cuda.set_device, which a CPU-only torch lacks:
        # join the torchrun group with gloo here (the runner then skips its own setup), and
        # wrap with InternViTDDP (mmengine's default wrapper passes GPU device_ids).
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        if cfg.get("model_wrapper_cfg") is None:
            cfg.model_wrapper_cfg = dict(type="InternViTDDP")
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or os.path.join(
        "work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    if args.command == "train":
        if args.resume == "auto":
            cfg.resume, cfg.load_from = True, None
        elif args.resume:
            cfg.resume, cfg.load_from = True, _exists(ap, "--resume", args.resume)
        if args.load_from:
            cfg.resume, cfg.load_from = False, _exists(ap, "--load-from", args.load_from)
    else:
        _exists(ap, "checkpoint", args.checkpoint)
    _forward_logs()
    runner = Runner.from_cfg(cfg)
    if reverted:
        runner.logger.info(f"no CUDA: {reverted} SyncBN norm layers reverted to BatchNorm (SyncBN needs CUDA)")
    try:
        if args.command == "test":
            load_segmentor_weights(module_of(runner.model), args.checkpoint)
            runner.test()
            return 0
        if getattr(runner.model, "initialised", False):
            # InternViTFSDP set the weights before sharding; the runner's own step would
            # broadcast the sharded tensors, which torch.distributed cannot do.
            runner._init_model_weights = lambda: None
        runner.load_or_resume = load_or_resume(runner)
        runner.train()
    except CheckpointError as e:
        ap.exit(2, f"{ap.prog} {args.command}: error: {str(e).splitlines()[0][:500]}\n")
    finally:
        # Leave the group before the interpreter tears down: gloo's threads destroyed at exit
        # abort the process now and then ("terminate called without an active exception").
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
