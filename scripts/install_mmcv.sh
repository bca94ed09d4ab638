#!/usr/bin/env bash
# Build and install full mmcv 2.1.0 (with its CPU ops) against the installed torch.
# MMSegmentation 1.2.2 imports mmcv.ops, so mmcv-lite does not work, and PyPI has no
# mmcv wheel for current torch: it compiles from source (about 13 minutes on 2 cores;
# pip caches the built wheel, so later installs on the same machine take seconds).
# Run after torch is installed; then: pip install -e '.[mmseg]'.
set -euo pipefail
if python -c "import mmcv, mmcv.ops" 2>/dev/null && [ "$(python -c 'import mmcv; print(mmcv.__version__)')" = "2.1.0" ]; then
  echo "mmcv 2.1.0 with ops already installed"
  exit 0
fi
# mmcv 2.1.0's setup.py imports pkg_resources, which setuptools 80 and later dropped.
python -m pip install -q 'setuptools<80' wheel 'numpy<2.3'
MMCV_WITH_OPS=1 FORCE_CUDA=0 python -m pip install --no-build-isolation mmcv==2.1.0
python -c "import mmcv.ops" && echo "mmcv $(python -c 'import mmcv; print(mmcv.__version__)') with ops installed"
