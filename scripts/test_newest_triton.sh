#!/usr/bin/env bash
# The kernels under the newest Triton a fresh `pip install` resolves (the GPU machines have
# triton 3.6, which the main test run uses): the kernels' interpreter tests, the tuner's
# table keys and the compile gate, in a virtual environment of their own.
# Usage: bash scripts/test_newest_triton.sh   (after the main install; about 8 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TMPDIR:-/tmp}/internvit-fast-newest-triton"
python -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0     # the CPU wheel on disk (see README)
"$venv/bin/python" -m pip install -q --upgrade triton numpy pytest pytest-benchmark safetensors
"$venv/bin/python" -m pip install -q nvidia-nvvm==13.0.88   # CUDA's libdevice: the gate's same-bits reference
"$venv/bin/python" -m pip install -q --no-deps -e .
"$venv/bin/python" -c "import triton, numpy; print('triton', triton.__version__, 'numpy', numpy.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_tuning.py tests/test_attention_fp8.py \
    "tests/test_tools.py::test_compile_gate_passes_for_sm90_and_sm80" \
    "tests/test_tools.py::test_same_bits_check_sees_a_gelu_that_rounds_differently"
