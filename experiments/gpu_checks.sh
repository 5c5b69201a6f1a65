#!/usr/bin/env bash
# One call on a GPU machine: the kernel tests compiled for the GPU, then the speed benchmarks.
#
#   bash experiments/gpu_checks.sh [OUT_DIR] [tests|bench|dp|all]
#
# Wheels that the GPU image lacks (prv-accountant, dp-accounting, dm-tree) are installed from
# .whl/ when that folder exists (see the device tool's README). Compiling every
# specialisation takes ~15 s a test, so the tests run on 15 workers (pytest-xdist).
set -uo pipefail
out=${1:-experiments/results}
what=${2:-all}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 15 --timeout 120 -rfE \
    tests/test_kernels_flash_attention.py tests/test_attention.py tests/test_device_samplers.py \
    tests/test_attacks_release_audit.py 2>&1 | tee "$out/gpu_tests.log" | tail -15
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 330 python3 experiments/bench_flash_attention.py --hooks --out-dir "$out" | grep -v '^{'
fi
if [ "$what" = dp ] || [ "$what" = all ]; then
  timeout 240 python3 experiments/bench_flash_attention.py --dp --out-dir "$out" | tail -8
fi
