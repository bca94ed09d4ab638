"""What an MMSegmentation training run needs beyond the model, and the command line.

Imported (and so registered in mmengine's registries) by ``internvit_fast.mmseg``:

- every checkpoint the runner reads from a local path (``resume``, ``load_from``, other
  modules' ``init_cfg``) goes through this package's safe loader: torch's weights-only
  unpickler, with exactly mmengine's own state types allowed (``mmengine_state_types``) and
  anything else an inert placeholder; a sharded folder gives its model weights;
- ``ShardedCheckpointHook``: FSDP runs save ``iter_N/`` folders holding every process's
  shards of the weights and of the optimizer state (torch.distributed.checkpoint) and the
  rest of the training state (iteration, schedulers, message hub) in ``runner_state.pth``;
  written under a temporary name and renamed when complete; ``last_checkpoint``,
  ``max_keep_ckpts`` and ``save_best`` as mmengine's CheckpointHook has them;
- resuming from such a folder (each process reads the chunks overlapping its own shards)
  and loading segmentor weights into a sharded or plain model (``load_segmentor_weights``);
- ``SyncNormStatsHook``: BatchNorm statistics averaged over the processes after every
  iteration, so validation, test and the saved checkpoint use the same ones;
- ``FP32MasterOptimWrapper``: fp32 master weights for the bf16 backbone (opt-in);
- config fixes: SyncBN reverted to BatchNorm without CUDA, one knob for the crop size;
- ``main``: ``python -m internvit_fast.mmseg train|test``.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import shutil
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.optim import OptimWrapper
from mmengine.registry import HOOKS, OPTIM_WRAPPERS
from mmengine.runner import CheckpointLoader
from torch import nn

from . import dcp
from .checkpoint import CheckpointError, _check_tensor, _read_torch, materialize, read_state_dict

logger = logging.getLogger("internvit_fast")


# --- reading what the runner reads, safely -----------------------------------------------------

class _HistoryBuffer(HistoryBuffer):
    """mmengine's HistoryBuffer as read back from a file: the recorded values only.

    HistoryBuffer's own ``__setstate__`` merges the file's ``statistics_methods`` (bound
    methods, pickled through ``getattr``) into the class-wide registry, so a file could
    replace how every buffer of the process computes its mean. Here that entry is dropped
    and the values are type-checked. Once read, each becomes a plain HistoryBuffer again
    (``read_runner_file``)."""

    def __setstate__(self, state):
        import numpy as np
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"HistoryBuffer state is a {type(state).__name__}")
        for name in ("_log_history", "_count_history"):
            if not isinstance(state.get(name), np.ndarray) or state[name].dtype.kind not in "fiu":
                raise pickle.UnpicklingError(f"HistoryBuffer.{name} is not a numeric array")
        if type(state.get("max_length")) is not int:
            raise pickle.UnpicklingError("HistoryBuffer.max_length is not an int")
        self._set_default_statistics()
        self.__dict__.update({k: state[k] for k in ("_log_history", "_count_history", "max_length")})


def _plain_buffers(obj, depth: int = 0):
    """Turn the _HistoryBuffers of a loaded checkpoint into mmengine's own class (same fields)."""
    if isinstance(obj, _HistoryBuffer):
        obj.__class__ = HistoryBuffer
    elif isinstance(obj, dict) and depth < 8:
        for v in obj.values():
            _plain_buffers(v, depth + 1)
    elif isinstance(obj, (list, tuple)) and depth < 8:
        for v in obj:
            _plain_buffers(v, depth + 1)
    return obj


