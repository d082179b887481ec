#!/usr/bin/env bash
# Train-step benchmark on a lent GPU, one call: ours vs transformers (eager and
# torch.compile) for the Gemma-2-2B train step at 4 x 2048 (bf16 compute, fp32
# master weights as in gin/models/gemma2_2b.gin), ours at larger batches, and
# the attention_impl variants. Usage (from the repo root):
#
#   bash tools/device_bench.sh OUT_DIR
#
# Writes OUT_DIR/device_bench.md (the markdown tables, with the commands) and
# OUT_DIR/device_bench.jsonl (every row), and prints the tables; record them in
# docs/performance.md. A failing section (e.g. out of memory) is noted and the
# script goes on. Environment (defaults in brackets; tests use a tiny shape):
#   BENCH_MODEL [2b]  BENCH_BATCH [4]  BENCH_SEQ [2048]  BENCH_STEPS [5]
#   BENCH_WARMUP [2]  BENCH_BIG_BATCHES ["8 16"]  BENCH_LOSS_CHUNK [512]
#   BENCH_PEER_COMPILE [1]  BENCH_DPA_IMPLS [xla cudnn on a GPU, else xla]
#   BENCH_SECTIONS ["peer batch attn tests"]  BENCH_TIMEOUT [480 s per command; 0: none]
#   BENCH_PEER_THREADS [torch's default]
set -uo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU
model="${BENCH_MODEL:-2b}"
batch="${BENCH_BATCH:-4}"
seq="${BENCH_SEQ:-2048}"
steps="${BENCH_STEPS:-5}"
warmup="${BENCH_WARMUP:-2}"
big_batches="${BENCH_BIG_BATCHES:-8 16}"
chunk="${BENCH_LOSS_CHUNK:-512}"
sections="${BENCH_SECTIONS:-peer batch attn tests}"
limit="${BENCH_TIMEOUT:-480}"
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then gpu=1; fi
dpa_impls="${BENCH_DPA_IMPLS:-$([ "$gpu" = 1 ] && echo "xla cudnn" || echo "xla")}"
md="$out/device_bench.md"
jsonl="$out/device_bench.jsonl"
: > "$md"; : > "$jsonl"

{
  echo "# Train-step benchmark ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  [ "$gpu" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python - <<'PY'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
  try:
    print(f"- {name} {importlib.import_module(name).__version__}")
  except Exception as e:  # pylint: disable=broad-except
    print(f"- {name}: not available ({type(e).__name__})")
import jax
print(f"- devices: {jax.devices()}")
PY
  echo
} | tee -a "$md"

failures=0
bench() {  # bench TITLE ARGS...: one bench_train.py run, its table appended to $md
  local title="$1"; shift
  local cmd=(python tools/bench_train.py --model="$model" --steps="$steps" --warmup="$warmup"
             --jsonl="$jsonl" "$@")
  { echo "## $title"; echo; echo "\`${cmd[*]}\`"; echo; } | tee -a "$md"
  timeout "$limit" "${cmd[@]}" > "$out/last_table.md" 2> "$out/last_stderr.txt"
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    failures=$((failures + 1))
    { echo "FAILED (exit $rc):"; echo '```';
      grep -v "^W0\|UserWarning\|warnings.warn" "$out/last_stderr.txt" | tail -5; echo '```'; } | tee -a "$md"
  fi
  grep -i "failed" "$out/last_stderr.txt" | grep "bench_train.py" | tee -a "$md"
  cat "$out/last_table.md" | tee -a "$md"
  echo | tee -a "$md"
}

peer_flags=(--peer=hf)
[ "${BENCH_PEER_COMPILE:-1}" = 1 ] && peer_flags+=(--peer_compile)
[ -n "${BENCH_PEER_THREADS:-}" ] && peer_flags+=(--peer_threads="$BENCH_PEER_THREADS")

for section in $sections; do
  case "$section" in
    peer)
      bench "Train step, ours vs transformers, $batch x $seq" \
        --batch_size="$batch" --seq_len="$seq" "${peer_flags[@]}"
      ;;
    batch)
      bench "Train step, ours, chunked loss ($chunk), $batch x $seq" \
        --batch_size="$batch" --seq_len="$seq" --loss_chunk_size="$chunk"
      for b in $big_batches; do
        bench "Train step, ours, chunked loss ($chunk), $b x $seq" \
          --batch_size="$b" --seq_len="$seq" --loss_chunk_size="$chunk"
      done
      ;;
    attn)
      # dot_product_attention has no logit soft-cap: compare against the
      # reference path on the same (soft-cap-free) model.
      bench "Train step, attention xla (reference), no attn soft-cap, $batch x $seq" \
        --batch_size="$batch" --seq_len="$seq" --loss_chunk_size="$chunk" --no_attn_soft_cap
      for impl in $dpa_impls; do
        bench "Train step, attention dot_product_attention/$impl, no attn soft-cap, $batch x $seq" \
          --batch_size="$batch" --seq_len="$seq" --loss_chunk_size="$chunk" --no_attn_soft_cap \
          --attention_impl=dot_product_attention --dpa_implementation="$impl"
      done
      ;;
    tests)
      if [ "$gpu" = 1 ]; then
        { echo "## cuDNN attention vs the reference path (GPU test)"; echo; } | tee -a "$md"
        timeout "$limit" python -m pytest -q tests/models/test_attention.py -k cudnn 2>&1 \
          | tail -3 | tee -a "$md"
      fi
      ;;
    *) echo "unknown section $section (expected peer, batch, attn, tests)" >&2; exit 2 ;;
  esac
done
rm -f "$out/last_table.md" "$out/last_stderr.txt"
echo "rows: $(wc -l < "$jsonl"); failed runs: $failures" | tee -a "$md"
