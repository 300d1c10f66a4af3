#!/usr/bin/env bash
# One short script for a lent GPU machine (the device tool), ~5-8 minutes on an H200:
#   1. direct-mode training tokens/s, Llama-3.2-1B-shaped teacher (bf16, SDPA, or flash-attn when
#      installed) + the 500M RetNet student (bf16 autocast, Triton retention, chunked sparse KD, k 512),
#      at seq 1k (16 x 1024) and 4k (4 x 4096); in the same run the seed's way (fp32 teacher, full
#      [tokens, V] logits, full-vocabulary KL through autograd) and fla's chunk_retention vs our Triton
#      kernel, and the hybrid student (every 4th layer softmax attention) at the same shapes
#      (python bench/gpu_throughput.py; goal >= 40k tokens/s at seq 1k);
#   2. the gpu-marked tests (Triton retention and KD-loss kernels against their references).
# Never a test dependency: nothing in tests/ calls it.
#
# The image there has torch + triton + transformers 5.17 but not pydantic or fla, and nothing can be
# fetched there; so first, HERE (pip + registry; ~20 MB of wheels into .whl/, ignored by git):
#   bash bench/gpu_check.sh --prepare
# then with the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Results: stdout, and $OUT/gpu_throughput.json + $OUT/gpu_tests.log.
set -uo pipefail
cd "$(dirname "$0")/.."

# the venv's versions, cp312 for the image; transformers 5.24 (the RetNet uses 5.2x APIs) works with the
# image's huggingface_hub 1.33 (it needs >= 1.31; hub 2.x would need httpx2, absent there)
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        transformers==5.24.0 flash-linear-attention==0.6.0 fla-core==0.6.0)

if [[ "${1:-}" == "--prepare" ]]; then
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  PY=${PY:-.venv/bin/python}
  for w in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$w" || echo "could not fetch $w (check the version: pip index versions ${w%%==*})"
  done
  ls -la .whl; du -sh .whl
  exit 0
fi

OUT=${OUT:-bench/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -c "import fla; print('fla', fla.__version__)" 2>/dev/null || echo "fla: not installed (bash bench/gpu_check.sh --prepare, carry .whl)"

t0=$(date +%s)
echo "== direct-mode throughput (ours vs the seed's way) + fla vs Triton retention"
timeout 330 python3 bench/gpu_throughput.py --json "$OUT/gpu_throughput.json" 2>&1 | grep -v "it/s\]$"
echo "   ($(( $(date +%s) - t0 )) s)"

echo "== GPU tests"
timeout 150 python3 -m pytest -q -o addopts="" -p no:cacheprovider -m "gpu" \
  tests/kernels tests/loss/test_losses.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "== total $(( $(date +%s) - t0 )) s"
