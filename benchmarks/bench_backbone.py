"""Whole-backbone benchmarks: bf16 inference in the upstream segmentation configurations.

Paths: the reference (SDPA attention; at batch 1 also the naive attention), the fast
path, torch.compile of the reference (max-autotune-no-cudagraphs and default) and of the
fast model (default), and the fast path replayed from a CUDA graph. Timed by
pytest-benchmark (rounds and warm-up rounds of one forward each, its clock synchronised
with the GPU). Random weights (never zeros: they run faster
than real data). Reports images/s, ms per image, achieved TFLOP/s from counted FLOPs,
its fraction of the measured matmul ceiling, and peak memory. Also, at full size: the
fast and reference paths against an fp32 model (the parity rule), and a profile of
where each path spends its time. On CPU: the same code on the small preset through
the interpreter.
"""
import contextlib

import pytest
import torch

from benchmarks import harness
from internvit_fast import InternViT6B
from internvit_fast.presets import PRESETS, flops_per_image

if harness.CUDA:
    CONFIGS, BATCHES, MAIN = ["upernet", "linear"], [4, 1, 2, 8], "upernet"
else:
    CONFIGS, BATCHES, MAIN = ["small"], [1], "small"
PATHS = ["reference", "fast", "fast-cudagraph", "compile-default", "compile-fast", "compile-max-autotune"]
CASES = [(c, b, p) for c in CONFIGS for b in BATCHES for p in PATHS] + [(MAIN, 1, "reference-naive-attn")]

_models, _compiled = {}, {}


def model_for(config: str) -> InternViT6B:
    """One bf16 model per configuration (random weights), shared by every path."""
    if config not in _models:
        _models.clear()  # one 12 GB model on the card at a time
        _compiled.clear()
        torch.cuda.empty_cache() if harness.CUDA else None
        with torch.device(harness.DEVICE):
            torch.manual_seed(0)
            model = InternViT6B(**PRESETS[config], with_cp=False).eval()
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim == 1:
                        p.uniform_(0.5, 1.5)  # norms and gammas: non-trivial, never zeros
        _models[config] = model
    return _models[config]


@contextlib.contextmanager
def path_settings(model: InternViT6B, fast: bool = False, naive_attn: bool = False):
    """Set the fast switch and the attention backend for one path; restore them after."""
    saved = model.fast, [b.attn.use_flash_attn for b in model.blocks]
    model.fast = fast
    for b in model.blocks:
        b.attn.use_flash_attn = not naive_attn
    try:
        yield model
    finally:
        model.fast = saved[0]
        for b, flag in zip(model.blocks, saved[1]):
            b.attn.use_flash_attn = flag


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


def _forward_fn(config: str, path: str, example: torch.Tensor):
    model = model_for(config)
    if path.startswith("compile"):
        # compile-fast: the same model with fast=True (path_settings), traced through the custom ops
        mode = "max-autotune-no-cudagraphs" if path == "compile-max-autotune" else "default"
        if (config, path) not in _compiled:
            _compiled[config, path] = harness.compile_fn(model, mode)
        return _compiled[config, path]
    if path == "fast-cudagraph":
        if not harness.CUDA:
            pytest.skip("CUDA graphs need a GPU")
        return _cuda_graph(model, example)
    return model


