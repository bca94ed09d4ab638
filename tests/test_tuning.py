"""Tuned launch configurations: lookup rules, the fused/unfused choice, their use by the compile gate."""
import pytest
import torch

from internvit_fast.kernels import REGISTRY, tuning
from internvit_fast.kernels._common import row_launch

TABLE = {"configs": {
    "linear_gelu": [
        {"shape": {"M": 1297, "N": 12800, "K": 3200, "dtype": "bf16"}, "impl": "unfused",
         "config": {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "EPI_SPLIT": 2, "num_warps": 4,
                    "num_stages": 4}},
        {"shape": {"M": 10376, "N": 12800, "K": 3200, "dtype": "bf16"}, "impl": "fused",
         "config": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPI_SPLIT": 1, "num_warps": 8,
                    "num_stages": 3}}],
    "rms_norm": [{"shape": {"M": 1297, "N": 3200, "dtype": "bf16"}, "config": {"num_warps": 8}}],
}}


@pytest.fixture
def sm90_table(tuned_table):
    tuned_table(TABLE)


def test_lookup_takes_nearest_rows_and_exact_rest(sm90_table):
    cpu = torch.device("cpu")
    small = tuning.lookup("linear_gelu", cpu, M=2594, N=12800, K=3200, dtype=torch.bfloat16)
    large = tuning.lookup("linear_gelu", cpu, M=8000, N=12800, K=3200, dtype=torch.bfloat16)
    assert small["BLOCK_M"] == 64 and large["BLOCK_M"] == 128
    assert tuning.lookup("linear_gelu", cpu, M=1297, N=12800, K=3200, dtype=torch.float16) is None
    assert tuning.lookup("linear_gelu", cpu, M=1297, N=1000, K=3200, dtype=torch.bfloat16) is None
    assert tuning.lookup("qk_norm", cpu, M=1297, N=3200, dtype=torch.bfloat16) is None
    got = tuning.lookup("rms_norm", cpu, M=5000, N=3200, dtype=torch.bfloat16)
    assert row_launch(3200, got) == {"BLOCK_N": 4096, "num_warps": 8}
    assert row_launch(3200, None) == {"BLOCK_N": 4096, "num_warps": 16}


def test_choice_follows_the_nearest_measured_shape(sm90_table):
    cpu = torch.device("cpu")
    assert tuning.choice("linear_gelu", cpu, M=1297, N=12800, K=3200, dtype=torch.bfloat16) == "unfused"
    assert tuning.choice("linear_gelu", cpu, M=9000, N=12800, K=3200, dtype=torch.bfloat16) == "fused"
    assert tuning.choice("linear_gelu", cpu, M=1297, N=12800, K=3200, dtype=torch.float16) == "fused"
    assert tuning.choice("linear_residual", cpu, M=1297, N=3200, K=3200, dtype=torch.bfloat16) == "fused"


def test_no_table_means_heuristics():
    assert tuning.arch_of(torch.device("cpu")) is None
    assert tuning.lookup("rms_norm", torch.device("cpu"), M=1, N=64, dtype=torch.float32) is None


def test_compile_gate_includes_tuned_configs(sm90_table):
    specs = {s.id: s for s in REGISTRY}
    tuned = [c for c in specs["linear_gelu"].compile_specs(90) if c.label.startswith("tuned")]
    assert {(c.constexprs["BLOCK_M"], c.options["num_warps"]) for c in tuned} == {(64, 4), (128, 8)}
    rows = [c for c in specs["rms_norm"].compile_specs(90) if c.label.startswith("tuned")]
    assert [c.options["num_warps"] for c in rows] == [8]


def test_tuned_dir_is_the_repositorys():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.samefile(tuning.TUNED_DIR, os.path.join(root, "kernels", "tuned"))
