#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: the pinned torch (local wheels on our machines),
# the package in editable mode with its C++ extension, and the test/attack extras.
#   bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 ninja
# DALI wheels of different CUDA majors share the nvidia/dali folder: drop a CUDA 12 one first
"$PY" -m pip uninstall -y -q nvidia-dali-cuda120 2>/dev/null || true
"$PY" -m pip install -q --no-build-isolation -e ".[test,autoattack,tensorboard,dali,cluster]"
# torchattacks pins an old `requests`; its real dependencies are already here
"$PY" -m pip install -q --no-deps torchattacks==3.5.1
"$PY" -c "import aerl_fast, aerl_fast.kernels as k; print('aerl_fast installed; kernels backend:', k.backend())"
