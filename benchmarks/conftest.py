"""Benchmark fixtures: the card's ceilings (measured once per run) and the time box."""
import pytest

from benchmarks import harness


@pytest.fixture(scope="session")
def ceilings():
    return {"copy_gbs": harness.copy_ceiling_gbs(), "matmul_tflops": harness.matmul_ceiling_tflops()}


@pytest.fixture(autouse=True)
def _time_box():
    if harness.seconds_left() <= 0:
        pytest.skip("not measured: the run's time box (INTERNVIT_BENCH_DEADLINE) was used up")
