#!/usr/bin/env bash
# Set up (if needed), lint (ruff, rules in pyproject.toml), then run the test suite (offline; about four
# minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -rs --timeout 900 "$@"
