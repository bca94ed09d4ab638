"""Tuned launch configurations, measured on a card and committed per architecture.

``kernels/tuned/sm90.json`` (written by ``bash benchmarks/gpu_run.sh --tune``) lists, per
kernel, the winning configuration for each measured shape. The launchers ask ``lookup``
and fall back to their heuristics for a kernel, shape or card the file does not list.
Nothing is autotuned at import or on a user's first call.

File format::

    {"arch": "sm90", "card": "...", "date": "...", "command": "...",
     "configs": {"linear_gelu": [{"shape": {"M": 5188, "N": 12800, "K": 3200, "dtype": "bf16"},
                                  "config": {"BLOCK_M": 128, ..., "num_warps": 8, "num_stages": 3},
                                  "impl": "fused", "ms": {"fused": 0.61, "unfused": 0.70}}],
                 "rms_norm": [{"shape": {"M": 1297, "N": 3200, "dtype": "bf16"}, "config": {"num_warps": 16}}]}}

``impl`` (fused ops that have an unfused alternative) names the implementation that
measured faster at that shape: ``choice`` returns it, "fused" where nothing was measured.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

from ._common import INTERPRETING, row_launch

# realpath: however the package is laid out (editable install, or gpu_run.sh's fallback that
# links kernels/ into a temporary package), this is the repository's kernels/tuned/.
TUNED_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "tuned")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@functools.lru_cache(maxsize=None)
def table(arch: str) -> dict:
    """The committed configurations for one architecture ({} when none were measured)."""
    path = os.path.join(TUNED_DIR, f"{arch}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("configs", {})


def arch_of(device: torch.device) -> Optional[str]:
    if INTERPRETING or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=4096)
def _entry(arch: str, kernel: str, shape: tuple) -> Optional[dict]:
    want = dict(shape)
    best, best_dist = None, None
    for entry in table(arch).get(kernel, []):
        have = entry["shape"]
        if any(have.get(k) != v for k, v in want.items() if k != "M"):
            continue
        # M (rows) varies with the batch: take the entry measured at the nearest row count.
        dist = abs(have.get("M", 0) - want.get("M", 0))
        if best_dist is None or dist < best_dist:
            best, best_dist = entry, dist
    return best


def _find(kernel: str, device: torch.device, shape: dict) -> Optional[dict]:
    arch = arch_of(device)
    if arch is None:
        return None
    shape = {k: DTYPE_NAMES.get(v, v) for k, v in shape.items()}
    return _entry(arch, kernel, tuple(sorted(shape.items())))


def lookup(kernel: str, device: torch.device, **shape) -> Optional[dict]:
    """The tuned configuration for ``kernel`` at ``shape`` on ``device``'s architecture, or None.

    Every shape key but M must match exactly; among those entries the nearest M wins.
    """
    entry = _find(kernel, device, shape)
    return dict(entry["config"]) if entry is not None and entry.get("config") else None


def choice(kernel: str, device: torch.device, **shape) -> str:
    """"fused" or "unfused": which implementation of a fused op measured faster here."""
    entry = _find(kernel, device, shape)
    return entry.get("impl", "fused") if entry is not None else "fused"


def row_config(kernel: str, t: torch.Tensor, rows: int, width: int, config: Optional[dict] = None) -> dict:
    """Launch settings of a one-row-per-program norm kernel: the caller's ``config``, else the
    measured one for this card and shape, else the heuristic (``row_launch``)."""
    return row_launch(width, config or lookup(kernel, t.device, M=rows, N=width, dtype=t.dtype))
