#!/usr/bin/env bash
# Rebuild the shipped ensembles and write the records `peft-mtl report` lists. Members' outputs are
# cached in ~/.cache/peft_mtl/outputs, so a rerun costs no forward pass. The pools are fixed by a
# rule, not by score:
#   1. reports/ensemble_students.ensemble.json, the shipped ensemble: every seed of the default
#      recipe of `scripts/train_adapter.sh all` (the distilled students; adapters/all is seed 0) at
#      equal weights. Nothing is chosen on dev, so its dev score is an honest one.
#   2. reports/ensemble_bagged.ensemble.json: every set in adapters/ trained on the labels alone
#      (multi-task and single-task, any rank, budget or seed), per-task weights by bagged ensemble
#      selection (Caruana et al. 2004: 20 random halves of the sets, each greedily selected from its
#      3 best, averaged), with the cross-fitted score (weights chosen on one half of dev, scored on
#      the other) next to the in-sample one. It is also the teacher the students learn from.
#   3. reports/ensemble_distilled.ensemble.json: the same selection over that pool plus the students.
#   4. reports/ensemble_seeds3.ensemble.json: the label-trained recipe's three seeds at equal weights,
#      the teacher of the control run that sees no dev-chosen weight (recipes/distill.yaml).
# Usage: scripts/build_ensemble.sh [extra peft-mtl ensemble flags, e.g. --int8 or --no-progress]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
POOL=(adapters/ensemble/default_bf16_seed0 adapters/ensemble/st_r16_4ep_seed0 adapters/ensemble/st_r16_4ep_seed1
  adapters/ensemble/st_r16_4ep_seed2 adapters/variants/mt_annealed adapters/ablation/ab_uniform
  adapters/ablation/ab_noshared adapters/ablation/ab_staggered adapters/ablation/ab_annealed
  adapters/ensemble/st_r16_seed0 adapters/ensemble/st_r16_seed1 adapters/ensemble/st_r16_seed2
  adapters/ensemble/r4_lr2e-3_seed0 adapters/ensemble/r4_lr2e-3_seed1 adapters/ensemble/r4_lr2e-3_seed2
  adapters/variants/mt_heads adapters/sst adapters/variants/sst_2ep adapters/variants/sst_bregman_2ep
  adapters/variants/sst_cls_2ep adapters/variants/sst_r4_2ep adapters/variants/sst_r8_2ep
  adapters/variants/sst_smart_2ep adapters/quantized/sst_fp32 adapters/quantized/sst_bf16
  adapters/quantized/sst_int8 adapters/quantized/sst_nf4)
STUDENTS=(adapters/all adapters/ensemble/distill6_seed1 adapters/ensemble/distill6_seed2
  adapters/ensemble/distill6_seed3)
CACHE="${PEFT_MTL_CACHE:-$HOME/.cache/peft_mtl}/outputs"
peft-mtl ensemble "${STUDENTS[@]}" --cache-dir "$CACHE" \
  --record reports/ensemble_students.ensemble.json "$@"
peft-mtl ensemble "${POOL[@]}" --select bagged --cache-dir "$CACHE" \
  --record reports/ensemble_bagged.ensemble.json "$@"
peft-mtl ensemble "${POOL[@]}" "${STUDENTS[@]}" --select bagged --cache-dir "$CACHE" \
  --record reports/ensemble_distilled.ensemble.json "$@"
peft-mtl ensemble adapters/ensemble/st_r16_4ep_seed0 adapters/ensemble/st_r16_4ep_seed1 \
  adapters/ensemble/st_r16_4ep_seed2 --cache-dir "$CACHE" --record reports/ensemble_seeds3.ensemble.json "$@"
