"""Every checkpoint the runner reads from a local path (``resume``, ``load_from``, other
modules' ``init_cfg``) goes through this package's safe loader: torch's weights-only
unpickler, with exactly mmengine's own state types allowed (``mmengine_state_types``) and
anything else an inert placeholder; a sharded folder gives its model weights. And segmentor
weights into a plain or sharded model (``load_segmentor_weights``)."""
from __future__ import annotations

import logging
import os
import pickle
from typing import Dict

import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner import CheckpointLoader
from torch import nn

from ..checkpoint import CheckpointError, LazyTensor, check_tensor, dcp, materialize, read_state_dict, read_torch
from ..checkpoint.fp8 import expand_checkpoint

logger = logging.getLogger("internvit_fast")


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
    return _plain_buffers(read_torch(path, trusted=mmengine_state_types()))


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


def module_of(model: nn.Module) -> nn.Module:
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
                check_tensor(k, sd[k], own[k].dtype)
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}") from None
    if any(v.dtype == torch.float8_e4m3fn for v in own.values()):  # precision="fp8": bf16 weights quantize as copied
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
