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
