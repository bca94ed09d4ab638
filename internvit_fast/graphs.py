"""CUDA graphs of the backbone's forward, one per input shape: ``InternViT6B(cuda_graphs=N)``.

A forward of the 504x504 backbone launches hundreds of kernels; with small batches (the
sliding windows of one image) the CPU spends as long launching them as the GPU spends
running them. A CUDA graph records one forward's launches for a fixed input shape and
replays them with one launch. ``GraphCache`` keeps the graphs of the last ``N`` input
signatures (shape, dtype, device, the fast switch, the parameters' addresses); a new
signature beyond ``N`` drops the least recently used graph and its memory.

Memory: each graph owns a private pool as large as one eager forward's peak of
intermediate tensors (for 504x504 batch 4 in bf16, some hundreds of MB; the GPU run
records peak memory with graphs), plus its input and output buffers. ``N`` graphs hold N
such pools.

Replays only where the captured forward is the forward that would run: CUDA inputs, no
gradient needed through the model (nothing in it requires grad, or grad mode is off), not
while torch.compile traces, and not with active stochastic depth. Anything else runs the
eager forward, so training and odd calls work unchanged. Outputs are copies: a later replay
does not overwrite what a caller holds.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, List, Tuple

import torch
from torch import nn


def graphable_device(x: torch.Tensor) -> bool:
    return x.is_cuda


def needs_eager(model: nn.Module, x: torch.Tensor) -> str:
    """Why this call cannot replay a graph ('' when it can)."""
    if not graphable_device(x):
        return "input not on a CUDA device"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.parameters())):
        return "gradients are needed"
    if model.training and any(getattr(m, "drop_prob", 0.0) > 0 for m in model.modules()):
        return "stochastic depth is active"
    return ""


def capture(fn: Callable[[], object], device: torch.device, pool=None) -> Tuple[Callable[[], None], object]:
    """Record ``fn()`` into a CUDA graph; return (replay, the graph's outputs).

    The one capture helper of the project (the graph cache and the benchmarks use it).
    Warm-up runs on a side stream first (kernel compilation, cuBLAS workspaces), as torch's
    CUDA-graph notes prescribe; ``pool`` shares a memory pool between graphs."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_out = fn()
    return graph.replay, static_out


class GraphCache:
    """Graphs of one model's forward, keyed by input signature; at most ``max_graphs``."""

    def __init__(self, max_graphs: int):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[tuple, tuple]" = OrderedDict()
        self.captures = 0  # how many graphs were recorded (for tests and reports)

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()

    @staticmethod
    def signature(model: nn.Module, x: torch.Tensor) -> tuple:
        """Everything that changes what a forward computes, so a graph is replayed only for
        the computation it recorded."""
        # Parameter addresses: a graph reads weights where they were at capture; a model
        # moved or re-allocated since then needs a new graph (in-place loads keep them valid).
        weights = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
        dev = x.device.type
        # Autocast changes every op's dtype; the math-mode switches change which kernels
        # cuBLAS, cuDNN and SDPA pick (a graph replays the picks made at capture).
        amp = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
               else None, torch.is_autocast_cache_enabled())
        cuda_backends = torch.backends.cuda
        modes = (torch.get_float32_matmul_precision(), cuda_backends.matmul.allow_tf32,
                 torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled,
                 cuda_backends.matmul.allow_fp16_reduced_precision_reduction,
                 cuda_backends.matmul.allow_bf16_reduced_precision_reduction,
                 cuda_backends.flash_sdp_enabled(), cuda_backends.mem_efficient_sdp_enabled(),
                 cuda_backends.math_sdp_enabled(), cuda_backends.cudnn_sdp_enabled(),
                 torch.are_deterministic_algorithms_enabled())
        # What the model is told to compute: its attributes that steer forward.
        config = (getattr(model, "fast", None), tuple(getattr(model, "out_indices", ())),
                  getattr(model, "with_fpn", None), model.training,
                  tuple(getattr(m, "use_flash_attn", None) for m in model.modules() if hasattr(m, "use_flash_attn")),
                  tuple(getattr(m, "fp8_attention", None) for m in model.modules() if hasattr(m, "fp8_attention")),
                  tuple(p.dtype for p in model.parameters())[:1])
        return (tuple(x.shape), x.dtype, x.device, x.stride(), hash(weights), amp, modes, config)

    def run(self, model: nn.Module, fn: Callable[[torch.Tensor], List[torch.Tensor]],
            x: torch.Tensor) -> List[torch.Tensor]:
        key = self.signature(model, x)
        hit = self._graphs.get(key)
        if hit is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)  # drops the graph and its memory pool
            static_in = x.detach().clone()
            with torch.no_grad():
                replay, static_out = capture(lambda: fn(static_in), static_in.device)
            hit = (static_in, replay, static_out)
            self._graphs[key] = hit
            self.captures += 1
        else:
            self._graphs.move_to_end(key)
        static_in, replay, static_out = hit
        static_in.copy_(x)
        replay()
        return [o.clone() for o in static_out]
