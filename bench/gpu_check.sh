#!/usr/bin/env bash
# One short script for a lent GPU machine (device tool): the GPU tests, then the GPU benchmarks.
#   run: bash bench/gpu_check.sh   (with .whl carried: pydantic for the cp312 image; see bench/README.md)
set -uo pipefail
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== GPU tests"; timeout 300 python3 -m pytest -q -o addopts="" -p no:cacheprovider -m "gpu" \
  tests/kernels tests/distill/test_losses.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
echo "== retention bench"; timeout 240 python3 bench/retention.py --gpu --skip-training --skip-generation --json "$OUT/retention_gpu.json" 2>&1 | tail -40
echo "== kd loss bench"; timeout 120 python3 bench/kd_loss.py --iters 3 2>&1 | tail -20
