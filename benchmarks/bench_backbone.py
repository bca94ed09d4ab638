"""Whole-backbone benchmarks: bf16 inference in the upstream segmentation configurations.

Paths: the reference, the fast path, torch.compile of the reference (max-autotune-no-
cudagraphs and default), and the fast path replayed from a CUDA graph. Random weights
(never zeros: they run faster than real data). Reports images/s, ms per image,
achieved TFLOP/s from counted FLOPs, its fraction of the measured matmul ceiling, and
peak memory. On CPU: the same code on the small preset through the interpreter.
"""
import pytest
import torch

from benchmarks import harness
from internvit_fast import InternViT6B
from internvit_fast.presets import PRESETS, flops_per_image

if harness.CUDA:
    CONFIGS, BATCHES = ["upernet", "linear"], [4, 1, 2, 8]
else:
    CONFIGS, BATCHES = ["small"], [1]
PATHS = ["reference", "fast", "compile-max-autotune", "compile-default", "fast-cudagraph"]

_models = {}


def model_for(config: str, fast: bool) -> InternViT6B:
    """One set of random weights per configuration, shared by the reference and fast models."""
    key = (config, fast)
    if key not in _models:
        for k in [k for k in _models if k[0] != config]:  # one 12 GB model pair on the card at a time
            del _models[k]
        torch.cuda.empty_cache() if harness.CUDA else None
        cfg = PRESETS[config]
        with torch.device(harness.DEVICE):
            torch.manual_seed(0)
            model = InternViT6B(**cfg, fast=fast, with_cp=False).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim == 1:
                        p.uniform_(0.5, 1.5)  # norms and gammas: non-trivial, never zeros
        _models[key] = model
    return _models[key]


def _forward_fn(config: str, path: str):
    if path == "fast-cudagraph" and not harness.CUDA:
        pytest.skip("CUDA graphs need a GPU")
    model = model_for(config, fast=path.startswith("fast"))
    if path == "compile-max-autotune":
        return harness.compile_fn(model, "max-autotune-no-cudagraphs")
    if path == "compile-default":
        return harness.compile_fn(model, "default")
    return model


def _cuda_graph(fn, example):
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(x):
        static_in.copy_(x)
        graph.replay()
        return static_out
    return replay


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("config", CONFIGS)
def test_backbone(benchmark, ceilings, config, batch, path):
    cfg = PRESETS[config]
    size = cfg["img_size"]
    fn = _forward_fn(config, path)
    imgs = [torch.randn(batch, 3, size, size, device=harness.DEVICE) for _ in range(2)]
    if harness.CUDA:
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        if path == "fast-cudagraph":
            fn = _cuda_graph(fn, imgs[0])
        stats = benchmark.pedantic(lambda: harness.median_ms(lambda i: fn(imgs[i % 2]), warmup=2,
                                                             repeats=5 if harness.CUDA else 2),
                                   rounds=1, iterations=1)
        outs = fn(imgs[0])
    assert all(torch.isfinite(o).all() for o in outs)
    sec = stats["ms"] * 1e-3
    tflops = flops_per_image(cfg) * batch / sec / 1e12
    harness.record(benchmark, **stats, config=config, batch=batch, path=path, images_per_s=batch / sec,
                   ms_per_image=stats["ms"] / batch, tflops=tflops,
                   frac_matmul=tflops / ceilings["matmul_tflops"],
                   peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if harness.CUDA else None, **ceilings)
