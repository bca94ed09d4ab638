"""Launch plans: what a launcher decides, as a value.

A kernel file's planner is a pure function from what a launch depends on (its operands'
shapes, dtypes, strides and alignment as ``Meta``, the card as ``Target``: architecture,
SM count and tuned table) to a ``LaunchPlan``: the @triton.jit function, the grid, the
constexprs, the launch options (``num_warps``, ``num_stages``, ``enable_fp_fusion``), the
runtime arguments' types, and the tuned-table key it looked up. The launcher plans from
its real tensors and runs the plan; the compile gate builds the plans the same planners
make for the segmentation shapes (``plan.source()`` is the ahead-of-time build of exactly
what ``plan.run`` launches); the tuner writes under ``plan.tuned_key``. Nothing about a
launch is written twice.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import INTERPRETING, INTERPRETER_SMS

_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
          torch.int32: "i32"}


@dataclass(frozen=True)
class Meta:
    """What a plan needs to know of a tensor (never its data)."""
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype
    aligned: bool = True  # data pointer 16-byte aligned (Triton's JIT marks such pointers)

    @staticmethod
    def of(t: torch.Tensor) -> "Meta":
        return Meta(tuple(t.shape), tuple(t.stride()), t.dtype, t.data_ptr() % 16 == 0)

    @staticmethod
    def contiguous(shape: Sequence[int], dtype: torch.dtype) -> "Meta":
        shape = tuple(shape)
        stride, s = [], 1
        for n in reversed(shape):
            stride.append(s)
            s *= max(n, 1)
        return Meta(shape, tuple(reversed(stride)), dtype, True)

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    def tma_ok(self) -> bool:
        """Hopper's TMA rules for a 2-D operand: unit column stride, base address and row
        pitch multiples of 16 bytes (cuTensorMapEncodeTiled)."""
        return (len(self.shape) == 2 and self.stride[1] == 1 and self.aligned
                and (self.stride[0] * self.element_size) % 16 == 0)


@dataclass(frozen=True)
class Target:
    """The card a plan is for: its architecture ("sm90", "sm80", or "interpreter"), SM count
    and tuned table (kernels/tuned/<arch>.json, {} when none)."""
    arch: str
    sms: int
    table: Dict = field(default_factory=dict, hash=False, compare=False)

    @staticmethod
    def of(device: torch.device) -> "Target":
        if device.type != "cuda":
            arch = "interpreter" if INTERPRETING else "cpu"
            return Target(arch, INTERPRETER_SMS, table(arch))  # a table here only in tests
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm{major}{minor}"
        return Target(arch, torch.cuda.get_device_properties(device).multi_processor_count, table(arch))

    @property
    def hopper(self) -> bool:
        return self.arch.startswith("sm") and self.arch[2:].isdigit() and int(self.arch[2:]) >= 90


@dataclass(frozen=True)
class Desc:
    """A runtime argument passed as a TMA tensor descriptor of ``block`` over a tensor."""
    meta: Meta
    block: Tuple[int, ...]


# The plans launched, when a test records them (``recording``).
_RECORDED: Optional[List["LaunchPlan"]] = None


@dataclass
class LaunchPlan:
    fn: object  # the @triton.jit function
    grid: Tuple[int, ...]
    args: Dict[str, object]  # runtime arguments in the kernel's order: Meta, Desc, int or float
    constexprs: Dict[str, object]
    options: Dict[str, object]  # num_warps, num_stages, enable_fp_fusion
    flags: Dict[str, object]  # the constexprs that choose a variant, whatever the shape (HAS_*, EPILOGUE)
    tuned_key: Optional[Tuple[str, Tuple]] = None  # (table name, shape items) the planner looked up
    tuned: bool = False  # whether the table had an entry there
    label: str = ""

    @property
    def function(self) -> str:
        return self.fn.fn.__name__

    @property
    def dtype(self) -> torch.dtype:
        first = next(v for v in self.args.values() if isinstance(v, (Meta, Desc)))
        return first.dtype if isinstance(first, Meta) else first.meta.dtype

    def variant(self) -> tuple:
        """What tells this build from another beyond the shape: the function, its flags, the
        dtype and the FP contraction setting."""
        return (self.function, tuple(sorted(self.flags.items())), _DTYPE[self.dtype],
                bool(self.options.get("enable_fp_fusion", True)))

    def signature(self) -> Tuple[Dict[str, str], Dict[tuple, list]]:
        """The ahead-of-time signature of the runtime arguments, marked as Triton's JIT marks
        them at launch: 16-byte-aligned pointers and integers divisible by 16."""
        sig, attrs = {}, {}
        names = list(self.fn.arg_names)
        for name, v in self.args.items():
            i = names.index(name)
            if isinstance(v, Desc):
                sig[name] = f"tensordesc<{_DTYPE[v.meta.dtype]}[{', '.join(map(str, v.block))}]>"
            elif isinstance(v, Meta):
                sig[name] = f"*{_DTYPE[v.dtype]}"
                if v.aligned:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        for name in self.constexprs:
            sig[name] = "constexpr"
        return sig, attrs

    def source(self):
        """The plan as triton.compile's ahead-of-time source (what the compile gate builds)."""
        from triton.compiler import ASTSource
        sig, attrs = self.signature()
        return ASTSource(fn=self.fn, signature=sig, constexprs=dict(self.constexprs), attrs=attrs)

    def run(self, **tensors) -> None:
        """Launch the plan on these tensors (or descriptors), one for each tensor argument it
        describes; its integers and floats are the plan's own."""
        want = {k for k, v in self.args.items() if isinstance(v, (Meta, Desc))}
        if set(tensors) != want:
            raise TypeError(f"{self.function}: the plan takes tensors {sorted(want)}, got {sorted(tensors)}")
        if _RECORDED is not None:
            _RECORDED.append(self)
        scalars = {k: v for k, v in self.args.items() if k not in want}
        self.fn[self.grid](**tensors, **scalars, **self.constexprs, **self.options)

    def descriptor(self, name: str, t: torch.Tensor):
        """The TMA descriptor this plan launches with for argument ``name`` over ``t``."""
        from triton.tools.tensor_descriptor import TensorDescriptor
        return TensorDescriptor.from_tensor(t, list(self.args[name].block))


