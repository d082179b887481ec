#!/usr/bin/env bash
# BOND / J-BOND at CPU scale against the gold reward (docs/experiments/bond.md).
#
#   bash tools/run_bond.sh [STAGE ...]
#
# Stages (default: all, in order): sft rl report.
#   sft     the SFT model = the 60-step LM quickstart (runs/lm_quickstart; kept if it exists)
#   rl      from the same SFT model, r = the gold reward, NUM_STEPS (100) steps x 4
#           prompts, eval on 64 held-out prompts every 25 steps:
#             jbond            gin/experiments/bond/jbond_gold.gin (1 policy + 2 anchor samples)
#             reinforce_b*     REINFORCE, 2 samples, leave-one-out, KL to SFT, beta_RL in BETAS
#             bond_oneshot     gin/experiments/bond/bond_oneshot.gin (Best-of-4 of SFT, k = 8)
#             bond_iterative   gin/experiments/bond/bond_iterative.gin (Best-of-2, reset / 25 steps)
#   report  tools/plot_bond.py -> docs/experiments/bond.png + table
# Finished runs are skipped (they resume from checkpoints). SEED (default 0);
# outputs in runs/bond.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/bond
SFT=runs/lm_quickstart
PY=${PYTHON:-python}
SEED=${SEED:-0}
NUM_STEPS=${NUM_STEPS:-100}
BETAS=${BETAS:-"0.01 0.1 1.0"}
COMMON=(--gin.NUM_STEPS="$NUM_STEPS" --gin.PROMPTS_PER_STEP=4 --gin.train_policy.eval_every=25
        --gin.train_policy.seed="$SEED" --gin.train_prompts/PromptConfig.seed="$SEED"
        --gin.train_policy.checkpoint_every=50)
mkdir -p "$ROOT"

rl() {  # rl NAME GIN [FLAGS...]
  local name=$1 gin=$2; shift 2
  echo "== $name"
  nice -n 5 $PY -m posttrain_jax.main --gin_file="$gin" "${COMMON[@]}" \
    --gin.RUN_DIR="'$ROOT/${name}_seed$SEED'" "$@"
}

stage() {
  case "$1" in
    sft)
      if [ -d "$SFT/checkpoints" ]; then echo "== $SFT exists; reused"; return; fi
      $PY -m posttrain_jax.main --gin_file=gin/experiments/lm_quickstart.gin --gin.NUM_STEPS=60 ;;
    rl)
      rl jbond gin/experiments/bond/jbond_gold.gin
      for b in $BETAS; do
        rl "reinforce_b$b" gin/experiments/rl/reinforce_tiny.gin --gin.SAMPLES_PER_PROMPT=2 \
          --gin.train_policy.beta="$b" --gin.train_policy.anchor="'sft'"
      done
      rl bond_oneshot gin/experiments/bond/bond_oneshot.gin
      rl bond_iterative gin/experiments/bond/bond_iterative.gin ;;
    report)
      $PY tools/plot_bond.py --root "$ROOT" --out docs/experiments/bond.png ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=(sft rl report); fi
for s in "${STAGES[@]}"; do stage "$s"; done
