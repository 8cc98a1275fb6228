#!/usr/bin/env bash
# Run the throughput benchmark on a GPU machine and record the result in docs/throughput_gpu.md.
# (bf16 autocast and SDPA attention are used automatically when CUDA is available.)
#   bash benchmarks/run_throughput_gpu.sh            # from the repository root, after scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate 2>/dev/null || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: run benchmarks/throughput.py on CPU instead'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee /tmp/gpu.txt
python benchmarks/throughput.py --sizes tiny gpt2-small --rows 4096 --rows_gpt2 2048 --members 5 --batch 16 \
    --epochs 1 --output docs/throughput_gpu.md
{ echo; echo "GPU: $(cat /tmp/gpu.txt)"; } >> docs/throughput_gpu.md
echo "Wrote docs/throughput_gpu.md"
