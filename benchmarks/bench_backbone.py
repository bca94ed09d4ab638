"""Whole-backbone benchmarks: bf16 inference in the upstream segmentation configurations.

Paths: the reference (SDPA attention; at batch 1 also the naive attention), the fast
path, torch.compile of the reference (default, and max-autotune-no-cudagraphs) and of the
fast model (default), the fast path replayed from a CUDA graph, and the fast path of the
same weights converted to FP8 (``precision="fp8"``, on cards with FP8 tensor cores). Every SDPA path runs
under the same backend order (attention.py: cuDNN first on sm_90, compiled graphs too),
and each record names the attention kernels its path really launched (from a profile).
One pytest-benchmark group per configuration and batch. Random weights (never zeros: they
run faster than real data). Each record carries the FLOPs and the peak memory; gpu_run
derives images/s, TFLOP/s and the fraction of the measured matmul ceiling.

Checks (tests, not timings): at full size the fast and reference paths against an fp32
model (the parity rule), and a profile of where each path spends its time. On CPU: the
same code on the small preset through the interpreter.
"""
import contextlib

import pytest
import torch

from benchmarks import harness
from internvit_fast import InternViT6B
from internvit_fast.kernels import parity
from internvit_fast.graphs import capture
from internvit_fast.segmentation.presets import PRESETS, flops_per_image

if harness.CUDA:
    CONFIGS, BATCHES, MAIN = ["upernet", "linear"], [4, 1, 2, 8], "upernet"
else:
    CONFIGS, BATCHES, MAIN = ["small"], [1], "small"
MAIN_BATCH = 4 if harness.CUDA else 1
# fast-fp8: FP8 GEMMs and FP8 attention (fp8_attention=True); fast-fp8-bf16-attn: FP8 GEMMs only
PATHS = ["reference", "fast", "compile-default", "compile-fast", "fast-cudagraph", "compile-max-autotune", "fast-fp8",
         "fast-fp8-bf16-attn"]
CASES = [(c, b, p) for c in CONFIGS for b in BATCHES for p in PATHS] + [(MAIN, 1, "reference-naive-attn")]

_models, _compiled, _fp8_models = {}, {}, {}


def model_for(config: str) -> InternViT6B:
    """One bf16 model per configuration (random weights), shared by every path."""
    if config not in _models:
        _models.clear()  # one 12 GB model on the card at a time
        _compiled.clear()
        _fp8_models.clear()
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


def fp8_model_for(config: str) -> InternViT6B:
    """The same weights with precision="fp8" (quantized as they load: 6 GB beside the bf16 model)."""
    if harness.CUDA and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("not measured: FP8 needs FP8 tensor cores (sm_89 or later)")
    if config not in _fp8_models:
        src = model_for(config)
        with torch.device(harness.DEVICE):
            model = InternViT6B(**PRESETS[config], with_cp=False, precision="fp8").eval()
        model.load_state_dict(src.state_dict())
        _fp8_models[config] = model
    return _fp8_models[config]


@contextlib.contextmanager
def path_settings(model: InternViT6B, fast: bool = False, naive_attn: bool = False, fp8_attention=None):
    """Set the fast switch, the attention backend and (an FP8 model) FP8 attention for one path;
    restore them after."""
    saved = model.fast, [b.attn.use_flash_attn for b in model.blocks], model.fp8_attention
    model.fast, model.fp8_attention = fast, fp8_attention
    for b in model.blocks:
        b.attn.use_flash_attn = not naive_attn
    try:
        yield model
    finally:
        model.fast, model.fp8_attention = saved[0], saved[2]
        for b, flag in zip(model.blocks, saved[1]):
            b.attn.use_flash_attn = flag


def _forward_fn(config: str, path: str, example: torch.Tensor, model: InternViT6B):
    if path.startswith("compile"):
        # compile-fast: the same model with fast=True (path_settings), traced through the custom ops
        mode = "max-autotune-no-cudagraphs" if path == "compile-max-autotune" else "default"
        if (config, path) not in _compiled:
            _compiled[config, path] = harness.compile_fn(model, mode)
        return _compiled[config, path]
    if path == "fast-cudagraph":
        if not harness.CUDA:
            pytest.skip("not measured: CUDA graphs need a GPU")
        static_in = example.clone()
        replay, static_out = capture(lambda: model(static_in), static_in.device)

        def graphed(x):
            static_in.copy_(x)
            replay()
            return static_out
        return graphed
    return model


@pytest.mark.slow
@pytest.mark.parametrize("config, batch, path", harness.params(
    CASES, ["-".join((c, f"b{b}", p)) for c, b, p in CASES], group=lambda c, b, p: f"backbone {c} b{b}",
    kind="forward"))
def test_backbone(bench, config, batch, path):
    cfg = PRESETS[config]
    size = cfg["img_size"]
    model = fp8_model_for(config) if path.startswith("fast-fp8") else model_for(config)
    imgs = [torch.randn(batch, 3, size, size, device=harness.DEVICE) for _ in range(2)]
    fast = path.startswith("fast") or path == "compile-fast"
    fp8_attention = {"fast-fp8": True, "fast-fp8-bf16-attn": False}.get(path)
    with path_settings(model, fast=fast, naive_attn=path.endswith("naive-attn"), fp8_attention=fp8_attention), \
            torch.inference_mode():
        fn = _forward_fn(config, path, imgs[0], model)
        fn(imgs[1])  # compiles (torch.compile, Triton JIT) outside the timed rounds
        if harness.CUDA:
            torch.cuda.reset_peak_memory_stats()
        calls = [0]

        def target():
            calls[0] += 1
            return fn(imgs[calls[0] % 2])

        outs = bench(target)
        kernels = harness.attention_kernels(lambda: fn(imgs[0]))
    assert all(torch.isfinite(o).all() for o in outs)
    harness.record(bench, config=config, batch=batch, path=path, flops=flops_per_image(cfg) * batch,
                   attention_kernels=kernels,
                   peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if harness.CUDA else None)


