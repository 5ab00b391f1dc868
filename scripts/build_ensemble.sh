#!/usr/bin/env bash
# Rebuild the shipped ensemble: evaluate every adapter set shipped in adapters/ on dev, choose
# per-task member weights by bagged ensemble selection (Caruana et al. 2004: 20 random halves of
# the sets, each greedily selected from its 3 best, averaged) and write the record that
# `peft-mtl report` lists (reports/ensemble_bagged.ensemble.json) — with the cross-fitted score
# (weights chosen on one half of dev, scored on the other), the honest one, next to the in-sample one.
# The pool is fixed by a rule, not by score: every set in adapters/ (multi-task and single-task,
# any rank, budget or seed). Members' outputs are cached in ~/.cache/peft_mtl/outputs, so a rerun
# with other flags costs no forward pass.
# Usage: scripts/build_ensemble.sh [extra peft-mtl ensemble flags, e.g. --int8 or --no-progress]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
exec peft-mtl ensemble adapters/all adapters/ensemble/st_r16_4ep_seed0 adapters/ensemble/st_r16_4ep_seed1 \
  adapters/ensemble/st_r16_4ep_seed2 adapters/variants/mt_annealed adapters/ablation/ab_uniform \
  adapters/ablation/ab_noshared adapters/ablation/ab_staggered adapters/ablation/ab_annealed \
  adapters/ensemble/st_r16_seed0 adapters/ensemble/st_r16_seed1 adapters/ensemble/st_r16_seed2 \
  adapters/ensemble/r4_lr2e-3_seed0 adapters/ensemble/r4_lr2e-3_seed1 adapters/ensemble/r4_lr2e-3_seed2 \
  adapters/variants/mt_heads adapters/sst adapters/variants/sst_2ep adapters/variants/sst_bregman_2ep \
  adapters/variants/sst_cls_2ep adapters/variants/sst_r4_2ep adapters/variants/sst_r8_2ep \
  adapters/variants/sst_smart_2ep adapters/quantized/sst_fp32 adapters/quantized/sst_bf16 \
  adapters/quantized/sst_int8 adapters/quantized/sst_nf4 \
  --select bagged --cache-dir "${PEFT_MTL_CACHE:-$HOME/.cache/peft_mtl}/outputs" \
  --record reports/ensemble_bagged.ensemble.json "$@"
