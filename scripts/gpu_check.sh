#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, in the repository root, in under 10 minutes.
# Uses the machine's own python3 with a CUDA build of torch (the CPU .venv's torch is CPU-only);
# packages it lacks can be given as wheels in $WHEELS (pip install --no-index, no network needed).
# Writes reports/bench_cuda.json and reports/bench_cuda.md (benchmarks/gpu_check.py says what is in them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" benchmarks/gpu_check.py "$@"
