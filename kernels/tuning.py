"""Tuned launch configurations, measured on a card and committed per architecture.

``kernels/tuned/sm90.json`` (written by ``bash benchmarks/gpu_run.sh --tune``) lists, per
kernel, the winning configuration for each measured shape, under the key the kernel's
planner looks up (``LaunchPlan.tuned_key``). A planner takes the card's table as part of
its ``Target`` and falls back to its heuristics where the table says nothing. Nothing is
autotuned at import or on a user's first call.

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

# realpath: however the package is laid out (editable install, or gpu_run.sh's fallback that
# links kernels/ into a temporary package), this is the repository's kernels/tuned/.
TUNED_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "tuned")


@functools.lru_cache(maxsize=None)
def table(arch: str) -> dict:
    """The committed configurations for one architecture ({} when none were measured)."""
    path = os.path.join(TUNED_DIR, f"{arch}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("configs", {})


def choice(name: str, target, **shape) -> str:
    """"fused" or "unfused": which implementation of a fused op measured faster on the card."""
    from .launch import lookup, table_key
    entry = lookup(target, table_key(name, **shape))
    return entry.get("impl", "fused") if entry is not None else "fused"
