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


def test_cli_default_runs_small_backbone_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the default on a GPU is the full 6B configuration (run by gpu_run.sh)")
    p = run("-m", "internvit_fast", env={"TRITON_INTERPRET": "0"})
    assert p.returncode == 0, p.stderr
    assert "config=small" in p.stdout and "feature 3: (1, 96, 2, 2) torch.float32" in p.stdout
    assert "ms per batch" in p.stdout


def test_cli_fast_path_with_options(tmp_path):
    from helpers import small_model
    m = small_model(dtype=torch.float32, out_indices=[0, 1, 2, 3], with_fpn=True)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    p = run("-m", "internvit_fast", "--config", "small", "--batch", "2", "--fast", "--repeats", "1",
            "--checkpoint", str(tmp_path / "w.pth"), "--device", "cpu", env={"TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stderr
    assert "fast=True" in p.stdout and "feature 0: (2, 96, 16, 16)" in p.stdout


NO_INTERP = {"TRITON_INTERPRET": "0"}  # the gate compiles real GPU code


def test_compile_gate_passes_for_sm90_and_sm80():
    p = run("-m", "internvit_fast.compile_check", "--arch", "90", "80", env=NO_INTERP)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "== sm_90 ==" in out and "== sm_80 ==" in out and "all kernels compiled clean" in out
    gemm90 = [ln for ln in out.split("== sm_80 ==")[0].splitlines()
              if ln.startswith("gelu_linear") and "fp32" not in ln]
    assert gemm90 and all(" yes " in ln for ln in gemm90), "sm_90 bf16/fp16 GEMMs must use wgmma"
    for name in ("rms_norm", "qk_norm", "residual_rms_norm"):
        assert name in out


def test_compile_gate_fails_on_a_spilling_norm_and_a_gemm_without_wgmma():
    script = """if True:
        import sys
        import internvit_fast.compile_check as cc
        real = cc.specs_for
        cc.specs_for = lambda arch: [s for s in real(arch) if s.name in ("rms_norm", "gelu_linear")][:2]
        cc.resource_usage = lambda cubin: {"REG": 255, "STACK": 64, "LOCAL": 0}
        import triton
        real_compile = triton.compile
        def no_wgmma(*a, **k):
            ck = real_compile(*a, **k)
            ck.asm["ptx"] = ck.asm["ptx"].replace("wgmma", "xxxxx")
            return ck
        cc.triton.compile = no_wgmma
        sys.exit(cc.main(["--arch", "90"]))
    """
    p = run("-c", script, env=NO_INTERP)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "rms_norm" in p.stdout and "norm kernel spills (64 bytes)" in p.stdout
    assert "GEMM does not use wgmma" in p.stdout


def test_compile_gate_refuses_interpreted_kernels():
    p = run("-m", "internvit_fast.compile_check", env={"TRITON_INTERPRET": "1"})
    assert p.returncode == 2 and "TRITON_INTERPRET" in p.stderr


def test_gpu_run_fails_loudly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = run("-m", "benchmarks.gpu_run", "--out", "/nonexistent")
    assert p.returncode == 2 and "CUDA is not available" in p.stderr


def test_gpu_run_smoke_tunes_writes_results_and_plot(tmp_path):
    before = sorted(os.listdir(os.path.join(ROOT, "kernels", "tuned")))
    p = run("-m", "benchmarks.gpu_run", "--smoke", "--skip-tests", "--tune", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tuned = json.load(open(tmp_path / "tuned-smoke.json"))
    assert set(tuned["configs"]) == {"rms_norm", "qk_norm", "residual_rms_norm", "gelu_linear"}
    assert sorted(os.listdir(os.path.join(ROOT, "kernels", "tuned"))) == before  # smoke leaves no table
    (path,) = [f for f in glob.glob(str(tmp_path / "*.json")) if "tuned-" not in f]
    res = json.load(open(path))
    assert res["tuning"]["rc"] == 0
    checks = {c["check"] for c in res["checks"]}
    assert checks == {"full_size_parity", "profile"}
    assert res["versions"]["torch"] and res["ceilings"]["copy_gbs"] > 0
    kernels = {(k["kernel"], k["impl"]) for k in res["kernels"]}
    assert {("rms_norm", "triton"), ("gelu_linear", "eager"), ("qk_norm", "compiled")} <= kernels
    paths = {r["path"] for r in res["backbone"]}
    assert {"reference", "fast", "compile-default", "compile-max-autotune"} <= paths
    assert os.path.exists(path[:-5] + ".md")
    p = run("-m", "benchmarks.plot", path, "-o", str(tmp_path / "chart.png"))
    assert p.returncode == 0, p.stderr
    assert open(tmp_path / "chart.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