class recording:
    """``with recording() as plans:`` collects every plan launched inside (for tests)."""

    def __enter__(self) -> List[LaunchPlan]:
        global _RECORDED
        self._saved, _RECORDED = _RECORDED, []
        return _RECORDED

    def __exit__(self, *exc):
        global _RECORDED
        _RECORDED = self._saved


def table_key(name: str, **shape) -> Tuple[str, Tuple]:
    """A tuned-table key: the kernel's table name and its shape (dtypes by their short names)."""
    return name, tuple(sorted((k, _DTYPE.get(v, v)) for k, v in shape.items()))


def lookup(target: Target, key: Tuple[str, Tuple]) -> Optional[dict]:
    """The tuned entry for ``key`` in the target's table: every shape value but M must match;
    among those entries the nearest M wins. None when the table has none."""
    name, items = key
    want = dict(items)
    best, best_dist = None, None
    for entry in target.table.get(name, []):
        have = entry["shape"]
        if set(have) != set(want) or any(have[k] != v for k, v in want.items() if k != "M"):
            continue
        dist = abs(have.get("M", 0) - want.get("M", 0))
        if best_dist is None or dist < best_dist:
            best, best_dist = entry, dist
    return best


# --- the tuned tables -----------------------------------------------------------------------
#
# Tuned launch configurations, measured on a card and committed per architecture.
#
# ``kernels/tuned/sm90.json`` (written by ``bash benchmarks/gpu_run.sh --tune``) lists, per
# kernel, the winning configuration for each measured shape, under the key the kernel's
# planner looks up (``LaunchPlan.tuned_key``). A planner takes the card's table as part of
# its ``Target`` and falls back to its heuristics where the table says nothing. Nothing is
# autotuned at import or on a user's first call.
#
# File format::
#
#     {"arch": "sm90", "card": "...", "date": "...", "command": "...",
#      "configs": {"linear_gelu": [{"shape": {"M": 5188, "N": 12800, "K": 3200, "dtype": "bf16"},
#                                   "config": {"BLOCK_M": 128, ..., "num_warps": 8, "num_stages": 3},
#                                   "impl": "fused", "ms": {"fused": 0.61, "unfused": 0.70}}],
#                  "rms_norm": [{"shape": {"M": 1297, "N": 3200, "dtype": "bf16"}, "config": {"num_warps": 16}}]}}
#
# ``impl`` (fused ops that have an unfused alternative) names the implementation that
# measured faster at that shape: ``choice`` returns it, "fused" where nothing was measured.

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
    entry = lookup(target, table_key(name, **shape))
    return entry.get("impl", "fused") if entry is not None else "fused"
