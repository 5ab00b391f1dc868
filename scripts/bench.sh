#!/usr/bin/env bash
# Set up the environment (once) and run the benchmark: writes reports/bench.json and reports/bench.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
exec peft-mtl bench "$@"
