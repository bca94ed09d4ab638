"""Checkpoints: file formats, key layouts and shape surgery, kept out of forward.

Accepted files:
- torch files (.pth/.pt/.bin): a bare state dict, or one wrapped under 'module', 'model'
  or 'state_dict' (mmengine/MMSegmentation checkpoints with their 'meta', 'message_hub'
  and optimizer state too). Read by torch's weights-only unpickler; objects it does not
  build (mmengine's HistoryBuffer, numpy scalars) become inert placeholders, logged
  (``safe_pickle``), so no code from the file runs. Unrestricted unpickling is never used,
  and legacy (non-zip) files are read weights-only;
- .safetensors files (read with the ``safetensors`` package, tensor by tensor);
- sharded sets as transformers writes them: ``*.safetensors.index.json`` or
  ``pytorch_model.bin.index.json`` with their shards, or the folder holding one of these
  (or a single .safetensors / .bin file);
- a folder written by torch.distributed.checkpoint (FSDP training's sharded checkpoints,
  ``.metadata`` plus one file per process), read whole in one process by this module's own
  reader: the metadata through a restricted unpickler, each tensor chunk weights-only,
  non-tensor entries skipped with a log line.

Key layouts: upstream's segmentation backbone keys, the InternViT layout published with
InternVL (``embeddings.*``, ``encoder.layers.N.*``), each under any prefix that is the
structure of the file: ``module.`` (DDP), ``backbone.`` (an mmseg segmentor: only its
backbone is taken), ``vision_model.`` (an InternVL chat model), or nested ones. The
prefix is the one under which the most keys match the model, and the choice is logged.

Nothing is copied before every check has passed: keys (strict), shapes (after the
position table and patch kernel are resized, as upstream does at load), and that every
tensor is a plain, dense floating-point CPU tensor with data (not meta, sparse, quantized
or a tensor subclass).
Tensors are then read, converted on the CPU and copied into the model one at a time, so
a checkpoint never sits in memory twice.
"""
from .base import CheckpointError, LazyTensor, materialize, regular_file
from .files import read_state_dict, read_torch
from .loader import adapt_state_dict, check_tensor, load_checkpoint, to_upstream_keys

__all__ = ["CheckpointError", "LazyTensor", "adapt_state_dict", "check_tensor", "load_checkpoint", "materialize",
           "read_state_dict", "read_torch", "regular_file", "to_upstream_keys"]