@pytest.mark.parametrize("config, batch, path", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_backbone(bench, ceilings, config, batch, path):
    cfg = PRESETS[config]
    size = cfg["img_size"]
    model = model_for(config)
    imgs = [torch.randn(batch, 3, size, size, device=harness.DEVICE) for _ in range(2)]
    if harness.CUDA:
        torch.cuda.reset_peak_memory_stats()
    fast = path.startswith("fast") or path == "compile-fast"
    with path_settings(model, fast=fast, naive_attn=path.endswith("naive-attn")), torch.inference_mode():
        fn = _forward_fn(config, path, imgs[0])
        calls = [0]

        def target():
            calls[0] += 1
            return fn(imgs[calls[0] % 2])

        bench.pedantic(target, rounds=5 if harness.CUDA else 2, warmup_rounds=2 if harness.CUDA else 1,
                       iterations=1)
        outs = fn(imgs[0])
    assert all(torch.isfinite(o).all() for o in outs)
    ms = harness.median_ms(bench)
    sec = ms * 1e-3
    tflops = flops_per_image(cfg) * batch / sec / 1e12
    harness.record(bench, ms=ms, config=config, batch=batch, path=path, images_per_s=batch / sec,
                   ms_per_image=ms / batch, tflops=tflops, frac_matmul=tflops / ceilings["matmul_tflops"],
                   peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if harness.CUDA else None, **ceilings)


def _err(out, exact):
    return max((o.double() - e.double()).abs().max().item() for o, e in zip(out, exact))


def test_full_size_parity(bench):
    """At the real size: reference (SDPA and naive attention) and fast path against fp32.

    The parity rule of the kernel tests, on the whole backbone: the fast path's error
    against an fp32 model with the same weights is at most twice the bf16 reference's.
    """
    model = model_for(MAIN)
    size = PRESETS[MAIN]["img_size"]
    img = torch.randn(1, 3, size, size, device=harness.DEVICE)

    def run():
        res = {}
        with torch.device(harness.DEVICE):
            exact_model = InternViT6B(**PRESETS[MAIN], with_cp=False, dtype=torch.float32).eval()
        exact_model.load_state_dict(model.state_dict())
        with torch.inference_mode():
            for name, kw in [("sdpa", {}), ("naive", dict(naive_attn=True)), ("fast", dict(fast=True))]:
                with path_settings(model, **kw):
                    res[name] = model(img)
            tf32 = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False  # the convolutions too, in real fp32
            try:
                res["exact"] = exact_model(img)
            finally:
                torch.backends.cudnn.allow_tf32 = tf32
            del exact_model
        return res

    res = bench.pedantic(run, rounds=1, iterations=1)
    shapes = [tuple(o.shape) for o in res["sdpa"]]
    for name in ("naive", "fast", "exact"):
        assert [tuple(o.shape) for o in res[name]] == shapes
    assert all(torch.isfinite(o).all() for r in res.values() for o in r)
    errs = {name: _err(res[name], res["exact"]) for name in ("sdpa", "naive", "fast")}
    scale = max(o.abs().max().item() for o in res["exact"])
    harness.record(bench, check="full_size_parity", config=MAIN, shapes=shapes, max_abs_out=scale,
                   **{f"err_{k}": v for k, v in errs.items()})
    assert errs["naive"] <= 2 * errs["sdpa"] + 1e-3 * scale, errs
    assert errs["fast"] <= 2 * errs["sdpa"] + 1e-3 * scale, errs


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_profile(bench, path):
    """Where one forward spends its time: the top kernels by device time (or CPU time)."""
    model = model_for(MAIN)
    size = PRESETS[MAIN]["img_size"]
    batch = 4 if harness.CUDA else 1
    img = torch.randn(batch, 3, size, size, device=harness.DEVICE)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if harness.CUDA else [])
    with path_settings(model, fast=path == "fast"), torch.inference_mode():
        model(img)
        harness.sync()

        def run():
            with torch.profiler.profile(activities=acts) as prof:
                model(img)
                harness.sync()
            return prof

        prof = bench.pedantic(run, rounds=1, iterations=1)
    if harness.CUDA:  # the kernels themselves: an operator's total would count its kernels again
        attr = "device_time_total"
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        attr = "self_cpu_time_total"
        events = list(prof.key_averages())
    events = [e for e in events if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:12]
    harness.record(bench, check="profile", config=MAIN, batch=batch, profiled_path=path,
                   total_ms=total / 1e3,
                   top=[{"name": e.key[:90], "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
                         "calls": e.count} for e in top])
    # The profile is of the path it names: our ops appear in the fast one and only there.
    ours = [e.key for e in prof.key_averages() if e.key.startswith("internvit_fast::") or "_linear_kernel" in e.key]
    assert bool(ours) == (path == "fast"), ours[:5]


TRAIN_PATHS = ["reference", "fast", "compile-default"]


@pytest.mark.parametrize("path", TRAIN_PATHS)
def test_training_step(bench, ceilings, path):
    """One forward and backward of the backbone (no optimizer step), bf16, with_cp as upstream
    trains it, at 504x504 batch 2 (the per-GPU batch of upstream's recipes)."""
    config, batch = (MAIN, 2) if harness.CUDA else (MAIN, 1)
    cfg = PRESETS[config]
    model = model_for(config)
    saved_cp = [b.with_cp for b in model.blocks]
    imgs = [torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], device=harness.DEVICE) for _ in range(2)]
    if harness.CUDA:
        torch.cuda.reset_peak_memory_stats()
    try:
        for b in model.blocks:
            b.with_cp = True
        model.train()
        with path_settings(model, fast=path == "fast"):
            fn = harness.compile_fn(model, "default") if path.startswith("compile") else model
            calls = [0]

            def target():
                calls[0] += 1
                outs = fn(imgs[calls[0] % 2])
                sum(o.float().square().mean() for o in outs).backward()
                model.zero_grad(set_to_none=True)

            bench.pedantic(target, rounds=3 if harness.CUDA else 1, warmup_rounds=1, iterations=1)
    finally:
        model.eval()
        for b, flag in zip(model.blocks, saved_cp):
            b.with_cp = flag
    ms = harness.median_ms(bench)
    harness.record(bench, check="training", config=config, batch=batch, path=path, ms=ms,
                   images_per_s=batch / (ms * 1e-3), tflops=3 * flops_per_image(cfg) * batch / (ms * 1e-3) / 1e12,
                   peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if harness.CUDA else None, **ceilings)
