"""The command-line entry points: the quick-start CLI, the compile gate, the GPU run's smoke mode, the plot."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None, timeout=900):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_default_compares_reference_and_fast_paths_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the default on a GPU is the full 6B configuration (run by gpu_run.sh)")
    p = run("-m", "internvit_fast", env={"TRITON_INTERPRET": "0"})  # it turns the interpreter on itself
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "InternViT6B small on cpu, bf16, batch 1, 56x56, random weights" in out
    assert "(1, 96, 2, 2)" in out and "parity: ok" in out and "not a speed figure" in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("reference ", "fast "))]
    assert [r[0] for r in rows] == ["reference", "fast"] and all(float(r[-1]) > 0 for r in rows)


@pytest.mark.slow
def test_cli_json_with_checkpoint_and_image(tmp_path):
    from PIL import Image

    from helpers import small_model
    m = small_model(dtype=torch.float32, out_indices=[0, 1, 2, 3], with_fpn=True)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    Image.fromarray((torch.rand(90, 120, 3) * 255).byte().numpy()).save(tmp_path / "cat.png")
    p = run("-m", "internvit_fast", "--config", "small", "--batch", "2", "--checkpoint", str(tmp_path / "w.pth"),
            "--image", str(tmp_path / "cat.png"), "--json", env={"TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["parity"]["ok"] and res["interpreter"] and res["batch"] == 2
    assert res["features"][0] == [2, 96, 16, 16] and [r["path"] for r in res["paths"]] == ["reference", "fast"]
    assert all(r["max_err_vs_fp32"] >= 0 for r in res["paths"])


def test_cli_image_preprocessing_matches_upstream_normalisation(tmp_path):
    from PIL import Image

    from internvit_fast.cli.images import load_image
    from internvit_fast.segmentation.segmentor import MEAN, STD
    Image.fromarray(torch.full((40, 80, 3), 200, dtype=torch.uint8).numpy()).save(tmp_path / "flat.png")
    x = load_image(str(tmp_path / "flat.png"), 28)
    assert x.shape == (3, 28, 28)
    want = torch.tensor([(200 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1, 1).expand(3, 28, 28)
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_checkpoint_that_does_not_fit_is_one_line_and_exit_2(tmp_path):
    from helpers import small_model
    torch.save(small_model(dtype=torch.float32, embed_dim=48).state_dict(), tmp_path / "other.pth")
    p = run("-m", "internvit_fast", "--config", "small", "--paths", "reference", "--checkpoint",
            str(tmp_path / "other.pth"), env={"TRITON_INTERPRET": "0"})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "error: --checkpoint" in p.stderr and "other.pth" in p.stderr


NO_INTERP = {"TRITON_INTERPRET": "0"}  # the gate compiles real GPU code


@pytest.mark.slow
def test_compile_gate_passes_for_sm90_and_sm80():
    p = run("-m", "tools.gate", "--arch", "90", "80", "--json", env=NO_INTERP)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    records = json.loads(p.stdout)
    builds = [r for r in records if r["target"] in ("sm_90", "sm_80")]
    for key in ("kernel", "target", "function", "constexprs", "options", "registers", "spills", "shared_bytes",
                "wgmma", "tma", "fma_contracted"):
        assert all(key in r for r in builds), key
    assert all(set(r["options"]) >= {"enable_fp_fusion", "num_warps", "num_stages"} for r in builds)
    from internvit_fast.kernels import REGISTRY
    assert {r["kernel"] for r in builds} == {s.id for s in REGISTRY}
    gemm90 = [r for r in builds if r["target"] == "sm_90" and r["function"] == "_linear_kernel"
              and r["constexprs"]["USE_TMA"]]
    assert gemm90 and all(r["wgmma"] and r["tma"] and r["main_loop_spills"] == 0 for r in gemm90)
    assert not any(r["fma_contracted"] for r in builds)
    rounding = [r for r in builds if r["kernel"] in ("rms_norm", "residual_rms_norm", "qk_norm", "rms_norm_backward")
                or r["constexprs"].get("EPILOGUE") == 2]
    assert rounding and not any(r["options"]["enable_fp_fusion"] for r in rounding)
    moved = {r["kernel"]: r for r in records if r["target"] == "traffic"}
    assert moved["qk_norm"]["bytes_moved"] == moved["qk_norm"]["bytes_min"]  # v is not copied
    # the GELU's erf gives the bits of CUDA's libdevice erff over every bf16/fp16 input, per target
    same = [r for r in records if r["target"] == "same bits"]
    assert {r["arch"] for r in same} == {"sm_90", "sm_80"} and all(r["differ"] == 0 and r["inputs"] > 2 ** 21
                                                                   for r in same), same
    # #22: the residual tile loads under the main loop, no wait before a tile's first wgmma
    residual90 = [r for r in gemm90 if r["constexprs"]["EPILOGUE"] == 2]
    assert residual90 and all(r["serial_waits_before_mma"] == 0 for r in residual90)
    # two CTAs per SM by default on sm_90 (fc1, proj, fc2), which the gate found to fit
    fused90 = [r for r in gemm90 if r["constexprs"]["EPILOGUE"] in (1, 2) and not r["constexprs"]["SCALED"]]
    assert {r["constexprs"]["PROGRAMS"] for r in fused90} == {264}
    # stream-K by default there, its meeting of cut tiles read off the PTX (the gate fails otherwise)
    assert all(r["constexprs"]["STREAM_K"] for r in fused90)
    # FP8 (#23): e4m3 wgmma (the gate fails without it), e4m3 written only by round-to-nearest cvt
    fp8 = [r for r in builds if r["kernel"].startswith(("fp8_", "quantize_fp8")) and r["target"] == "sm_90"]
    assert fp8 and not [r for r in builds if r["kernel"].startswith("fp8_") and r["target"] == "sm_80"]
    assert all(r["fp8_cvt_other"] == 0 for r in fp8)
    assert all(r["fp8_cvt_rn"] > 0 for r in fp8 if r["kernel"] in ("quantize_fp8", "fp8_linear_gelu"))
    # the cost model: every sm_90 GEMM build and every kernel at the main shape has a time per card
    assert all(set(r["predicted_us"]) == {"h100", "h200"} and min(r["predicted_us"].values()) > 0
               for r in builds if r["target"] == "sm_90" and r["function"] == "_linear_kernel")
    assert all(set(t["predicted_us"]) == {"h100", "h200"} for t in moved.values())
    assert moved["rms_norm"]["predicted_us"]["h200"] < moved["rms_norm"]["predicted_us"]["h100"]  # bandwidth


@pytest.mark.slow
def test_gate_builds_the_tuners_candidates():
    """--candidates builds what the tuner would launch with each candidate, as the launcher
    plans it from a table holding it: two CTAs per SM and the flattened tile loop among them."""
    p = run("-m", "tools.gate", "--arch", "90", "--candidates", "--json", "--kernels",
            "linear_gelu", "linear_residual[proj]", "attention_fp8", env=NO_INTERP)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    records = [r for r in json.loads(p.stdout) if r["target"] == "sm_90"]
    from internvit_fast.kernels import REGISTRY
    specs = {s.id: s for s in REGISTRY}
    attention = [r for r in records if r["kernel"] == "attention_fp8"]  # built and read, not priced as a GEMM
    assert len(attention) == len(specs["attention_fp8"].candidates("sm90"))
    assert all(r["wgmma"] and r["spills"] == 0 and r["main_loop_mma"] >= 5 and "predicted_us" not in r
               for r in attention)
    records = [r for r in records if r["kernel"] != "attention_fp8"]
    for kernel in ("linear_gelu", "linear_residual[proj]"):
        got = [r for r in records if r["kernel"] == kernel]
        assert len(got) == len(specs[kernel].candidates("sm90")) and all(r["candidate"] for r in got)
        assert {(r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["options"]["num_warps"])
                for r in got} == {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in specs[kernel].candidates("sm90")}
        assert any(r["constexprs"]["PROGRAMS"] == 264 for r in got)
        assert all(r["main_loop_spills"] == 0 for r in got)
    assert any(r["constexprs"]["STREAM_K"] for r in records) and any(not r["constexprs"]["STREAM_K"] for r in records)
    flat = [r for r in records if r["constexprs"]["FLATTEN"]]
    assert flat and all(r["predicted_us"] is None for r in flat)  # the model cannot place its epilogue
    assert all(r["predicted_us"] for r in records if not r["constexprs"]["FLATTEN"])


def test_cost_model_moves_the_way_the_builds_say():
    from tools import costs
    card = costs.CARDS["h100"]
    base = dict(m=5188, n=3200, k=3200, block_m=128, block_n=128, block_k=64, ctas_per_sm=1, warps=8, epilogue_instructions=300,
                serial_waits=0, flatten=False, bytes_moved=0)
    t = costs.gemm_us(card, **base)
    tiles_per_sm = -(-41 * 25 // 132)
    mma = 2 * 128 * 128 * 3200 / (790e6 / 132)
    epi = 300 * 8 / 4 / 1980
    assert t == pytest.approx(tiles_per_sm * (mma + epi + costs.WAIT_US))
    assert costs.gemm_us(card, **dict(base, serial_waits=2)) == pytest.approx(t + 2 * tiles_per_sm * costs.WAIT_US)
    assert costs.gemm_us(card, **dict(base, ctas_per_sm=2)) == pytest.approx(tiles_per_sm * mma)  # hidden
    assert costs.gemm_us(card, **dict(base, bytes_moved=10 ** 10)) == pytest.approx(10 ** 10 / 3.0e6)  # memory floor, us
    # stream-K: 1025 tiles are 7.77 rounds of 132 SMs, not 8; the cut tiles' meeting costs two
    # round trips, the counters' zeroing a launch
    sk = costs.gemm_us(card, **dict(base, stream_k=True))
    assert sk == pytest.approx(41 * 25 / 132 * (mma + epi + costs.WAIT_US) + 2 * costs.WAIT_US + costs.MEMSET_US)
    whole = dict(base, m=128 * 33, n=128 * 4)  # 132 tiles: one whole round, nothing to share out
    assert costs.gemm_us(card, **dict(whole, stream_k=True)) == costs.gemm_us(card, **whole)
    assert costs.memory_us(costs.CARDS["h200"], 4.3e9) == pytest.approx(1000.0)


@pytest.mark.slow
def test_gate_builds_every_variant_the_fast_path_launches(monkeypatch):
    """Run the fast model (inference and training with drop path and with_cp, every dtype,
    with and without LayerScale; precision="fp8" with the fused ops and with their unfused
    alternatives, and in train mode with drop path) and record each plan launched; planned for
    sm_90 the same way, every variant (function, flags, dtype, FMA contraction) is among the
    gate's builds."""
    from helpers import small_model
    from tools import gate as compile_check
    from internvit_fast.kernels import REGISTRY, launch
    from internvit_fast.kernels.launch import recording
    gate = {p.variant() for spec in REGISTRY for p in spec.plans(compile_check.target(90))}
    with recording() as plans:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for init_values in (0.1, None):
                model = small_model(dtype=dtype, fast=True, depth=2, out_indices=[1], drop_path_rate=0.2,
                                    init_values=init_values, with_cp=init_values is None)
                img = torch.randn(2, 3, 28, 28)
                with torch.no_grad():
                    model.eval()(img)
                model.train()
                sum(f.float().sum() for f in model(img)).backward()
                model.precision = "fp8"
                with torch.no_grad():
                    model(img)  # train mode: drop path
                    for impl in ("fused", "unfused"):  # what the tuned table may pick
                        monkeypatch.setattr(launch, "choice", lambda *a, impl=impl, **k: impl)
                        model.eval()(img)
                monkeypatch.undo()
    launched = {p.variant() for p in plans}
    assert len(launched) > 10
    missing = launched - gate
    assert not missing, f"launched but never built by the gate: {sorted(missing)}"


