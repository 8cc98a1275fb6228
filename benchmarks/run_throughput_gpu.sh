#!/usr/bin/env bash
# The GPU throughput run (issue 16), in one call: benchmarks/throughput_gpu.py at full sizes (GPT-2-124M
# shape, M=5, 2 epochs, batch 16, bf16, SDPA; about 5 minutes on an H200 (allow 9), model builds included), writing
# OUT_DIR/throughput_gpu.{md,json} and OUT_DIR/log. Copy the .md and .json into docs/ afterwards.
#   bash benchmarks/run_throughput_gpu.sh [OUT_DIR]          # OUT_DIR defaults to docs
# On a machine without this package's dependencies (the device image has torch, transformers, peft and
# accelerate but not datasets or trl), fetch the wheels once beside it with
# `bash benchmarks/gpu_wheels.sh` (writes .whl/, git-ignored through .git/info/exclude) and carry .whl:
# this script installs them into /tmp/site when .whl/ exists.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs}"
mkdir -p "$out"
. .venv/bin/activate 2>/dev/null || true
py=$(command -v python3 || command -v python)
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: run python benchmarks/throughput_gpu.py --tiny on CPU instead'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
"$py" benchmarks/throughput_gpu.py --output_dir "$out" 2>&1 | tee "$out/log"