def mmengine_state_types() -> Dict[str, object]:
    """Exactly the classes mmengine's Runner pickles beside the tensors, for reading its
    checkpoints back to resume: HistoryBuffer (as ``_HistoryBuffer``), numpy's arrays,
    scalars and dtypes. Anything else a file names stays an inert placeholder."""
    import numpy as np
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    types: Dict[str, object] = {
        "mmengine.logging.history_buffer.HistoryBuffer": _HistoryBuffer,
        f"{__name__}._HistoryBuffer": _HistoryBuffer,
        "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 name them so
        types[f"{module}._reconstruct"] = multiarray._reconstruct
        types[f"{module}.scalar"] = multiarray.scalar
    for code in np.typecodes["All"]:  # the dtype classes: what BUILD is applied to
        cls = type(np.dtype(code))
        types[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return types


def read_runner_file(path: str):
    """A checkpoint file as mmengine's runner wants it (meta, state_dict, optimizer,
    message_hub, param_schedulers), read safely."""
    return _plain_buffers(_read_torch(path, trusted=mmengine_state_types()))


def _load_local(filename: str, map_location=None):
    """mmengine's loader for local paths, replaced: ``torch.load`` with mmengine's types
    refused by default (torch >= 2.6) made resume and load_from fail, and turning safe
    loading off for everything was the only way through."""
    filename = os.path.expanduser(filename)
    if dcp.is_dcp_folder(filename):
        return {"state_dict": {k: materialize(v) for k, v in segmentor_state(filename).items()}}
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return read_runner_file(filename)  # tensors on the CPU; the runner moves what it loads


CheckpointLoader.register_scheme(prefixes="", loader=_load_local, force=True)


# --- segmentor weights into a plain or sharded model ----------------------------------------------

def segmentor_state(path: str) -> dict:
    """The segmentor weights a file or folder holds (name -> tensor or lazy tensor): a runner
    checkpoint's ``state_dict``, a bare state dict, the ``model.*`` tensors of a sharded
    training folder; a DDP ``module.`` prefix is taken off."""
    sd = read_state_dict(path)
    if dcp.is_dcp_folder(path) and any(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _module(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def load_segmentor_weights(model: nn.Module, path: str) -> None:
    """Load a segmentor checkpoint into ``model`` (an FSDP-sharded one too: each process
    copies its shard of each tensor, read one at a time). Every key and shape is checked
    first; the first mismatch raises a CheckpointError that names it."""
    where = os.fspath(path)
    sd = segmentor_state(where)
    own = model.state_dict()
    for k in sd:
        if k in own:  # dtypes first, as in the file (an FP8 file into a bf16 model is told so): no
            try:  # integers into floats, e4m3 only into FP8 weights
                _check_tensor(k, sd[k], own[k].dtype)
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}") from None
    if any(v.dtype == torch.float8_e4m3fn for v in own.values()):  # precision="fp8": bf16 weights quantize as copied
        from .checkpoint import LazyTensor
        from .fp8 import expand_checkpoint
        try:
            sd = expand_checkpoint(sd, own, lambda shape, dtype, read: LazyTensor(shape, dtype, read, where))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
    for k in own:
        if k not in sd:
            raise CheckpointError(f"{where}: does not fit the model: it lacks {k!r} (and {len(set(own) - set(sd)) - 1} "
                                  "more); is it a checkpoint of this config?")
    for k in sd:
        if k not in own:
            raise CheckpointError(f"{where}: does not fit the model: it has {k!r}, which the model does not")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{where}: does not fit the model: {k!r} is {tuple(sd[k].shape)} in the file, "
                                  f"{tuple(v.shape)} in the model")
    with torch.no_grad():
        for k, v in own.items():
            offsets, sizes, local = dcp.local_region(v)
            full = materialize(sd[k])
            local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))].to(local.dtype))
    logger.info("%s: loaded %d tensors into the segmentor", where, len(own))


# --- sharded training checkpoints -------------------------------------------------------------------

