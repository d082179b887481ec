#!/usr/bin/env bash
# The CLP experiment (Wang et al. 2024, arXiv 2407.15762) at CPU scale; see
# docs/experiments/clp.md.
#
#   bash tools/run_clp.sh [STAGE ...]
#
# Stages (default: all, in order): sft train fronts report.
#   sft     the SFT policy = the LM quickstart (runs/lm_quickstart; kept if it exists)
#   train   CLP runs gin/experiments/clp/{prompt,full,attn,logit}.gin and the rewarded
#           soups members (train_policy, gin/experiments/clp/soup_member.gin) on the
#           single rewards gold and brevity; 100 RL steps each, JOBS of them at a time;
#           full_200 and logit_200: full/logit-CLP with 200 steps (the soups' 2 x 100)
#   fronts  tools/eval_front.py: every CLP run over the w grid (mode clp), the soup
#           LERP (1 - w_1) theta_gold + w_1 theta_brevity (mode slerp --lerp) and the
#           SFT model; E[gold], E[brevity] and KL to SFT per point
#   report  tools/plot_clp.py: docs/experiments/clp.png + tables on stdout
# Finished runs resume/skip (train_clp and train_policy resume from checkpoints;
# existing front JSONs are kept). Outputs under runs/clp.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/clp
SFT=runs/lm_quickstart
PY=${PYTHON:-python}
JOBS=${JOBS:-2}
GRID=${GRID:-0,0.25,0.5,0.75,1}
mkdir -p "$ROOT/fronts" "$ROOT/logs"

train_one() {  # NAME GIN_ARGS...
  local name=$1; shift
  echo "== $ROOT/$name"
  $PY -m posttrain_jax.main "$@" > "$ROOT/logs/$name.log" 2>&1 || {
    echo "FAILED: $name (see $ROOT/logs/$name.log)"; return 1; }
  tail -n 1 "$ROOT/logs/$name.log"
}

front() {  # NAME ARGS...
  local name=$1; shift
  local out="$ROOT/fronts/$name.json"
  if [ -f "$out" ]; then echo "== $out exists; skipped"; return; fi
  echo "== $out"
  $PY tools/eval_front.py --sft "$SFT" --reward gold --rewards gold,brevity \
    --num_prompts 32 --samples_per_prompt 2 --seed 0 --out "$out.tmp" "$@"
  mv "$out.tmp" "$out"
}

stage() {
  case "$1" in
    sft)
      if [ -d "$SFT/checkpoints" ]; then echo "== $SFT exists; kept"; else
        $PY -m posttrain_jax.main --gin_file=gin/experiments/lm_quickstart.gin; fi ;;
    train)
      local pids=() cmds=()
      for v in prompt full attn logit; do
        cmds+=("$v --gin_file=gin/experiments/clp/$v.gin")
      done
      for v in full logit; do  # the soups' train steps (2 runs x 100) for one CLP model
        cmds+=("${v}_200 --gin_file=gin/experiments/clp/$v.gin --gin.NUM_STEPS=200 --gin.RUN_DIR='$ROOT/${v}_200'")
      done
      for r in gold brevity; do
        cmds+=("soup_$r --gin_file=gin/experiments/clp/soup_member.gin --gin.REWARD='$r' --gin.RUN_DIR='$ROOT/soup_$r'")
      done
      for c in "${cmds[@]}"; do
        # shellcheck disable=SC2086
        train_one $c & pids+=($!)
        if [ "${#pids[@]}" -ge "$JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
      done
      for p in "${pids[@]}"; do wait "$p"; done ;;
    fronts)
      front sft models "$SFT" --labels sft
      front soups slerp --lerp --init "$SFT" --a "$ROOT/soup_gold" --b "$ROOT/soup_brevity" \
        --grid "$GRID"
      for v in prompt full attn logit full_200 logit_200; do
        front "$v" clp "$ROOT/$v" --grid "$GRID"
      done ;;
    report)
      $PY tools/plot_clp.py --fronts "$ROOT/fronts" --out docs/experiments/clp.png ;;
    *) echo "unknown stage $1"; exit 2 ;;
  esac
}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(sft train fronts report)
for s in "${STAGES[@]}"; do stage "$s"; done
