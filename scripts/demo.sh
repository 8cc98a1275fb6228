#!/usr/bin/env bash
# The main job on the embedded default (no network): `hf-gradfilter run --demo` scores the demo dataset
# with a tiny proxy ensemble, selects the top 10%, fine-tunes a tiny Llama target on it and on a random
# 10%, and writes demo_out/report.html. Extra arguments go to `hf-gradfilter run` (e.g. --ratio 0.05 0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# glibc otherwise returns big buffers to the OS every step (up to 2x slower on CPU)
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-17179869184} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-17179869184} MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-1073741824}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec hf-gradfilter run --demo --output_dir demo_out "$@"
