#!/usr/bin/env bash
# Model ratatouille for reward models (Rame et al. 2023, arXiv 2212.10445) vs
# WARM vs one RM, and every merge method of tools/merge.py on the same reward
# models, at CPU scale; see docs/experiments/ratatouille.md.
#
#   bash tools/run_ratatouille.sh [STAGE ...]
#
# Stages (default: all, in order): sft data rm merge report policy policy_report.
#   sft     the SFT policy = the LM quickstart (runs/lm_quickstart; kept if it exists)
#   data    preference pairs from the SFT policy (runs/lm_quickstart), gold-labelled:
#           target train (1024 prompts, 25% flipped), clean validation (100),
#           out-of-distribution (100 validation-split prompts of 8 tokens sampled at
#           temperature 1.5), and two auxiliary tasks (512 prompts each, other
#           prompts / temperature / prompt length / label noise)
#   rm      probe (the target's linear probe on the SFT backbone, 20 steps);
#           warm_0 (= the single RM), warm_1: WARM members from the SFT backbone;
#           aux_a, aux_b: one RM per auxiliary task from the SFT backbone;
#           rat_a, rat_b: aux backbones + the target probe head, re-fine-tuned on the target
#   merge   WARM = average(warm_0, warm_1); ratatouille = average(rat_a, rat_b) and its
#           greedy soup; every method of tools/merge.py over the four target
#           fine-tunes with init = probe
#   report  tools/report_ratatouille.py: accuracies on validation and OOD pairs ->
#           table on stdout, docs/experiments/ratatouille.png; picks the best merge
#           (highest OOD accuracy among merges of >= 2 RMs, ties -> validation
#           accuracy, then table order) -> runs/ratatouille/best_merge.json
#   policy  two REINFORCE runs from the SFT policy (gin/experiments/ratatouille/policy.gin,
#           200 steps), identical but for the reward: policy_single (warm_0) and
#           policy_best (the best merge); training resumes from checkpoints
#   policy_report  tools/plot_ratatouille_policy.py: gold/proxy/KL over steps ->
#           docs/experiments/ratatouille_policy.png + tables on stdout
# Finished stages are skipped; outputs under runs/ratatouille.
# POLICY_ROOT (default runs/ratatouille/policy) holds the two policy runs and
# POLICY_ARGS adds gin flags to both, e.g. a smoke test:
#   POLICY_ROOT=/tmp/rat_policy POLICY_ARGS="--gin.NUM_STEPS=2" \
#     bash tools/run_ratatouille.sh policy
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/ratatouille
SFT=runs/lm_quickstart
PY=${PYTHON:-python}
POLICY_ROOT=${POLICY_ROOT:-$ROOT/policy}
POLICY_ARGS=${POLICY_ARGS:-}
mkdir -p "$ROOT/rm" "$ROOT/merge"

label() {  # label NAME SPLIT PROMPTS NOISE SEED TEMPERATURE PROMPT_LENGTH
  local out="$ROOT/preferences_$1.jsonl"
  if [ -f "$out" ]; then echo "== $out exists; skipped"; return; fi
  echo "== $out"
  $PY tools/label_preferences.py --checkpoint "$SFT" --output "$out.tmp" \
    --num_prompts "$3" --split "$2" --label_noise "$4" --seed "$5" \
    --temperature "$6" --prompt_length "$7" --max_new_tokens 32 --batch_size 64
  mv "$out.tmp" "$out"
}

rm_run() {  # rm_run NAME TRAIN_FILE INIT LR DATA_SEED PROBE_STEPS NUM_STEPS
  if [ -d "$ROOT/rm/$1/reward_model" ]; then echo "== rm $1 exists; skipped"; return; fi
  echo "== rm $1"
  $PY -m posttrain_jax.main --gin_file=gin/experiments/ratatouille/reward_model.gin \
    --gin.RUN_DIR="'$ROOT/rm/$1'" --gin.PREFERENCES_TRAIN="'$2'" \
    --gin.INITIAL_CHECKPOINT="'$3'" --gin.LR="$4" --gin.DATA_SEED="$5" \
    --gin.train_reward_model.seed="$5" \
    --gin.LINEAR_PROBE_STEPS="$6" --gin.NUM_STEPS="$7"
}

