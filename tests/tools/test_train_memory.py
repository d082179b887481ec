"""tools/train_memory.py: exact state bytes and XLA's buffer assignment of the
train step, without allocating it."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "train_memory.py")
PARAMS_9B = 8_324_201_984 + 917_962_752


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_9b_state_bytes_are_exact_and_bf16_moments_halve_mu():
  # Compiling the 9B step allocates nothing; the state sizes follow from the
  # exact parameter count (model_info's numbers).
  rows = []
  for extra in ([], ["--mu_dtype", "bfloat16"], ["--param_dtype", "bfloat16", "--mu_dtype", "bfloat16"]):
    out = _run("--model", "9b", "--batch_size", "1", "--seq_len", "256", "--remat", "full",
               "--loss_chunk_size", "128", "--json", *extra)
    assert out.returncode == 0, out.stderr
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  fp32, mu16, bf16 = rows
  assert fp32["params_bytes"] == 4 * PARAMS_9B
  assert fp32["optimizer_bytes"] >= 8 * PARAMS_9B  # mu and nu (+ scalar counts)
  assert fp32["optimizer_bytes"] - mu16["optimizer_bytes"] == 2 * PARAMS_9B
  assert bf16["params_bytes"] == 2 * PARAMS_9B
  for row in rows:
    assert row["peak_bytes"] >= row["argument_bytes"] >= row["params_bytes"]
    assert row["alias_bytes"] > 0  # the state is donated
  assert bf16["peak_bytes"] < fp32["peak_bytes"]
  assert not fp32["fits"] and fp32["device_gib"] == 141.0


def test_table_and_bad_input():
  out = _run("--model", "tiny", "--batch_size", "2", "--seq_len", "64")
  assert out.returncode == 0, out.stderr
  assert "| **peak per device** |" in out.stdout and "fits on a 141 GiB card" in out.stdout
  out = _run("--model", "tiny", "--ici", "fsdp")
  assert out.returncode == 2 and "expected NAME=INT pairs" in out.stderr
  out = _run("--model", "10b")
  assert out.returncode == 2 and "Unknown model preset" in out.stderr
