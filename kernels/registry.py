"""What each kernel file states about itself, in one shape, so the tools can loop over them.

Every kernel module defines ``SPEC = KernelSpec(...)`` (some define more: one kernel
launched two ways). ``internvit_fast.kernels.REGISTRY`` lists them; the compile gate,
the tuner, the kernel benchmarks and the tests iterate over it instead of naming
kernels as strings. A spec states only what cannot be derived: example inputs, the
reference, how to launch with an explicit configuration, the tuner's candidates, and its
planner applied to the segmentation shapes (``plans``: what the gate builds, made by the
same function the launcher calls) and to given inputs (``plan_for``: the tuned-table key).

A ``Shape`` is one launch of the fast path: ``rows`` tokens (1297 x batch at 504x504),
the model width, the MLP width, the activation dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

EMBED, HIDDEN, HEAD_DIM = 3200, 12800, 128
TOKENS_504, TOKENS_448 = 1297, 1025
BATCHES = (1, 2, 4, 8)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}  # activations


@dataclass(frozen=True)
class Shape:
    rows: int
    width: int = EMBED
    hidden: int = HIDDEN
    dtype: torch.dtype = torch.bfloat16

    @property
    def el(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    def label(self) -> str:
        return f"{DTYPE_NAMES[self.dtype]} M={self.rows}"

    def sequences(self) -> Tuple[int, int]:
        """(batch, tokens) of the rows for the ops that see sequences (attention): a batch of
        504 or 448 crops where the rows are one, else one sequence of all the rows."""
        for tokens in (TOKENS_504, TOKENS_448):
            if self.rows % tokens == 0:
                return self.rows // tokens, tokens
        return 1, self.rows

    def heads(self) -> Tuple[int, int]:
        """(heads, head dim) attention runs at: InternViT's heads of 128 where the width takes
        them, else heads of 32 (the small test widths), at least one."""
        dim = HEAD_DIM if self.width % HEAD_DIM == 0 else 32
        return max(1, self.width // dim), dim


def segmentation_shapes(dtypes=(torch.bfloat16, torch.float16, torch.float32)) -> List[Shape]:
    """The launches of the fast path at 504x504 and 448x448, batch 1 to 8."""
    return [Shape(t * b, dtype=dt) for dt in dtypes for t in (TOKENS_504, TOKENS_448) for b in range(1, 9)]


def main_shape() -> Shape:
    """UPerNet at 504x504, batch 4, bf16: the shape the project's targets are stated at."""
    return Shape(TOKENS_504 * 4)


def smoke_shape() -> Shape:
    """A tiny stand-in (17 tokens, width 96, MLP 384) for CPU runs through the interpreter."""
    return Shape(17, 96, 384)


@dataclass
class Choice:
    """A fused op and its unfused alternative, which the tuner times against each other.

    Both take the inputs dict and return the outputs the op is judged by.
    ``fused(inputs, config)`` runs with an explicit launch configuration.
    """
    fused: Callable[[dict, Optional[dict]], Dict[str, torch.Tensor]]
    unfused: Callable[[dict], Dict[str, torch.Tensor]]
    describe_unfused: str
    # judge(outputs, inputs) for the unfused alternative where it states other numerics than
    # the spec's own (bf16 attention beside FP8 attention); None: the spec's judge or reference
    unfused_judge: Optional[Callable[[dict, dict], None]] = None


@dataclass
class KernelSpec:
    name: str  # the custom op torch.ops.internvit_fast.<name> and the tuned-table key
    math: str  # one line: what it computes
    promises_rounding: bool  # rounds where upstream's eager ops round: built without FMA contraction
    make_inputs: Callable[[Shape, torch.device], dict]
    new_outputs: Callable[[dict], Dict[str, torch.Tensor]]  # NaN-poisoned buffers
    launch: Callable[[dict, dict, Optional[dict]], None]  # inputs, outputs, explicit config or None
    reference: Callable[[dict], Dict[str, torch.Tensor]]  # plain torch, in the inputs' dtype: the eager ops
    plans: Callable[[object], List[object]]  # Target -> every LaunchPlan the fast path makes at the segmentation shapes
    plan_for: Callable[[dict, object], object]  # (inputs, Target) -> the LaunchPlan the launcher makes for them
    candidates: Callable[[str], List[dict]]  # launch configurations the tuner tries, per arch
    choice: Optional[Choice] = None
    choice_reference: Optional[Callable[[dict], Dict[str, torch.Tensor]]] = None  # default: reference
    loads_first: bool = False  # a row kernel that issues every global load before its first store
    variant: str = ""  # one kernel launched at two layers' shapes (proj, fc2) has two specs
    # judge(outputs, inputs) asserts a launch's outputs where the parity rule against
    # ``reference`` is not the promise (FP8: equality for quantization, the parity rule on
    # dequantized values); None: the parity rule
    judge: Optional[Callable[[dict, dict], None]] = None
    training: bool = False  # a backward kernel: tuned after the inference kernels the targets are stated for
    # same_bits(rng) -> [(what, ours, reference, fp32 inputs)]: Triton functions of one fp32
    # value that must give the reference's bits for every one of the inputs, on the GPU; the
    # compile gate runs both compiled PTX programs on CPU to show it (tools/ptx_eval.py)
    same_bits: Optional[Callable[[object], List[Tuple[str, object, object, object]]]] = None

    @property
    def id(self) -> str:
        return f"{self.name}[{self.variant}]" if self.variant else self.name


def run(spec: KernelSpec, inputs: dict, config: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Launch ``spec`` on fresh NaN-poisoned outputs; return them."""
    outs = spec.new_outputs(inputs)
    spec.launch(inputs, outs, config)
    return outs


def float64(inputs: dict) -> dict:
    """The inputs in float64 (for a reference without rounding); non-tensors unchanged."""
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def nan_like(t: torch.Tensor, shape=None) -> torch.Tensor:
    return torch.full(tuple(shape if shape is not None else t.shape), float("nan"), dtype=t.dtype,
                      device=t.device)


def rand(shape, dtype, device, scale=1.0, offset=0.0) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * scale + offset).to(dtype)
