#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels a GPU machine without network needs to run this package beside its
# own torch (Python 3.12, x86-64): the versions the CPU test suite runs with. Writes .whl/ (about 20 MB) and
# keeps it out of git through .git/info/exclude; benchmarks/run_throughput_gpu.sh installs them from there.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  datasets==5.2.0 trl==1.16.0 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0 huggingface_hub==2.4.0 \
  dill==0.4.1 multiprocess==0.70.19
du -sh .whl
