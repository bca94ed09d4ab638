"""Tuned launch configurations: lookup rules, the fused/unfused choice, the tuner writing
where the launchers read, and the compile gate building what a table names."""
import pytest
import torch

from internvit_fast.kernels import REGISTRY, launch
from internvit_fast.kernels.common import row_launch
from internvit_fast.kernels.launch import Target, lookup, table_key
from internvit_fast.kernels.registry import Shape, run

TABLE = {
    "linear_gelu": [
        {"shape": {"M": 1297, "N": 12800, "K": 3200, "dtype": "bf16"}, "impl": "unfused",
         "config": {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "EPI_SPLIT": 2, "num_warps": 4,
                    "num_stages": 4}},
        {"shape": {"M": 10376, "N": 12800, "K": 3200, "dtype": "bf16"}, "impl": "fused",
         "config": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPI_SPLIT": 1, "num_warps": 8,
                    "num_stages": 3}}],
    "rms_norm": [{"shape": {"M": 1297, "N": 3200, "dtype": "bf16"}, "config": {"num_warps": 8}}],
}
SM90 = Target("sm90", 132, TABLE)


def test_lookup_takes_nearest_rows_and_exact_rest():
    def get(name, **shape):
        entry = lookup(SM90, table_key(name, **shape))
        return entry and entry["config"]
    assert get("linear_gelu", M=2594, N=12800, K=3200, dtype=torch.bfloat16)["BLOCK_M"] == 64
    assert get("linear_gelu", M=8000, N=12800, K=3200, dtype=torch.bfloat16)["BLOCK_M"] == 128
    assert get("linear_gelu", M=1297, N=12800, K=3200, dtype=torch.float16) is None
    assert get("linear_gelu", M=1297, N=1000, K=3200, dtype=torch.bfloat16) is None
    assert get("linear_gelu", M=1297, K=12800, N=3200, dtype=torch.bfloat16) is None  # N and K are not interchangeable
    assert get("qk_norm", M=1297, N=3200, dtype=torch.bfloat16) is None
    got = get("rms_norm", M=5000, N=3200, dtype=torch.bfloat16)
    assert row_launch(3200, got) == {"BLOCK_N": 4096, "num_warps": 8}
    assert row_launch(3200, None) == {"BLOCK_N": 4096, "num_warps": 16}


def test_choice_follows_the_nearest_measured_shape():
    assert launch.choice("linear_gelu", SM90, M=1297, N=12800, K=3200, dtype=torch.bfloat16) == "unfused"
    assert launch.choice("linear_gelu", SM90, M=9000, N=12800, K=3200, dtype=torch.bfloat16) == "fused"
    assert launch.choice("linear_gelu", SM90, M=1297, N=12800, K=3200, dtype=torch.float16) == "fused"
    assert launch.choice("linear_residual", SM90, M=1297, N=3200, K=3200, dtype=torch.bfloat16) == "fused"


def test_no_table_means_heuristics():
    assert Target.of(torch.device("cpu")).table == {}
    assert lookup(Target("sm90", 132), table_key("rms_norm", M=1, N=64, dtype=torch.float32)) is None


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.id)
def test_an_entry_the_tuner_writes_is_the_one_the_launcher_reads(device, spec, tuned_table):
    """The tuner keys an entry by the launcher's own plan; the launcher then plans with it."""
    from benchmarks.tune import entry_for
    inputs = spec.make_inputs(Shape(37, 96, 384, torch.bfloat16), device)
    config = spec.candidates("smoke")[-1]
    name, entry = entry_for(spec, inputs, config, 0.1)
    tuned_table({"configs": {name: [entry]}})
    plan = spec.plan_for(inputs, Target.of(device))
    assert plan.tuned, f"{spec.id}: the launcher did not find the entry the tuner wrote under {name} {entry['shape']}"
    for k, v in config.items():
        if k in plan.options:
            assert plan.options[k] == v, (k, plan.options[k], v)
        elif k in plan.constexprs:
            assert plan.constexprs[k] == v, (k, plan.constexprs[k], v)
    got = run(spec, inputs)  # and the launch with the tuned entry computes the op
    assert all(not torch.isnan(t).any() for t in got.values())


def test_compile_gate_builds_the_configurations_a_table_names():
    specs = {s.id: s for s in REGISTRY}
    tuned = [p for p in specs["linear_gelu"].plans(SM90) if p.tuned]
    assert {(p.constexprs["BLOCK_M"], p.options["num_warps"]) for p in tuned} == {(64, 4), (128, 8)}
    rows = [p for p in specs["rms_norm"].plans(SM90) if p.tuned]
    assert rows and {p.options["num_warps"] for p in rows} == {8}


def test_tuned_dir_is_the_repositorys():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.samefile(launch.TUNED_DIR, os.path.join(root, "kernels", "tuned"))


def test_the_tuner_never_picks_an_alternative_that_fails(tmp_path, monkeypatch):
    """cuBLASLt's block-scaled FP8 GEMM exists on sm_90 with torch >= 2.9 only: an unfused
    alternative that raises is logged and not picked, and the tuning goes on."""
    import dataclasses
    import json

    from benchmarks import tune
    spec = next(s for s in REGISTRY if s.id == "fp8_linear")

    def refused(inputs):
        raise NotImplementedError("DeepSeek style (1x128, 128x128) scaling only supported in CUDA for SM90")
    broken = dataclasses.replace(spec, choice=dataclasses.replace(spec.choice, unfused=refused))
    monkeypatch.setattr(tune, "REGISTRY", [broken])
    monkeypatch.setattr(broken, "candidates", lambda arch: spec.candidates(arch)[:1])
    tune.tune(str(tmp_path), budget_s=600, smoke=True)
    table = json.load(open(tmp_path / "tuned-smoke.json"))
    (entry,) = table["configs"]["fp8_linear"]
    assert entry["impl"] == "fused" and set(entry["ms"]) == {"kernel", "fused"}
    assert any("unfused: failed (NotImplementedError" in line for line in table["log"])


def test_the_tuner_takes_inference_gemms_first_and_training_last():
    from benchmarks.tune import order
    from tools import costs
    ids = [s.id for s in order(REGISTRY, Shape(1297 * 4))]
    training = [s.id for s in REGISTRY if s.training]
    gemms = [s.id for s in REGISTRY if not s.training and costs.counts(s.id, Shape(1297 * 4))[2] > 0]
    assert set(training) == {"linear_gelu_grad", "rms_norm_backward"}
    assert set(ids[:len(gemms)]) == set(gemms) and set(ids[-len(training):]) == set(training)
    assert {"fp8_linear_gelu", "fp8_linear_residual[fc2]", "attention_fp8"} <= set(gemms)
    # bf16 GEMMs, then FP8 attention (its entry picks a path), then the FP8 GEMMs, each in registry order
    fp8 = [g for g in gemms if g.startswith("fp8_")]
    assert ids[:len(gemms)] == [g for g in gemms if g not in fp8 and g != "attention_fp8"] + ["attention_fp8"] + fp8
