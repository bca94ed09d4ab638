"""Benchmark fixtures: each finished benchmark or check is kept the moment it is done, and
the stage's time box.

pytest-benchmark does the timing (see harness.py); ``bench`` is its ``benchmark`` fixture,
unchanged, whose result is appended to the run's records file after the test
(``INTERNVIT_BENCH_RECORDS``, set by gpu_run) so a run cut short keeps what it measured.
"""
import time

import pytest

from benchmarks import harness


@pytest.fixture
def bench(benchmark, request):
    yield benchmark
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        harness.write_record({"kind": "benchmark", "test": request.node.nodeid, "group": benchmark.group,
                              "stats": harness.stats_of(benchmark), "info": dict(benchmark.extra_info)})


@pytest.fixture
def record_check(request):
    """For tests that check rather than time (full-size parity, profiles): keep their findings."""
    def keep(**info):
        harness.write_record({"kind": "check", "test": request.node.nodeid, "info": info})
    return keep


def pytest_runtest_logreport(report):
    """Every test's outcome as it ends (gpu_run follows the stages' progress with these)."""
    if report.when == "call" or (report.when == "setup" and not report.passed):
        entry = {"kind": "test", "test": report.nodeid, "outcome": report.outcome, "t": time.time()}
        if report.skipped and isinstance(report.longrepr, tuple):
            entry["reason"] = report.longrepr[2]
        harness.write_record(entry)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # pytest's documented recipe for knowing in a fixture's teardown whether the test passed
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


@pytest.fixture(autouse=True)
def _time_box():
    if harness.seconds_left() <= 0:
        pytest.skip("not measured: the stage's time box (INTERNVIT_BENCH_DEADLINE) was used up")
