"""Fixtures for the test suite (the interpreter switch is in the root conftest.py)."""
import zlib

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different draw per test, derived from its name: fresh inputs, reproducible failures.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def tuned_table(tmp_path, monkeypatch):
    """Install a tuned table (a dict in kernels/tuned/'s format) as the table of the card the
    tests run on (the interpreter's, on a CPU; the GPU's own arch on a GPU)."""
    import json

    from internvit_fast.kernels import launch
    from internvit_fast.kernels.launch import Target

    def install(table: dict) -> None:
        arch = Target.of(DEVICE).arch
        (tmp_path / f"{arch}.json").write_text(json.dumps(table))
        monkeypatch.setattr(launch, "TUNED_DIR", str(tmp_path))
        launch.table.cache_clear()

    yield install
    launch.table.cache_clear()
