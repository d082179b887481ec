#!/usr/bin/env bash
# Diversity-rewarded CFG distillation at CPU scale (Cideron et al. 2024, arXiv
# 2410.06084): docs/experiments/cfg_distillation.md.
#
#   bash tools/run_cfg_distillation.sh [STAGE ...]
#
# Stages (default: all, in order): base train front report.
#   base   theta_0 = the 60-step LM quickstart (runs/lm_quickstart; kept if it exists)
#   train  per seed: the quality student (beta = 0) and the diversity student
#          (beta = BETA, default 15), gin/experiments/cfg_distillation/{quality,diversity}.gin,
#          NUM_STEPS (default 400) steps of 8 prompts x 2 samples, gamma = 3; for the
#          first seed also the beta sweep's middle point (beta = BETA_MID, default 5)
#   front  per seed: tools/cfg_front.py: the gamma sweep of CFG sampling of theta_0,
#          the LERP grid between the two students (+ beta_mid) -> runs/cfg_distillation/front_seed$s.json
#          (+ front_seed$s.png)
#   report tools/cfg_front.py --combine: mean +- stderr over the seeds -> table on stdout,
#          docs/experiments/cfg_distillation.png
# Finished runs resume (complete ones are skipped by their checkpoints).
# SEEDS (default "0 1 2") picks the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/cfg_distillation
BASE=runs/lm_quickstart
PY=${PYTHON:-python}
SEEDS=${SEEDS:-"0 1 2"}
BETA=${BETA:-15.0}
NUM_STEPS=${NUM_STEPS:-400}
BETA_MID=${BETA_MID:-5.0}
FIRST_SEED=${SEEDS%% *}
mkdir -p "$ROOT"

stage() {
  case "$1" in
    base)
      if [ -d "$BASE/checkpoints" ]; then echo "== $BASE exists; reused"; return; fi
      $PY -m posttrain_jax.main --gin_file=gin/experiments/lm_quickstart.gin --gin.NUM_STEPS=60 ;;
    train)
      for s in $SEEDS; do
        kinds="quality diversity"
        [ "$s" = "$FIRST_SEED" ] && kinds="quality diversity beta_mid"
        for kind in $kinds; do
          echo "== $kind seed $s"
          case "$kind" in
            quality) gin=quality; beta=0.0 ;;
            diversity) gin=diversity; beta=$BETA ;;
            beta_mid) gin=diversity; beta=$BETA_MID ;;
          esac
          $PY -m posttrain_jax.main --gin_file=gin/experiments/cfg_distillation/$gin.gin \
            --gin.RUN_DIR="'$ROOT/${kind}_seed$s'" --gin.NUM_STEPS="$NUM_STEPS" \
            --gin.cfg_distill.seed="$s" --gin.train_prompts/PromptConfig.seed="$s" \
            --gin.BETA="$beta"
        done
      done ;;
    front)
      for s in $SEEDS; do
        extra=()
        [ -d "$ROOT/beta_mid_seed$s" ] && extra=(--extra "beta=$BETA_MID=$ROOT/beta_mid_seed$s")
        $PY tools/cfg_front.py --base "$BASE" --quality "$ROOT/quality_seed$s" \
          --diversity "$ROOT/diversity_seed$s" --seed "$s" "${extra[@]}" \
          --out "$ROOT/front_seed$s.json" --plot "$ROOT/front_seed$s.png"
      done ;;
    report)
      files=()
      for s in $SEEDS; do files+=("$ROOT/front_seed$s.json"); done
      $PY tools/cfg_front.py --combine "${files[@]}" --out "$ROOT/front_mean.json" \
        --plot docs/experiments/cfg_distillation.png ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=(base train front report); fi
for s in "${STAGES[@]}"; do stage "$s"; done
