#!/usr/bin/env bash
# The WARM experiment (Rame et al. 2024, arXiv 2401.12187) at CPU scale: RL
# against one proxy reward model vs against WARM (M = 3); see
# docs/experiments/warm.md.
#
#   bash tools/run_warm.sh [STAGE ...]
#
# Stages (default: all, in order): sft data rm merge score policy_single
# policy_warm report.
#   sft            the SFT policy = the LM quickstart (runs/lm_quickstart; kept if it exists)
#   data           preference pairs sampled from the SFT policy, labelled by the gold
#                  reward: 1024 train prompts with 25% flipped labels, 100 clean
#                  validation prompts
#   rm             WARM members 0, 1, 2 (gin/experiments/warm_rl/member_*.gin);
#                  member 0 is also the single proxy reward model
#   merge          WARM = uniform weight average of the three members
#   score          tools/score.py of every reward model on the validation and
#                  train pairs -> runs/warm_rl/rm_scores.txt (stderr: score.log)
#   policy_single  REINFORCE against member 0 (gin/experiments/warm_rl/policy_single.gin)
#   policy_warm    REINFORCE against WARM (gin/experiments/warm_rl/policy_warm.gin)
#   report         tools/plot_warm.py: docs/experiments/warm_*.png + table on stdout
# Finished stages are skipped (training runs resume from their checkpoints;
# existing datasets, reward models and merges are kept), so the script can be
# re-run after an interruption. Outputs under runs/warm_rl.
#
# Variants of the two RL runs (same reward models): RL_ROOT (default
# runs/warm_rl) holds policy_single/ and policy_warm/, RL_ARGS adds gin flags to
# both, PLOT_NAME names the figure (default warm_curves.png), e.g.
#   RL_ROOT=runs/warm_rl/seed1 RL_ARGS="--gin.train_policy.seed=1" \
#     PLOT_NAME=warm_curves_seed1.png bash tools/run_warm.sh policy_single policy_warm report
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/warm_rl
GIN=gin/experiments/warm_rl
SFT=runs/lm_quickstart
PY=${PYTHON:-python}
RL_ROOT=${RL_ROOT:-$ROOT}
RL_ARGS=${RL_ARGS:-}
PLOT_NAME=${PLOT_NAME:-warm_curves.png}
mkdir -p "$ROOT/rm"

label() {  # label NAME SPLIT PROMPTS NOISE SEED
  local out="$ROOT/preferences_$1.jsonl"
  if [ -f "$out" ]; then echo "== $out exists; skipped"; return; fi
  echo "== $out: $3 prompts from $SFT ($2 split), label noise $4"
  $PY tools/label_preferences.py --checkpoint "$SFT" --output "$out.tmp" \
    --num_prompts "$3" --split "$2" --label_noise "$4" --seed "$5" \
    --temperature 1.0 --prompt_length 16 --max_new_tokens 32 --batch_size 64
  mv "$out.tmp" "$out"
}

score() {  # score NAME DIR
  for split in validation train; do
    echo "-- $1 on $split pairs"
    $PY tools/score.py --reward_model "$2" --input "$ROOT/preferences_$split.jsonl" \
      --gold --batch_size 64
  done
}

stage() {
  case "$1" in
    sft)
      if [ -d "$SFT/checkpoints" ]; then echo "== $SFT exists; reused"; return; fi
      echo "== sft"
      $PY -m posttrain_jax.main --gin_file=gin/experiments/lm_quickstart.gin ;;
    data)
      label train train 1024 0.25 0
      label validation validation 100 0.0 1 ;;
    rm)
      for m in 0 1 2; do
        if [ -d "$ROOT/rm/member_$m/reward_model" ]; then
          echo "== member $m exists; skipped"; continue
        fi
        echo "== member $m"
        $PY -m posttrain_jax.main --gin_file="$GIN/member_$m.gin"
      done ;;
    merge)
      if [ -d "$ROOT/rm/warm" ]; then echo "== $ROOT/rm/warm exists; skipped"; return; fi
      echo "== merge"
      $PY tools/merge.py average --output "$ROOT/rm/warm" \
        "$ROOT"/rm/member_{0,1,2}/reward_model ;;
    score)
      echo "== score"
      { for m in 0 1 2; do score "member $m" "$ROOT/rm/member_$m/reward_model"; done
        score "WARM (M=3)" "$ROOT/rm/warm"; } 2>"$ROOT/score.log" | tee "$ROOT/rm_scores.txt" ;;
    policy_single|policy_warm)
      echo "== $1"
      # shellcheck disable=SC2086  # RL_ARGS is a list of flags
      $PY -m posttrain_jax.main --gin_file="$GIN/$1.gin" --gin.RUN_DIR="'$RL_ROOT/$1'" $RL_ARGS ;;
    report)
      $PY tools/plot_warm.py --root "$RL_ROOT" --out_dir docs/experiments --out_name "$PLOT_NAME" ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then
  STAGES=(sft data rm merge score policy_single policy_warm report)
fi
for s in "${STAGES[@]}"; do stage "$s"; done
