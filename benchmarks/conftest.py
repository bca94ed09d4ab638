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


# The run is time-boxed: what answers the project's targets first (every kernel, then
# the UPerNet batch-4 backbone), the costly torch.compile modes last.
_PATH_COST = {"reference": 0, "fast": 0, "fast-cudagraph": 0, "compile-default": 1, "compile-max-autotune": 2}


def _priority(item):
    if not item.nodeid.startswith("benchmarks/bench_backbone.py::"):
        return (0,)  # the hook sees the whole session's items: leave everything else in order
    p = item.callspec.params
    return (1, _PATH_COST[p["path"]], p["config"] != "upernet", p["batch"] != 4, p["batch"])


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_priority)  # stable: kernels keep their order