def _training_tensors(runner) -> Tuple[Dict[str, torch.Tensor], dict]:
    """This process's part of the weights and the optimizer state, named as saved."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    module = _module(runner.model)
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(module).items()}
    osd = get_optimizer_state_dict(module, runner.optim_wrapper.optimizer)  # initialises an empty state
    for fqn, state in osd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.state.{fqn}.{k}"] = v
    return tensors, osd


def _runner_state(runner, iteration: int, osd: dict) -> dict:
    scheds = runner.param_schedulers
    return {
        "meta": {"epoch": runner.epoch, "iter": iteration, "seed": runner.seed,
                 "experiment_name": runner.experiment_name,
                 "dataset_meta": getattr(runner.train_dataloader.dataset, "metainfo", None)},
        "message_hub": runner.message_hub.state_dict(),
        "param_schedulers": {k: [s.state_dict() for s in v] for k, v in scheds.items()} if isinstance(scheds, dict)
        else [s.state_dict() for s in scheds or []],
        "optimizer_param_groups": osd["param_groups"],
        "optimizer_scalars": {fqn: {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                              for fqn, st in osd["state"].items()},
    }


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@HOOKS.register_module(name="ShardedCheckpointHook", force=True)
class ShardedCheckpointHook(Hook):
    """Sharded training checkpoints for FSDP runs (mmengine's CheckpointHook would save rank
    0's shards only): ``iter_N/`` after N iterations, every ``interval`` and after the last;
    each holds the weights, the optimizer state and the training state, so ``--resume``
    continues the run. ``max_keep_ckpts`` (-1: all) and ``save_best`` (a metric, e.g.
    'mIoU', kept as ``best_<metric>_iter_N/``; ``rule`` 'greater' or 'less') as mmengine's
    CheckpointHook. ``last_checkpoint`` in the work dir names the newest folder."""
    priority = "VERY_LOW"

    def __init__(self, interval: int = 1000, max_keep_ckpts: int = -1, save_best: Optional[str] = None,
                 rule: Optional[str] = None, save_last: bool = True):
        if rule not in (None, "greater", "less"):
            raise ValueError(f"ShardedCheckpointHook: rule must be 'greater' or 'less', got {rule!r}")
        self.interval, self.max_keep_ckpts, self.save_last = interval, max_keep_ckpts, save_last
        self.save_best = save_best
        self.rule = rule or ("less" if save_best and "loss" in save_best.lower() else "greater")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.every_n_train_iters(runner, self.interval) or (self.save_last and self.is_last_train_iter(runner)):
            self._save(runner, f"iter_{runner.iter + 1}", runner.iter + 1)

    def after_val_epoch(self, runner, metrics=None):
        if not self.save_best or not metrics or self.save_best not in metrics:
            return
        score, hub = float(metrics[self.save_best]), runner.message_hub
        best = hub.get_info("sharded_best_score")
        if best is not None and (score <= best if self.rule == "greater" else score >= best):
            return
        previous = hub.get_info("sharded_best_folder")
        name = f"best_{self.save_best}_iter_{runner.iter}"
        hub.update_info("sharded_best_score", score)
        hub.update_info("sharded_best_folder", name)
        self._save(runner, name, runner.iter, keep=False)
        if previous and previous != name and _rank() == 0:
            shutil.rmtree(os.path.join(runner.work_dir, previous), ignore_errors=True)

    def _save(self, runner, name: str, iteration: int, keep: bool = True):
        folder = os.path.join(runner.work_dir, name)
        tensors, osd = _training_tensors(runner)
        hub = runner.message_hub
        kept = list(hub.get_info("sharded_keep_iters") or []) + ([name] if keep else [])
        if keep:
            hub.update_info("sharded_keep_iters", kept[-self.max_keep_ckpts:] if self.max_keep_ckpts > 0 else kept)
        dcp.save(folder, tensors, _runner_state(runner, iteration, osd))
        if _rank() == 0:
            if keep:
                with open(os.path.join(runner.work_dir, "last_checkpoint"), "w") as f:
                    f.write(folder)
                for old in (kept[:-self.max_keep_ckpts] if self.max_keep_ckpts > 0 else []):
                    shutil.rmtree(os.path.join(runner.work_dir, old), ignore_errors=True)
        runner.logger.info(f"sharded checkpoint saved to {folder}")


def resume_sharded(runner, folder: str) -> None:
    """Continue a run from a folder ``ShardedCheckpointHook`` wrote: each process reads its
    shards of the weights and the optimizer state; then the iteration, the schedulers and
    the message hub, as mmengine's ``Runner.resume`` does for a file."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    path = os.path.join(folder, dcp.RUNNER_STATE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: has no {dcp.RUNNER_STATE}: a folder of weights only cannot be resumed "
                              "(use --load-from to start from its weights)")
    state = read_runner_file(path)
    tensors, osd = _training_tensors(runner)
    dcp.fill(folder, tensors)
    for fqn, scalars in state.get("optimizer_scalars", {}).items():
        osd["state"].setdefault(fqn, {}).update(scalars)
    set_optimizer_state_dict(_module(runner.model), runner.optim_wrapper.optimizer,
                             {"state": osd["state"], "param_groups": state["optimizer_param_groups"]})
    meta = state["meta"]
    runner.train_loop._epoch, runner.train_loop._iter = meta["epoch"], meta["iter"]
    seed = meta.get("seed")
    if seed is not None and seed != runner.seed:
        runner.logger.warning(f"the checkpoint's random seed {seed} differs from the config's {runner.seed}: "
                              "using the checkpoint's")
        runner.set_randomness(**dict(runner._randomness_cfg, seed=seed))
    runner.message_hub.load_state_dict(state["message_hub"])
    scheds, saved = runner.param_schedulers, state["param_schedulers"]
    pairs = [(s, d) for k in scheds for s, d in zip(scheds[k], saved[k])] if isinstance(scheds, dict) \
        else list(zip(scheds or [], saved))
    for sched, sd in pairs:
        sched.load_state_dict(sd)
    runner.logger.info(f"resumed from {folder}: epoch {runner.epoch}, iter {runner.iter}")


