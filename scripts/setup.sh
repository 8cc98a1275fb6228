#!/usr/bin/env bash
# Set-up from nothing: a virtual environment in .venv with this package, its test extras and the [ann] extra
# (faiss-cpu: the approximate near-duplicate search, which the tests exercise).
# When the environment has no torch yet, torch 2.13.0 is installed first (the CPU build where the
# machine provides it); a torch you installed yourself (e.g. a CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[test,ann]"
