#!/usr/bin/env bash
# Streaming DiLoCo against a bf16 data-parallel baseline (issue 17;
# docs/experiments/streaming_diloco.md, "Headline on the bf16 baseline").
#
#   bash tools/run_streaming_diloco_bf16.sh [STAGE ...]
#
# Stages (default: all, in order):
#   headline  streaming_fp4_h30_b128_1800.gin (H = 30, FP4 block 128, outer lr
#             0.9), seeds $SEEDS (default "0 1 2"), 1,800 steps each
#   front     seed 0 at H = 45 and H = 60 (the bytes-vs-gap front)
#   dp        data_parallel_1800.gin, seeds $SEEDS (skip when the runs exist)
#   report    tools/plot_streaming_diloco_front.py -> docs/experiments/streaming_diloco_front.png
#             (dp losses: runs under $ROOT, else $DP_LOSS)
# One run at a time (nice -n 5); finished runs are skipped (eval json present).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SEEDS=${SEEDS:-"0 1 2"}
ROOT=runs/streaming_diloco
STAGES=${*:-headline front dp report}
# Data-parallel eval losses of the issue-6 table (same gin, seeds and batches),
# used for seeds whose dp run is not under $ROOT; a dp_seed<S> run overrides.
DP_LOSS=${DP_LOSS:-0=3.3626,1=3.3629,2=3.3968}

run() {  # run GIN NAME SEED [EXTRA...]
  local gin=$1 name=$2 seed=$3; shift 3
  local dir=$ROOT/${name}_seed$seed
  if [ -e "$dir/done" ]; then echo "== $dir done; skipped"; return; fi
  echo "== $dir ($(date -u +%H:%M:%S))"
  nice -n 5 $PY -m posttrain_jax.main --gin_file=gin/experiments/streaming_diloco/$gin.gin \
    --gin.train.seed=$seed --gin.DatasetConfig.seed=$seed \
    --gin.RUN_DIR="'$dir'" --gin.train.eval_every=100 --gin.train.log_every=100 "$@" \
    > "$dir.log" 2>&1
  touch "$dir/done"
}

mkdir -p $ROOT
for stage in $STAGES; do
  case $stage in
    headline) for s in $SEEDS; do run streaming_fp4_h30_b128_1800 h30_b128 $s; done ;;
    front)
      run streaming_fp4_h30_b128_1800 h45_b128 0 --gin.DiLoCoConfig.sync_every=45
      run streaming_fp4_h30_b128_1800 h60_b128 0 --gin.DiLoCoConfig.sync_every=60 ;;
    dp) for s in $SEEDS; do run data_parallel_1800 dp $s; done ;;
    report) $PY tools/plot_streaming_diloco_front.py $ROOT \
              --out docs/experiments/streaming_diloco_front.png --dp_loss "$DP_LOSS" \
              --extra "FP4 b128 H=15 (issue 6):15:0.48,0.40,0.31" ;;
    *) echo "unknown stage $stage"; exit 1 ;;
  esac
done