GATE_SCRIPT = """if True:
    import sys
    import torch
    import tools.gate as cc
    from internvit_fast.kernels import REGISTRY
    want = sys.argv[1]
    specs = {s.id: s for s in REGISTRY}
    cc.REGISTRY = [specs["rms_norm"], specs["linear_residual[proj]"]]
    for s in cc.REGISTRY:  # one bf16 build each
        real = s.plans
        s.plans = lambda target, real=real: [p for p in real(target) if p.dtype == torch.bfloat16][:1]
    if want == "spill":
        real_read = cc.read_cubin
        def spilled(cubin):
            use, sass = real_read(cubin)
            return dict(use, STACK=64), sass
        cc.read_cubin = spilled
    if want == "loop-spill":
        real_loop = cc.main_loop_spills
        cc.main_loop_spills = lambda sass: (3, *real_loop(sass)[1:])
    if want == "no-wgmma":
        import triton
        real_compile = triton.compile
        def no_wgmma(*a, **k):
            ck = real_compile(*a, **k)
            ck.asm["ptx"] = ck.asm["ptx"].replace("wgmma", "xxxxx").replace("cp.async.bulk.tensor", "nothing")
            return ck
        cc.triton.compile = no_wgmma
    if want == "fma":
        # the launcher's own plan turns FMA contraction on: what linear_launch runs and the gate builds
        from internvit_fast.kernels import gemm
        real_plan = gemm.plan_linear
        def contracted(*a, **k):
            plan = real_plan(*a, **k)
            plan.options["enable_fp_fusion"] = True
            return plan
        gemm.plan_linear = contracted
    if want == "late-load":
        cc.loads_after_first_store = lambda sass: 2
    if want == "crowded":  # two CTAs of 8 warps each cannot both hold 255 registers a thread
        from internvit_fast.kernels import gemm
        gemm.CONFIGS["sm90", "residual"] = dict(gemm.CONFIGS["sm90", "residual"], num_warps=8)
    if want == "serial-residual":
        sys.path.insert(0, "tests")
        from gate_mutations import tma_operand_tile
        from internvit_fast.kernels import gemm
        gemm.operand_tile = tma_operand_tile
    if want == "relaxed":  # the gate's residual plan is stream-K (the sm_90 default)
        sys.path.insert(0, "tests")
        from gate_mutations import meet_partial_relaxed
        from internvit_fast.kernels import gemm
        gemm.meet_partial = meet_partial_relaxed
    sys.exit(cc.main(["--arch", "90"]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mutation, message", [
    ("spill", "row kernel spills (64 bytes)"),
    ("loop-spill", "3 spill instructions inside the main loop"),
    ("no-wgmma", "sm_90 GEMM does not use wgmma"),
    ("fma", "contracted fma in a kernel that promises"),
    ("fma", "built with FMA contraction on"),
    ("late-load", "2 global loads issued after the first store"),
    ("serial-residual", "TMA waits before the main loop: the residual epilogue's loads are not overlapped"),
    ("crowded", "2 CTAs per SM planned, but"),
    ("relaxed", "counter atomic is not acq_rel at gpu scope"),
])
def test_compile_gate_fails_on_each_defect(mutation, message):
    p = run("-c", GATE_SCRIPT, mutation, env=NO_INTERP)
    assert p.returncode == 1, p.stdout + p.stderr
    assert message in p.stdout, p.stdout[-3000:]
    if mutation == "no-wgmma":
        assert "built for TMA but the PTX has no cp.async.bulk.tensor" in p.stdout


STREAM_K_MEETING = """if True:
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, "tests")
    from gate_mutations import partial_then_count
    from tools.gate import stream_k_meeting
    for fence in (False, True):
        src = ASTSource(fn=partial_then_count, signature=dict(P="*fp32", COUNTERS="*i32", WORKSPACE="*fp32",
                        BLOCK="constexpr", FENCE="constexpr"), constexprs=dict(BLOCK=1024, FENCE=fence))
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
        print(fence, stream_k_meeting(ptx))
