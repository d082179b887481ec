#!/usr/bin/env bash
# The WARP experiment (Rame et al. 2024, arXiv 2406.16768) at CPU scale on the
# WARM setup (SFT policy runs/lm_quickstart, proxy reward model = WARM member 0);
# see docs/experiments/warp.md.
#
#   bash tools/run_warp.sh [STAGE ...]
#
# Stages (default: all, in order): setup anchors warp fronts report.
#   setup    the SFT policy, preference data and reward model member 0 of the WARM
#            setup (tools/run_warm.sh sft data + gin/experiments/warm_rl/member_0.gin;
#            kept if they exist)
#   anchors  (1) REINFORCE with the SFT anchor vs the EMA anchor
#            (gin/experiments/warp/anchor_{sft,ema}.gin), 100 steps each
#   warp     the warp job (gin/experiments/warp/warp.gin): M = 2 runs x I = 3
#            iterations x 100 steps, eta 0.3; M=3 (set M3=1) adds the same with M = 3
#   fronts   tools/eval_front.py: (2) SLERP and LERP of iteration 1's two runs at
#            lambda in [0, 1]; (3) the LITI fronts (1 - eta) SFT + eta slerp^i for
#            i = 1..I; the SFT and the anchor runs -> runs/warp/fronts/*.json
#   report   tools/plot_warp.py -> docs/experiments/warp_{anchor,slerp,liti}.png + tables
# Finished stages are skipped (runs and the warp job resume; existing front files
# are kept), so the script can be re-run after an interruption. SEED (default 0)
# seeds the evaluation samples; outputs under runs/warp.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/warp
SFT=runs/lm_quickstart
RM=runs/warm_rl/rm/member_0/reward_model
PY=${PYTHON:-python}
SEED=${SEED:-0}
GRID=${GRID:-0,0.25,0.5,0.75,1}
EVAL=(--sft "$SFT" --reward "$RM" --num_prompts 64 --samples_per_prompt 2 --seed "$SEED")
mkdir -p "$ROOT/fronts"

front() {  # front NAME MODE ARGS...
  local out="$ROOT/fronts/$1.json"; shift
  if [ -f "$out" ]; then echo "== $out exists; skipped"; return; fi
  echo "== $out"
  $PY tools/eval_front.py "${EVAL[@]}" --out "$out.tmp" "$@"
  mv "$out.tmp" "$out"
}

warp_fronts() {  # warp_fronts JOB_DIR NAME
  local iters
  iters=$(ls -d "$1"/iteration_* 2>/dev/null | wc -l)
  for i in $(seq 1 "$iters"); do
    front "${2}_liti_$i" liti --merge "$1/iteration_$i/slerp" --grid "$GRID"
  done
}

stage() {
  case "$1" in
    setup)
      bash tools/run_warm.sh sft data
      if [ -d "$RM" ]; then echo "== $RM exists; reused"; else
        $PY -m posttrain_jax.main --gin_file=gin/experiments/warm_rl/member_0.gin; fi ;;
    anchors)
      for a in sft ema; do
        echo "== anchor_$a"
        $PY -m posttrain_jax.main --gin_file="gin/experiments/warp/anchor_$a.gin"
      done ;;
    warp)
      echo "== warp M=2"
      $PY -m posttrain_jax.main --gin_file=gin/experiments/warp/warp.gin
      if [ "${M3:-0}" = 1 ]; then
        echo "== warp M=3"
        $PY -m posttrain_jax.main --gin_file=gin/experiments/warp/warp.gin \
          --gin.RUN_DIR="'$ROOT/warp_m3'" --gin.warp.num_runs=3
      fi ;;
    fronts)
      front endpoints models "$SFT" "$ROOT/anchor_sft" "$ROOT/anchor_ema" \
        --labels sft,anchor_sft,anchor_ema
      local it1="$ROOT/warp_m2/iteration_1"
      front slerp slerp --init "$SFT" --a "$it1/run_0" --b "$it1/run_1" --grid "$GRID"
      front lerp slerp --init "$SFT" --a "$it1/run_0" --b "$it1/run_1" --grid "$GRID" --lerp
      warp_fronts "$ROOT/warp_m2" m2
      if [ -d "$ROOT/warp_m3" ]; then warp_fronts "$ROOT/warp_m3" m3; fi ;;
    report)
      $PY tools/plot_warp.py --root "$ROOT" --out_dir docs/experiments ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ]; then
  STAGES=(setup anchors warp fronts report)
fi
for s in "${STAGES[@]}"; do stage "$s"; done
