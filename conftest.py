"""Root pytest setup for tests/ and benchmarks/.

Without CUDA the Triton kernels run in Triton's interpreter. TRITON_INTERPRET
must be set before any kernel module is imported (triton.jit reads it when it
decorates), which is why it is set here, before either folder's files load.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
