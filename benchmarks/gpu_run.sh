#!/usr/bin/env bash
# The one prepared GPU run, for a machine with one H100/H200 and no network:
#   bash benchmarks/gpu_run.sh [--tune] [--out DIR] [--budget-s 480] [--smoke]
#   python -m benchmarks.gpu_run --plan --card h100      (the stages and their estimates)
# Installs the project from the working tree without dependencies (the machine has
# torch, triton, pytest and pytest-benchmark), then runs benchmarks/gpu_run.py: the
# stages of benchmarks/plan.py, the backbone comparison first, results rewritten as
# they come into DIR (<date>-<card>.json, .md, .log, .png, tuned-<arch>.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ! python -c "import internvit_fast.kernels" 2>/dev/null; then
  if ! python -m pip install -q --no-deps --no-build-isolation --no-index -e . ; then
    # No usable setuptools for an editable build: lay the package out by hand (kernels/ is
    # installed as internvit_fast.kernels) in the working tree itself. The run and its
    # child processes start in the repository root, whose internvit_fast/ comes first on
    # sys.path and would hide a copy elsewhere. A link, not a copy: the tuner writes its
    # table into the repository's kernels/tuned/.
    [ -e internvit_fast/kernels ] || ln -sfn ../kernels internvit_fast/kernels  # (-f: a dangling link)
  fi
fi
exec python -m benchmarks.gpu_run "$@"