"""


def test_stream_k_meeting_reader_sees_a_missing_barrier():
    """The gate's reading of stream-K's meeting on a real sm_90 build: one thread's acq_rel
    atomic after every thread's stores, without a CTA barrier between (refused) and with one."""
    p = run("-c", STREAM_K_MEETING, env=NO_INTERP)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines() == [
        "False stream-K's partial sums are stored with no CTA barrier before the atomic that releases them",
        "True None"], p.stdout


def test_compile_gate_refuses_interpreted_kernels():
    p = run("-m", "tools.gate", env={"TRITON_INTERPRET": "1"})
    assert p.returncode == 2 and "TRITON_INTERPRET" in p.stderr


def test_gpu_run_fails_loudly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = run("-m", "benchmarks.gpu_run", "--out", "/nonexistent")
    assert p.returncode == 2 and "CUDA is not available" in p.stderr


@pytest.mark.slow
def test_gpu_run_smoke_tunes_writes_results_and_plot(tmp_path):
    before = sorted(os.listdir(os.path.join(ROOT, "kernels", "tuned")))
    p = run("-m", "benchmarks.gpu_run", "--smoke", "--skip-tests", "--tune", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tuned = json.load(open(tmp_path / "tuned-smoke.json"))
    from internvit_fast.kernels import REGISTRY
    assert set(tuned["configs"]) == {s.name for s in REGISTRY}
    gemm = tuned["configs"]["linear_residual"]
    assert len(gemm) == 2 and all(e["impl"] in ("fused", "unfused") and {"fused", "unfused"} <= set(e["ms"])
                                  for e in gemm)  # proj and fc2, each timed against its alternative
    assert sorted(os.listdir(os.path.join(ROOT, "kernels", "tuned"))) == before  # smoke leaves no table
    # what comes back from the device: at most 8 files; here the results, table, log, tuned table, chart
    (path,) = [f for f in glob.glob(str(tmp_path / "*.json")) if "tuned-" not in f]
    stem = path[:-5]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(stem) + e for e in (".json", ".md", ".log", ".png")
                                                  ) + ["tuned-smoke.json"]
    res = json.load(open(path))
    assert [s["name"] for s in res["stages"]] == [
        "ceilings", "backbone-b4", "parity", "fp8-b4", "fused-vs-unfused-b4", "tune", "backbone-b4-tuned", "profile",
        "segmentation", "training"]
    assert res["stages_done"] == [s["name"] for s in res["stages"]] and res["stages_not_reached"] == []
    assert all(s["seconds"] > 0 and s["estimate_s"] > 0 for s in res["stages"])  # real seconds beside estimates
    assert res["ceilings"]["copy_gbs"] > 0 and res["ceilings"]["matmul_tflops"] > 0
    assert {c["check"] for c in res["checks"]} == {"full_size_parity", "profile", "fp8_features"}
    assert {r["path"] for r in res["backbone"]} == {"reference", "fast", "compile-default", "compile-fast", "fast-fp8"}
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 and r["tflops"] > 0 for r in res["backbone"])
    kernels = {(k["group"], k["impl"]) for k in res["kernels"]}
    assert {("linear_gelu b1", "fused"), ("linear_gelu b1", "unfused"), ("rms_norm b1", "triton")} <= kernels
    assert {r["path"] for r in res["slide"]} >= {"sequential-reference", "batched-fast", "batched-fast-backbone-only"}
    assert any(0 < r.get("backbone_share", 0) <= 1 for r in res["slide"])
    assert any(0 < r.get("head_share", 0) <= 1 for r in res["slide"])  # the native UPerHead's share
    assert {r["path"] for r in res["training"]} == {"reference", "fast"}
    md = open(stem + ".md").read()
    assert "Whole-image slide inference" in md and "| backbone-b4 | done |" in md and "precision='fp8'" in md
    # measured / predicted beside each batch-4 kernel (predictions need sm_90 builds: a GPU run's)
    from benchmarks.gpu_run import markdown
    res.update(card="NVIDIA H200", predicted_us={"linear_gelu": {"h100": 800.0, "h200": 1000.0}},
               kernels=[dict(group="linear_gelu b4", impl="fused", ms=1.2, kernel="linear_gelu", batch=4)])
    assert "| linear_gelu b4 | fused | 1.2000 | - | - | - | - | 1.0000 | 1.20 |" in markdown(res)
    assert open(stem + ".png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    p = run("-m", "benchmarks.plot", path, "-o", str(tmp_path / "chart.png"))
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_gpu_run_killed_after_its_first_stage_leaves_a_valid_file(tmp_path):
    """Results are written as they come: kill the run once the first stage is done."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_run", "--smoke", "--skip-tests", "--out",
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        res = None
        while time.time() < deadline and proc.poll() is None:
            files = [f for f in glob.glob(str(tmp_path / "*.json"))]
            if files:
                res = json.load(open(files[0]))  # valid at every moment: written whole, then renamed
                if res["stages_done"]:
                    break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert res is not None and res["stages_done"] == ["ceilings"], res and res["stages"]
    (path,) = glob.glob(str(tmp_path / "*.json"))
    res = json.load(open(path))
    assert res["ceilings"]["copy_gbs"] > 0 and "ceilings" in res["stages_done"]
    assert "training" in res["stages_not_reached"]


@pytest.mark.slow
@pytest.mark.parametrize("card", ["h100", "h200"])
def test_gpu_run_plan_fits_the_window(card):
    p = run("-m", "benchmarks.gpu_run", "--plan", "--card", card, "--json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["card"] == card and plan["total_s"] <= 480
    names = [s["name"] for s in plan["stages"]]
    assert names[:2] == ["ceilings", "backbone-b4"] and names[-1] == "tests"
    (backbone,) = [s for s in plan["stages"] if "backbone" in s["name"] and "tuned" not in s["name"]]
    assert backbone["start_s"] <= 120
    starts = [s["start_s"] for s in plan["stages"]]
    assert starts == sorted(starts) and all(s["seconds"] > 0 for s in plan["stages"])
    assert abs(plan["total_s"] - sum(s["seconds"] for s in plan["stages"])) < 1e-6
    assert names.index("tune") < names.index("backbone-b4-tuned") < names.index("segmentation")


@pytest.mark.slow
def test_gpu_run_fallback_layout_runs_from_the_repository_root(tmp_path):
    """gpu_run.sh where neither the package imports nor pip can install it: the script lays
    the package out by hand and the run starts in the repository root (as do its child
    processes), so the layout must work there; the tuner's table lands in the repository's
    kernels/tuned/. Here a copy of the tree and a python that sees no installed
    internvit_fast (site's .pth files, the editable install among them, are not read) and
    whose pip fails."""
    import shutil
    import site
    import stat
    repo = tmp_path / "repo"
    for d in ("internvit_fast", "kernels", "benchmarks", "tools"):
        # (internvit_fast/kernels: a link a developer's checkout may hold, as the script makes it)
        shutil.copytree(os.path.join(ROOT, d), repo / d, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", *(["kernels"] if d == "internvit_fast" else [])))
    assert not (repo / "internvit_fast" / "kernels").exists()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python"
    wrapper.write_text("#!/bin/sh\n"
                       'case "$*" in *"-m pip"*) exit 1;; esac\n'  # pip cannot install here
                       f'PYTHONPATH="{os.pathsep.join(site.getsitepackages())}" exec "{sys.executable}" -S "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    probe = [str(wrapper), "-c", "import internvit_fast.kernels"]
    assert subprocess.run(probe, cwd=repo, env=env, capture_output=True).returncode != 0  # the case at hand
    p = subprocess.run(["bash", "benchmarks/gpu_run.sh", "--plan", "--card", "h100"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "backbone-b4" in p.stdout
    p = subprocess.run([str(wrapper), "-c", "import internvit_fast, internvit_fast.kernels.launch as t; "
                        "print(internvit_fast.__file__); print(t.TUNED_DIR)"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    where, tuned = p.stdout.split()
    assert where.startswith(str(repo / "internvit_fast"))
    assert os.path.samefile(tuned, repo / "kernels" / "tuned")


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--img-size", "0"], "--img-size 0: must be a positive multiple of the patch size (14)"),
    (["--img-size", "15"], "--img-size 15: must be a positive multiple"),
    (["--img-size", "14"], "--img-size 14: the small configuration's FPN needs at least 28"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
    (["--batch", "-1"], "--batch -1: must be at least 1"),
    (["--checkpoint", "/nonexistent/w.pth"], "--checkpoint /nonexistent/w.pth: no such file"),
    (["--image", "/nonexistent/cat.png"], "--image /nonexistent/cat.png: no such file"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--device", "tpu9"], "--device 'tpu9'"),
])
def test_cli_rejects_bad_options_like_argparse(args, message):
    if torch.cuda.is_available() and args[0] == "--device" and args[1] == "cuda":
        pytest.skip("this machine has CUDA")
    p = run("-m", "internvit_fast", "--config", "small", "--paths", "reference", *args, env={"TRITON_INTERPRET": "0"})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "usage:" in p.stderr and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


SAME_BITS = """if True:
    import dataclasses, importlib.util, inspect, sys, tempfile, textwrap
    import numpy as np
    import tools.gate as cc
    from internvit_fast.kernels import REGISTRY, gelu
    spec = next(s for s in REGISTRY if s.id == "gelu")
    src = "import triton\\nimport triton.language as tl\\n\\n" + "\\n\\n".join(
        textwrap.dedent(inspect.getsource(f.fn)) for f in (gelu._erf, gelu.gelu_value))
    mutations = dict(
        none=[],
        one_ulp=[("0.12837915122509003", "0.1283791661262512")],  # q's last coefficient, one fp32 step up
        edge=[(">= 1.002959966659546", "> 1.002959966659546")],
        # x (1 + q): the same value, rounded elsewhere (q x + x would do nothing: the build contracts it back)
        factored=[("small = tl.fma(q, x, x)", "small = x * (1.0 + q)")],
        ex2_of_ln=[("tl.exp2(tl.fma(p, -a, -a))", "tl.exp(tl.fma(p, -a, -a) * 0.6931471805599453)")],
    )
    what, _, ref, x = spec.same_bits(np.random.default_rng())[0]
    for name, edits in mutations.items():
        text = src
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new)
        path = tempfile.mkdtemp() + f"/mut_{name}.py"
        open(path, "w").write(text)
        module_spec = importlib.util.spec_from_file_location(f"mut_{name}", path)
        mod = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(mod)
        mutated = dataclasses.replace(spec, same_bits=lambda rng: [(what, mod.gelu_value, ref, x)])
        (rec,) = cc.same_bits(mutated, 90, np.random.default_rng())
        print(name, rec.get("differ"), len(rec["failures"]))
"""


@pytest.mark.slow
def test_same_bits_check_sees_a_gelu_that_rounds_differently():
    """The gate's same-bits check of the GELU (its branch-free erf against libdevice's erff,
    both compiled for sm_90 and run on CPU over every bf16 and fp16 input and fp32 sweeps):
    the kernel's own GELU passes, and each one-step change of its arithmetic fails it."""
    p = run("-c", SAME_BITS, env=NO_INTERP, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    got = {name: (int(differ), int(failed)) for name, differ, failed in (ln.split() for ln in p.stdout.splitlines())}
    assert got["none"] == (0, 0), got
    for name in ("one_ulp", "edge", "factored", "ex2_of_ln"):
        assert got[name][0] > 0 and got[name][1] == 1, (name, got)


@pytest.mark.slow
def test_same_bits_check_without_cudas_libdevice_fails_and_says_why():
    p = run("-c", "import numpy as np; from tools import gate as cc; "
            "from internvit_fast.kernels import REGISTRY; "
            "(r,) = cc.same_bits(next(s for s in REGISTRY if s.id == 'gelu'), 90, np.random.default_rng()); "
            "print(r['failures'])", env=dict(NO_INTERP, INTERNVIT_FAST_LIBDEVICE="/nonexistent/libdevice.10.bc"))
    assert p.returncode == 0, p.stderr
    assert "INTERNVIT_FAST_LIBDEVICE=/nonexistent/libdevice.10.bc: no such file" in p.stdout, p.stdout


def test_ptx_eval_runs_libdevice_erf_and_rounds_once():
    """The PTX runner against independent references: libdevice's erff as it runs it is
    within 2 fp32 steps of math.erf, and its fma and add round once (exact fractions)."""
    import math
    from fractions import Fraction
    import numpy as np
    from tools import ptx_eval
    rng = np.random.default_rng()
    a, b, c = (rng.standard_normal(20000).astype(np.float32) * np.float32(2.0) ** rng.integers(-30, 30, 20000)
               .astype(np.float32) for _ in range(3))
    c[:5000] = -(a[:5000].astype(np.float64) * b[:5000]).astype(np.float32)  # cancellation
    got = ptx_eval.fma_f32(a, b, c)
    for i in range(0, 20000, 7):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        lo = np.float32(float(exact))  # within a step of the correctly rounded value
        cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
        best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.array(v).view(np.uint32)) & 1))
        assert got[i] == best, (a[i], b[i], c[i], got[i], best)
    # where rounding twice differs from once (random draws almost never land there): a float64
    # sum on an fp32 halfway point, the overflow edge, signed zeros, subnormal ties
    for (x, y, z), bits in [((1 + 2 ** -12, 1 + 2 ** -12, 2 ** -80), 0x3F801001),
                            ((18631, 1801 * 2.0 ** 103, -1), 0x7F7FFFFF), ((-1, 0, 0), 0), ((-1, 0, -0.0), 0x80000000),
                            ((2 ** -75, 2 ** -75, 0), 0), ((2 ** -75, 1.5 * 2 ** -75, 0), 1),
                            ((-(2 ** -75), 1.5 * 2 ** -75, -0.0), 0x80000001)]:
        r = ptx_eval.fma_f32(*(np.array([v], dtype=np.float32) for v in (x, y, z)))
        assert int(r.view(np.uint32)[0]) == bits, ((x, y, z), hex(int(r.view(np.uint32)[0])), hex(bits))
    p = run("-c", "import numpy as np, sys; sys.path.insert(0, 'tests');"
            "from tools import gate as cc, ptx_eval; from gate_mutations import libdevice_erf;"
            "x = np.random.default_rng().uniform(-6, 6, 4000).astype(np.float32);"
            "y = ptx_eval.evaluate(cc._probe_ptx(libdevice_erf, 90), x);"
            "print(repr(x.tolist())); print(repr(y.tolist()))", env=NO_INTERP)
    assert p.returncode == 0, p.stderr
    xs, ys = (eval(line) for line in p.stdout.splitlines())
    for x, y in zip(xs, ys):
        assert abs(y - math.erf(x)) <= 2 * 2.0 ** -24 * max(abs(math.erf(x)), 2.0 ** -126) + 1e-45, (x, y)