def test_full_size_parity(record_check):
    """At the real size: reference (SDPA and naive attention) and fast path against fp32.

    The parity rule of the kernel tests, on the whole backbone: the fast path's error
    against an fp32 model with the same weights is at most twice the bf16 reference's,
    plus 1e-3 of the output scale.
    """
    model = model_for(MAIN)
    size = PRESETS[MAIN]["img_size"]
    img = torch.randn(1, 3, size, size, device=harness.DEVICE)
    res = {}
    with torch.inference_mode():
        for name, kw in [("sdpa", {}), ("naive", dict(naive_attn=True)), ("fast", dict(fast=True))]:
            with path_settings(model, **kw):
                res[name] = model(img)
    with torch.device(harness.DEVICE):
        exact_model = InternViT6B(**PRESETS[MAIN], with_cp=False, dtype=torch.float32).eval()
    exact_model.load_state_dict(model.state_dict())
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the convolutions too, in real fp32
    try:
        with torch.inference_mode():
            res["exact"] = exact_model(img)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        del exact_model
    scale = max(o.abs().max().item() for o in res["exact"])
    verdicts = {name: parity.check(res[name], res["exact"], res["sdpa"], atol=1e-3 * scale)
                for name in ("naive", "fast")}
    record_check(check="full_size_parity", config=MAIN, max_abs_out=scale,
                 err_sdpa=parity.max_abs_err(res["sdpa"], res["exact"]),
                 **{f"err_{k}": v.err for k, v in verdicts.items()})
    for name, verdict in verdicts.items():
        assert verdict.ok, f"{name}: {verdict}"


def test_fp8_features(record_check):
    """precision="fp8" against bf16 on the same weights at full size, per out_index (relative
    L2 error and cosine of the features; float64 does not fit beside a 6B model): what
    internvit-fast precision prints, on random weights; with bf16 attention (``rows``) and
    with FP8 attention (``rows_fp8_attention``)."""
    model, fp8 = model_for(MAIN), fp8_model_for(MAIN)
    size = PRESETS[MAIN]["img_size"]
    img = torch.randn(1, 3, size, size, device=harness.DEVICE)
    from internvit_fast.cli.precision import compare
    with path_settings(model, fast=True), torch.inference_mode():
        ref = [r.double() for r in model(img)]
    rows = {}
    for fa in (False, True):
        with path_settings(fp8, fast=True, fp8_attention=fa), torch.inference_mode():
            rows[fa] = compare([g.double() for g in fp8(img)], ref)
    record_check(check="fp8_features", config=MAIN, out_indices=list(model.out_indices), rows=rows[False],
                 rows_fp8_attention=rows[True])
    assert all(r["cos"] > 0.99 for r in rows[False]), rows
    assert all(r["cos"] > 0.995 and r["rel"] < 0.08 for r in rows[True]), rows


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_profile(record_check, path):
    """Where one forward spends its time: the top kernels by device time (or CPU time)."""
    model = model_for(MAIN)
    size = PRESETS[MAIN]["img_size"]
    img = torch.randn(MAIN_BATCH, 3, size, size, device=harness.DEVICE)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if harness.CUDA else [])
    with path_settings(model, fast=path == "fast"), torch.inference_mode():
        model(img)
        harness.sync()
        with torch.profiler.profile(activities=acts) as prof:
            model(img)
            harness.sync()
    if harness.CUDA:  # the kernels themselves: an operator's total would count its kernels again
        attr = "device_time_total"
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        attr = "self_cpu_time_total"
        events = list(prof.key_averages())
    events = [e for e in events if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:12]
    record_check(check="profile", config=MAIN, batch=MAIN_BATCH, profiled_path=path, total_ms=total / 1e3,
                 top=[{"name": e.key[:90], "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
                       "calls": e.count} for e in top])
    # The profile is of the path it names: our ops appear in the fast one and only there.
    ours = [e.key for e in prof.key_averages() if e.key.startswith("internvit_fast::") or "_linear_kernel" in e.key]
    assert bool(ours) == (path == "fast"), ours[:5]


TRAIN_PATHS = ["reference", "fast", "compile-default"]
TRAIN_BATCH = 2 if harness.CUDA else 1


@pytest.mark.slow
@pytest.mark.parametrize("path", harness.params([(p,) for p in TRAIN_PATHS], TRAIN_PATHS,
                                                group=lambda p: f"training {MAIN} b{TRAIN_BATCH}", kind="slow"))
def test_training_step(bench, path):
    """One forward and backward of the backbone (no optimizer step), bf16, with_cp as upstream
    trains it, at 504x504 batch 2 (the per-GPU batch of upstream's recipes)."""
    cfg = PRESETS[MAIN]
    model = model_for(MAIN)
    saved_cp = [b.with_cp for b in model.blocks]
    imgs = [torch.randn(TRAIN_BATCH, 3, cfg["img_size"], cfg["img_size"], device=harness.DEVICE) for _ in range(2)]
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

            target()  # compiles outside the timed rounds
            if harness.CUDA:
                torch.cuda.reset_peak_memory_stats()
            bench(target)
    finally:
        model.eval()
        for b, flag in zip(model.blocks, saved_cp):
            b.with_cp = flag
    harness.record(bench, config=MAIN, batch=TRAIN_BATCH, path=path,
                   flops=3 * flops_per_image(cfg) * TRAIN_BATCH,
                   peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if harness.CUDA else None)