def _load_or_resume(runner):
    """The runner's load_or_resume, taught sharded folders (resume, or weights only)."""
    from mmengine.runner import find_latest_checkpoint
    original = runner.load_or_resume

    def load_or_resume():
        if runner._has_loaded:
            return
        target = runner._load_from
        if runner._resume and target is None:
            target = find_latest_checkpoint(runner.work_dir)
        if target is not None and dcp.is_dcp_folder(target):
            if runner._resume:
                resume_sharded(runner, target)
            else:
                load_segmentor_weights(_module(runner.model), target)
            runner._has_loaded = True
            return
        original()
    return load_or_resume


# --- BatchNorm statistics across processes ------------------------------------------------------

@HOOKS.register_module(name="SyncNormStatsHook", force=True)
class SyncNormStatsHook(Hook):
    """BatchNorm running statistics averaged over the processes after every training iteration.

    Plain BatchNorm (a CPU run, or a config without SyncBN) updates its running statistics
    from each process's own images, so the processes would validate with different ones and
    the checkpoint would hold rank 0's. Averaging them every iteration (a few KB) keeps every
    process, the validation, the test and the checkpoint on the same statistics. SyncBN's are
    already the same everywhere and are left alone."""
    priority = "ABOVE_NORMAL"  # before the checkpoint hook saves the iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        stats = [t for m in runner.model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                 for t in (m.running_mean, m.running_var) if t is not None]
        if not stats:
            return
        flat = torch.cat([t.detach().float().reshape(-1) for t in stats])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        with torch.no_grad():
            for t, part in zip(stats, flat.split([t.numel() for t in stats])):
                t.copy_(part.view_as(t))


# --- fp32 master weights ------------------------------------------------------------------------------

@OPTIM_WRAPPERS.register_module(name="FP32MasterOptimWrapper", force=True)
class FP32MasterOptimWrapper(OptimWrapper):
    """fp32 master weights for a model held in bf16 (or fp16): the optimizer updates fp32
    copies of the low-precision parameters; after each step the parameters are set to the
    copies, rounded. Forward and backward (the fast path's kernels included) stay in bf16.

    Upstream trains the bf16 backbone with plain AdamW on bf16 weights: an update smaller
    than half a bf16 step of a weight is lost (at lr 4e-5, every RMSNorm, QK-norm and
    LayerScale weight of the backbone stays bit-unchanged). Here updates accumulate in the
    masters. Memory: 4 bytes per low-precision parameter for the master, and the optimizer
    state in fp32 (AdamW: 8 more bytes) instead of bf16 (4). The masters are part of the
    state dict, so a resumed run continues from them.
    ``optim_wrapper=dict(type='FP32MasterOptimWrapper', optimizer=...)`` or ``--fp32-master``."""

    def __init__(self, optimizer, **kwargs):
        self._pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if p.dtype in (torch.bfloat16, torch.float16):
                    master = p.detach().float().clone().requires_grad_(p.requires_grad)
                    self._pairs.append((p, master))
                    params.append(master)
                else:
                    params.append(p)
            group["params"] = params
        super().__init__(optimizer, **kwargs)

    def step(self, **kwargs) -> None:
        for p, master in self._pairs:
            master.grad = None if p.grad is None else p.grad.float()
        super().step(**kwargs)
        with torch.no_grad():
            for p, master in self._pairs:
                p.copy_(master)
                master.grad = None

    def zero_grad(self, **kwargs) -> None:
        super().zero_grad(**kwargs)
        for p, _ in self._pairs:
            p.grad = None

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["fp32_master"] = [m.detach().clone() for _, m in self._pairs]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("fp32_master", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            if len(masters) != len(self._pairs):
                raise CheckpointError(f"the checkpoint holds {len(masters)} fp32 master tensors, this run has "
                                      f"{len(self._pairs)}")
            with torch.no_grad():
                for (p, master), saved in zip(self._pairs, masters):
                    master.copy_(saved)
                    p.copy_(master)


# --- config adjustments ------------------------------------------------------------------------------

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
            load_segmentor_weights(_module(runner.model), args.checkpoint)
            runner.test()
            return 0
        if getattr(runner.model, "initialised", False):
            # InternViTFSDP set the weights before sharding; the runner's own step would
            # broadcast the sharded tensors, which torch.distributed cannot do.
            runner._init_model_weights = lambda: None
        runner.load_or_resume = _load_or_resume(runner)
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
