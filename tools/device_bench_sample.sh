#!/usr/bin/env bash
# Sampling benchmark on a lent GPU: the Gemma-2-2B shape, batch 64, prompt 128,
# 128 new tokens, bf16, ours vs transformers' generate with the same weights.
# Usage (from the repo root): bash tools/device_bench_sample.sh [OUT_DIR]
# Writes OUT_DIR/bench_sample_2b.jsonl and prints the table; record the numbers
# in docs/performance.md.
set -euo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"
args=(--model 2b --batch 64 --prompt_len 128 --new_tokens 128 --dtype bfloat16
      --param_dtype bfloat16 --repeats 3)
python tools/bench_sample.py "${args[@]}" --json | tee "$out/bench_sample_2b.jsonl"
python tools/bench_sample.py "${args[@]}" --no_hf
