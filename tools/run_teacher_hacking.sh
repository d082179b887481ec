#!/usr/bin/env bash
# The teacher-hacking study (Tiapkin et al. 2025, arXiv 2502.02671) at CPU scale,
# every stage one command; see docs/experiments/teacher_hacking.md.
#
#   bash tools/run_teacher_hacking.sh [STAGE ...]
#   bash tools/run_teacher_hacking.sh headline   # only what the headline figure needs
#
# Stages (default: all, in order): oracle oracle_data teacher student_sft
# teacher_data offline online_teacher online_student diversity gap lever
# lever_seeds lever2 lever3 const_seeds report.
# gap: the teacher's own golden KL G_T (teacher_gap.gin); lever: issue 24's
# teacher-size student, offline on 128 and 32 samples, online, and the diversity
# ablation at 32 (lever_*.gin); lever_seeds: seeds 1 and 2 of the 32- and
# 128-sample cells and of the online run; lever2: the second round (constant
# weak teacher, teacher_weak.gin, and its G_T, offline and online cells);
# lever3: 32 and 64 samples under the constant LR (constant_lr.gin) and the
# online run under it; const_seeds: seeds 1 and 2 of the constant-LR
# 32 x 1 cell and its online run, and its diversity ablation (16 x 2, 8 x 4)
# with 3 seeds.
# Finished stages are skipped (training runs resume from their checkpoints;
# existing datasets are kept), so the script can be re-run after an interruption.
# Outputs: runs/teacher_hacking/{oracle,teacher,student_sft,offline,...} (each
# with TensorBoard scalars), runs/teacher_hacking/data (TFDS datasets),
# docs/experiments/teacher_hacking_*.png and the summary table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=runs/teacher_hacking
DATA=$ROOT/data
GIN=gin/experiments/teacher_hacking
PY=${PYTHON:-python}
mkdir -p "$ROOT"

train() {  # train NAME [FLAG ...]: train/distill from one gin file
  echo "== $*"
  $PY -m posttrain_jax.main --gin_file="$GIN/$1.gin" "${@:2}"
}

generate() {  # generate NAME CHECKPOINT SPLIT PROMPTS GENERATIONS
  if [ -d "$DATA/posttrain_generated/$1" ]; then
    echo "== dataset $1 exists; skipped"
    return
  fi
  echo "== dataset $1: $4 prompts x $5 generations from $2"
  $PY tools/generate_dataset.py --checkpoint "$2" --output_dir "$DATA" --name "$1" \
    --split "$3" --num_prompts "$4" --generations_per_prompt "$5" \
    --prompt_length 32 --max_new_tokens 48 --temperature 1.0 --batch_size 128 --seed 0
}

seeded() {  # seeded RUN SEED: RUN's gin file with another seed, in RUN_seedSEED
  train "$1" --gin.distill.seed="$2" "--gin.RUN_DIR='$ROOT/${1}_seed$2'"
}

stage() {
  case "$1" in
    oracle) train oracle ;;
    oracle_data)
      generate oracle "$ROOT/oracle" train 3000 4
      generate oracle_validation "$ROOT/oracle" validation 96 1 ;;
    teacher) train teacher ;;
    student_sft) train student_sft ;;
    teacher_data)
      generate teacher_p512_g1 "$ROOT/teacher" train 512 1
      generate teacher_p256_g2 "$ROOT/teacher" train 256 2
      generate teacher_p128_g4 "$ROOT/teacher" train 128 4 ;;
    offline) train offline ;;
    online_teacher) train online_teacher ;;
    online_student) train online_student ;;
    diversity) train diversity_p256_g2; train diversity_p128_g4 ;;
    gap) train teacher_gap ;;
    lever)
      train lever_student_sft
      generate teacher_p128_g1 "$ROOT/teacher" train 128 1
      train lever_offline
      train lever_online_teacher
      generate teacher_p32_g1 "$ROOT/teacher" train 32 1
      train lever_offline_p32
      generate teacher_p16_g2 "$ROOT/teacher" train 16 2
      generate teacher_p8_g4 "$ROOT/teacher" train 8 4
      train lever_diversity_p16_g2
      train lever_diversity_p8_g4 ;;
    lever_seeds)  # seeds 1 and 2 of the 32- and 128-sample cells and the online run
      for seed in 1 2; do
        for run in lever_offline_p32 lever_online_teacher lever_offline; do
          seeded $run $seed
        done
      done ;;
    lever2)  # issue 24, second round: the weak teacher (constant LR: lever3)
      train lever_student_sft
      generate oracle_p375_g4 "$ROOT/oracle" train 375 4
      train teacher_weak
      train weak_gap
      generate weak_p128_g1 "$ROOT/teacher_weak" train 128 1
      generate weak_p32_g1 "$ROOT/teacher_weak" train 32 1
      train weak_offline
      train weak_online_teacher
      train weak_offline_p32 ;;
    lever3)  # issue 24: 32 and 64 samples under the constant LR, and its online counterpart
      train lever_student_sft
      generate teacher_p32_g1 "$ROOT/teacher" train 32 1
      train const_offline_p32
      generate teacher_p64_g1 "$ROOT/teacher" train 64 1
      train const_offline_p64
      train const_online_teacher ;;
    const_seeds)  # issue 24: the constant-LR 32 x 1 cell's diversity ablation and seeds
      generate teacher_p16_g2 "$ROOT/teacher" train 16 2
      generate teacher_p8_g4 "$ROOT/teacher" train 8 4
      seeded const_offline_p32 1; seeded const_offline_p32 2
      train const_diversity_p16_g2; train const_diversity_p8_g4
      seeded const_online_teacher 1; seeded const_online_teacher 2
      for seed in 1 2; do
        seeded const_diversity_p16_g2 $seed; seeded const_diversity_p8_g4 $seed
      done ;;
    report)
      $PY tools/plot_teacher_hacking.py --root "$ROOT" --out_dir docs/experiments ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

STAGES=("$@")
if [ "${STAGES[*]}" = "headline" ]; then  # just what the headline figure needs
  STAGES=(oracle oracle_data teacher teacher_data gap lever3 const_seeds report)
fi
if [ ${#STAGES[@]} -eq 0 ]; then
  STAGES=(oracle oracle_data teacher student_sft teacher_data offline online_teacher
          online_student diversity gap lever lever_seeds lever2 lever3 const_seeds report)
fi
for s in "${STAGES[@]}"; do stage "$s"; done
