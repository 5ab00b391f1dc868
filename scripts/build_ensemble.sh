#!/usr/bin/env bash
# Rebuild the shipped ensemble: evaluate it on dev and write its record, which `peft-mtl report`
# lists (reports/ensemble_mt6.ensemble.json). Six multi-task adapter sets on one backbone, equal
# weights, chosen by a rule fixed before any of them was scored (not by dev score): the shipped set,
# its annealed-sampling variant, the same recipe at the ablation budget, and three seeds of the
# default recipe from the comparison sweep (recipes/compare.yaml, recipe st_r16).
# Usage: scripts/build_ensemble.sh [extra peft-mtl ensemble flags, e.g. --int8 or --split test]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
exec peft-mtl ensemble adapters/all adapters/variants/mt_annealed adapters/ablation/ab_uniform \
  adapters/ensemble/st_r16_seed0 adapters/ensemble/st_r16_seed1 adapters/ensemble/st_r16_seed2 \
  --record reports/ensemble_mt6.ensemble.json "$@"