merge() {  # merge NAME METHOD ARGS...
  local out="$ROOT/merge/$1"; shift
  if [ -d "$out" ]; then echo "== merge $out exists; skipped"; return; fi
  $PY tools/merge.py "$1" --output "$out" "${@:2}"
}

policy_run() {  # policy_run NAME REWARD_DIR
  echo "== policy $1 (reward $2)"
  # shellcheck disable=SC2086  # POLICY_ARGS is a list of flags
  $PY -m posttrain_jax.main --gin_file=gin/experiments/ratatouille/policy.gin \
    --gin.RUN_DIR="'$POLICY_ROOT/$1'" --gin.REWARD="'$2'" $POLICY_ARGS
}

stage() {
  local R="$ROOT/rm"
  case "$1" in
    sft)
      if [ -d "$SFT/checkpoints" ]; then echo "== $SFT exists; reused"; return; fi
      echo "== sft"
      $PY -m posttrain_jax.main --gin_file=gin/experiments/lm_quickstart.gin ;;
    data)
      label target train 1024 0.25 0 1.0 16
      label validation validation 100 0.0 1 1.0 16
      label ood validation 100 0.0 2 1.5 8
      label aux_a train 512 0.0 10 1.3 16
      label aux_b train 512 0.1 11 1.0 24 ;;
    rm)
      rm_run probe "$ROOT/preferences_target.jsonl" "$SFT" 3e-4 0 20 20
      rm_run warm_0 "$ROOT/preferences_target.jsonl" "$SFT" 3e-4 0 20 80
      rm_run warm_1 "$ROOT/preferences_target.jsonl" "$SFT" 5e-4 1 20 80
      rm_run aux_a "$ROOT/preferences_aux_a.jsonl" "$SFT" 3e-4 0 20 80
      rm_run aux_b "$ROOT/preferences_aux_b.jsonl" "$SFT" 3e-4 1 20 80
      for a in a b; do
        if [ ! -d "$ROOT/rm/init_$a" ]; then
          $PY tools/merge.py swap_head --probe "$R/probe/reward_model" \
            --output "$ROOT/rm/init_$a" "$R/aux_$a/reward_model"
        fi
      done
      rm_run rat_a "$ROOT/preferences_target.jsonl" "$ROOT/rm/init_a" 3e-4 0 0 60
      rm_run rat_b "$ROOT/preferences_target.jsonl" "$ROOT/rm/init_b" 5e-4 1 0 60 ;;
    merge)
      local four=("$R"/warm_0/reward_model "$R"/warm_1/reward_model
                  "$R"/rat_a/reward_model "$R"/rat_b/reward_model)
      local init=(--init "$R/probe/reward_model")
      merge warm average "$R"/warm_{0,1}/reward_model
      merge ratatouille average "$R"/rat_{a,b}/reward_model
      merge ratatouille_greedy greedy_soup --pairs "$ROOT/preferences_validation.jsonl" \
        "$R"/rat_{a,b}/reward_model
      merge all_average average "${four[@]}"
      merge all_task_arithmetic task_arithmetic "${init[@]}" "${four[@]}" --lambdas 0.4
      merge all_ties ties "${init[@]}" --density 0.2 --lambda 1.0 "${four[@]}"
      merge all_dare dare "${init[@]}" --drop 0.9 --seed 0 "${four[@]}"
      merge all_model_stock model_stock "${init[@]}" "${four[@]}"
      merge all_greedy greedy_soup --pairs "$ROOT/preferences_validation.jsonl" "${four[@]}" ;;
    report)
      $PY tools/report_ratatouille.py --root "$ROOT" --out docs/experiments/ratatouille.png ;;
    policy)
      if [ ! -f "$ROOT/best_merge.json" ]; then
        echo "no $ROOT/best_merge.json: run the report stage first" >&2; exit 2
      fi
      local best
      best=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["path"])' \
        "$ROOT/best_merge.json")
      policy_run policy_single "$R/warm_0/reward_model"
      policy_run policy_best "$best" ;;
    policy_report)
      $PY tools/plot_ratatouille_policy.py --root "$POLICY_ROOT" \
        --best "$ROOT/best_merge.json" --out docs/experiments/ratatouille_policy.png ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then STAGES=(sft data rm merge report policy policy_report); fi
for s in "${STAGES[@]}"; do stage "$s"; done
