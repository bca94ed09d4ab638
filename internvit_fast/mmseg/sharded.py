"""Sharded training checkpoints for FSDP runs: ``ShardedCheckpointHook`` saves ``iter_N/``
folders holding every process's shards of the weights and of the optimizer state
(torch.distributed.checkpoint) and the rest of the training state (iteration, schedulers,
message hub) in ``runner_state.pth``, written under a temporary name and renamed when
complete; ``resume_sharded`` continues a run from one (each process reads the chunks
overlapping its own shards)."""
from __future__ import annotations

import os
import shutil
from typing import Dict, Optional, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..checkpoint import CheckpointError, dcp
from .loading import load_segmentor_weights, module_of, read_runner_file


def _training_tensors(runner) -> Tuple[Dict[str, torch.Tensor], dict]:
    """This process's part of the weights and the optimizer state, named as saved."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    module = module_of(runner.model)
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
        # mmengine's optimizer wrapper keeps, beside the optimizer, a param group of its own whose
        # lr the schedulers drive too (the logged base_lr): what its state_dict() adds.
        "optim_wrapper_extra": _wrapper_extra(runner.optim_wrapper),
    }


def _wrapper_extra(wrapper) -> dict:
    """What the optimizer wrapper's state_dict() holds beyond the optimizer's state and param
    groups (those are saved sharded): mmengine's ``base_param_settings``."""
    base = getattr(wrapper, "base_param_settings", None)
    return {} if base is None else {"base_param_settings": dict(base)}


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
    set_optimizer_state_dict(module_of(runner.model), runner.optim_wrapper.optimizer,
                             {"state": osd["state"], "param_groups": state["optimizer_param_groups"]})
    base = state.get("optim_wrapper_extra", {}).get("base_param_settings")
    if base is not None and getattr(runner.optim_wrapper, "base_param_settings", None) is not None:
        runner.optim_wrapper.base_param_settings = base  # as mmengine's OptimWrapper.load_state_dict does
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


def load_or_resume(runner):
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
                load_segmentor_weights(module_of(runner.model), target)
            runner._has_loaded = True
            return
        original()
    return load_or_resume
