"""The project's parity rule, stated once.

A result computed in a low precision is judged against a float64 (or fp32) reference by the
error that plain PyTorch makes in that same precision (flash-attention's rule): the largest
absolute error of ``out`` must be at most twice that of ``same`` (torch's own computation in
the same dtype), plus ``atol``, and ``out`` holds no NaN. For fp32 the framework's own error
is at rounding level, so the rule means "close to rounding".

Used by the tests (``tests/helpers.assert_parity``), the quick-start CLI, the benchmarks'
checks and the tuner. Where the promise is equality (the residual stream, the rounding
points), tests assert equality instead: this rule cannot see a kernel that is *more*
accurate than upstream's rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class Verdict:
    ok: bool
    err: float  # max |out - exact|
    base: float  # max |same - exact|: the framework's own error
    allowed: float  # 2 * base + atol
    finite: bool

    def __str__(self) -> str:
        if not self.finite:
            return "NaN or inf in the output (an unwritten or invalid element)"
        return f"error {self.err:.3g} {'<=' if self.ok else '>'} 2 x torch's {self.base:.3g} + atol = {self.allowed:.3g}"


def _list(t: Tensors):
    return [t] if isinstance(t, torch.Tensor) else list(t)


def max_abs_err(a: Tensors, b: Tensors) -> float:
    return max((x.double() - y.double()).abs().max().item() if x.numel() else 0.0
               for x, y in zip(_list(a), _list(b)))


def check(out: Tensors, exact: Tensors, same: Tensors, atol: float) -> Verdict:
    """The rule over one tensor or a list of them (the max over all of them)."""
    outs, exacts, sames = _list(out), _list(exact), _list(same)
    if not (len(outs) == len(exacts) == len(sames)):
        raise ValueError(f"parity: {len(outs)} outputs, {len(exacts)} references, {len(sames)} same-dtype results")
    for o, e in zip(outs, exacts):
        if o.shape != e.shape:
            raise ValueError(f"parity: output shape {tuple(o.shape)} differs from the reference's {tuple(e.shape)}")
    finite = all(bool(torch.isfinite(o).all()) for o in outs)
    err = max_abs_err(outs, exacts) if finite else float("inf")
    base = max_abs_err(sames, exacts)
    allowed = 2 * base + atol
    return Verdict(finite and err <= allowed, err, base, allowed, finite)
