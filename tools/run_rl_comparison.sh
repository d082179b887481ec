#!/usr/bin/env bash
# REINFORCE + EMA anchor, RLOO, GRPO and DPO on the gold reward at CPU scale,
# from the same SFT model with the same sample budget; docs/rlhf.md,
# "Algorithms compared".
#
#   bash tools/run_rl_comparison.sh [STAGE ...]
#
# Stages (default: all, in order): sft data rl dpo eval report.
#   sft     the SFT model = the 60-step LM quickstart (runs/lm_quickstart; kept if it exists)
#   data    DPO's pairs, per seed: 1,600 train prompts sampled twice from the SFT
#           model (3,200 samples, the RL runs' budget), labelled by the gold
#           reward (no label noise); 100 validation prompts
#   rl      per seed: reinforce_ema (gin/experiments/rl/reinforce_tiny.gin),
#           rloo (gin/experiments/rloo_gold.gin), grpo (gin/experiments/grpo_gold.gin):
#           200 steps x 4 prompts x 4 samples = 3,200 samples each
#   dpo     per seed: gin/experiments/dpo_tiny.gin on that seed's pairs, 200 steps
#           of 16 pairs (2 epochs)
#   eval    tools/eval_policy.py of every final policy and of the SFT model: 64
#           held-out prompts x 4 samples at temperature 1 -> RUN/eval.json
#   report  tools/plot_rl_comparison.py -> docs/rlhf_comparison.png + table
# Finished stages are skipped (runs resume from checkpoints; existing data and
# eval files are kept). SEEDS (default "0 1") picks the seeds; outputs in
# runs/rl_comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/rl_comparison
SFT=runs/lm_quickstart
PY=${PYTHON:-python}
SEEDS=${SEEDS:-"0 1"}
BUDGET=(--gin.NUM_STEPS=200 --gin.PROMPTS_PER_STEP=4 --gin.SAMPLES_PER_PROMPT=4)
mkdir -p "$ROOT"

label() {  # label SEED SPLIT PROMPTS OUT
  if [ -f "$4" ]; then echo "== $4 exists; skipped"; return; fi
  echo "== $4: $3 prompts from $SFT ($2 split)"
  $PY tools/label_preferences.py --checkpoint "$SFT" --output "$4.tmp" \
    --num_prompts "$3" --split "$2" --seed "$1" --temperature 1.0 \
    --prompt_length 24 --max_new_tokens 32 --batch_size 64
  mv "$4.tmp" "$4"
}

rl_gin() {
  case "$1" in
    reinforce_ema) echo gin/experiments/rl/reinforce_tiny.gin ;;
    rloo) echo gin/experiments/rloo_gold.gin ;;
    grpo) echo gin/experiments/grpo_gold.gin ;;
  esac
}

stage() {
  case "$1" in
    sft)
      if [ -d "$SFT/checkpoints" ]; then echo "== $SFT exists; reused"; return; fi
      $PY -m posttrain_jax.main --gin_file=gin/experiments/lm_quickstart.gin --gin.NUM_STEPS=60 ;;
    data)
      for s in $SEEDS; do label "$s" train 1600 "$ROOT/pairs_train_seed$s.jsonl"; done
      label 100 validation 100 "$ROOT/pairs_validation.jsonl" ;;
    rl)
      for s in $SEEDS; do
        for algo in reinforce_ema rloo grpo; do
          echo "== $algo seed $s"
          $PY -m posttrain_jax.main --gin_file="$(rl_gin $algo)" "${BUDGET[@]}" \
            --gin.RUN_DIR="'$ROOT/${algo}_seed$s'" --gin.train_policy.seed="$s" \
            --gin.train_prompts/PromptConfig.seed="$s" --gin.train_policy.eval_every=50
        done
      done ;;
    dpo)
      for s in $SEEDS; do
        echo "== dpo seed $s"
        $PY -m posttrain_jax.main --gin_file=gin/experiments/dpo_tiny.gin \
          --gin.RUN_DIR="'$ROOT/dpo_seed$s'" --gin.NUM_STEPS=200 --gin.BATCH_SIZE=16 \
          --gin.PREFERENCES_TRAIN="'$ROOT/pairs_train_seed$s.jsonl'" \
          --gin.PREFERENCES_VALIDATION="'$ROOT/pairs_validation.jsonl'" \
          --gin.dpo_train/DatasetConfig.seed="$s"
      done ;;
    eval)
      for run in "$SFT" "$ROOT"/*_seed*; do
        [ -d "$run" ] || continue
        out="$run/eval.json"
        [ "$run" = "$SFT" ] && out="$ROOT/sft_eval.json"
        if [ -f "$out" ]; then echo "== $out exists; skipped"; continue; fi
        echo "== eval $run"
        $PY tools/eval_policy.py --checkpoint "$run" --sft "$SFT" --out "$out"
      done ;;
    report)
      $PY tools/plot_rl_comparison.py --root "$ROOT" --out docs/rlhf_comparison.png ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=(sft data rl dpo eval report); fi
for s in "${STAGES[@]}"; do stage "$s"; done
