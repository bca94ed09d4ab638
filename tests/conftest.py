"""Test setup: on a machine without CUDA the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit
reads it at decoration time), so it is set here, before the tests import anything.
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different draw per test (from its name): inputs are fresh, yet a failure reproduces.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
