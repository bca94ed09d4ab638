"""Tuned launch configurations: lookup rules, their use by the launchers and the compile gate."""
import json

import pytest
import torch

from internvit_fast.kernels import tuning
from internvit_fast.kernels._common import row_launch

TABLE = {"configs": {
    "gelu_linear": [
        {"shape": {"M": 1297, "N": 12800, "K": 3200, "dtype": "bf16"},
         "config": {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}},
        {"shape": {"M": 10376, "N": 12800, "K": 3200, "dtype": "bf16"},
         "config": {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}}],
    "rms_norm": [{"shape": {"M": 1297, "N": 3200, "dtype": "bf16"}, "config": {"num_warps": 8}}],
}}


@pytest.fixture
def sm90_table(tmp_path, monkeypatch):
    (tmp_path / "sm90.json").write_text(json.dumps(TABLE))
    monkeypatch.setattr(tuning, "TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "arch_of", lambda device: "sm90")
    tuning.table.cache_clear()
    tuning._lookup.cache_clear()
    yield
    tuning.table.cache_clear()
    tuning._lookup.cache_clear()


def test_lookup_takes_nearest_rows_and_exact_rest(sm90_table):
    cpu = torch.device("cpu")
    small = tuning.lookup("gelu_linear", cpu, M=2594, N=12800, K=3200, dtype=torch.bfloat16)
    large = tuning.lookup("gelu_linear", cpu, M=8000, N=12800, K=3200, dtype=torch.bfloat16)
    assert small["BLOCK_M"] == 64 and large["BLOCK_M"] == 128
    assert tuning.lookup("gelu_linear", cpu, M=1297, N=12800, K=3200, dtype=torch.float16) is None
    assert tuning.lookup("gelu_linear", cpu, M=1297, N=1000, K=3200, dtype=torch.bfloat16) is None
    assert tuning.lookup("qk_norm", cpu, M=1297, N=3200, dtype=torch.bfloat16) is None
    got = tuning.lookup("rms_norm", cpu, M=5000, N=3200, dtype=torch.bfloat16)
    assert row_launch(3200, got) == {"BLOCK_N": 4096, "num_warps": 8}
    assert row_launch(3200, None) == {"BLOCK_N": 4096, "num_warps": 16}


def test_no_table_means_heuristics():
    assert tuning.arch_of(torch.device("cpu")) is None
    assert tuning.lookup("rms_norm", torch.device("cpu"), M=1, N=64, dtype=torch.float32) is None


def test_compile_gate_includes_tuned_configs(sm90_table):
    from internvit_fast.compile_check import specs_for
    tuned = [s for s in specs_for(90) if any(sh.startswith("tuned") for sh in s.shapes)]
    gemm = [s for s in tuned if s.name == "gelu_linear"]
    assert {(s.constexprs["BLOCK_M"], s.num_warps) for s in gemm} == {(64, 4), (128, 8)}
    assert any(s.name == "rms_norm" and s.num_warps == 8 for s in tuned)
