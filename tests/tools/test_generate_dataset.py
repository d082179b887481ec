"""tools/generate_dataset.py end to end on a tiny random-init model directory."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig(vocab_size=2048, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=16, mlp_dim=64, sliding_window_size=4)
ARGS = ["--num_prompts", "4", "--generations_per_prompt", "2", "--prompt_length", "8",
        "--max_new_tokens", "6", "--batch_size", "4", "--split", "validation"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("model")
  params = jax.jit(Transformer(CFG).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  params_checkpoint.save(str(directory), nn.unbox(params["params"]), CFG)
  return str(directory)


def run_tool(*args):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate_dataset.py"),
                         *args], env=env, capture_output=True, text=True, timeout=300)


def read(data_dir, name):
  from posttrain_jax.data import generated
  return generated.read_generated_dataset(data_dir=data_dir, name=name)


@pytest.fixture(scope="module")
def first_run(model_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out"))
  proc = run_tool("--checkpoint", model_dir, "--output_dir", out, "--name", "teacher",
                  "--with_text", *ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc


def test_writes_g_samples_of_p_prompts(first_run):
  out, proc = first_run
  from posttrain_jax.data.prompts import load_prompts
  prompts = load_prompts(task_name="pydoc_prompts", split="validation", prompt_length=8,
                         num_prompts=4)
  rows = read(out, "teacher")
  assert len(rows) == 8
  assert [(int(r["prompt_index"]), int(r["sample_index"])) for r in rows] == [
      (i, j) for i in range(4) for j in range(2)]
  for r in rows:
    assert r["prompt"].tolist() == prompts[r["prompt_index"]]
    response = r["response"].tolist()
    assert 1 <= len(response) <= 6
    assert 1 not in response[:-1]  # nothing after EOS
    assert isinstance(r["response_text"], bytes)
  assert "prompts 4/4" in proc.stdout and "tokens/s" in proc.stdout
  assert "@teacher_data/generated_task()" in proc.stdout
  assert f'generated_task.data_dir = "{out}"' in proc.stdout
  # samples of one prompt differ (temperature 1 on a random model)
  assert any(rows[2 * i]["response"].tolist() != rows[2 * i + 1]["response"].tolist()
             for i in range(4))


def test_same_seed_same_dataset(first_run, model_dir, tmp_path):
  out, _ = first_run
  proc = run_tool("--checkpoint", model_dir, "--output_dir", str(tmp_path), "--name",
                  "teacher", *ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again, first = read(str(tmp_path), "teacher"), read(out, "teacher")
  assert [r["response"].tolist() for r in again] == [r["response"].tolist() for r in first]


def test_errors_are_one_line(first_run, model_dir, tmp_path):
  out, _ = first_run
  cases = [
      (["--checkpoint", str(tmp_path / "nope"), "--output_dir", str(tmp_path), "--name", "x",
        *ARGS], "nope"),
      (["--checkpoint", model_dir, "--output_dir", str(tmp_path), "--name", "x", *ARGS,
        "--num_prompts", "0"], "--num_prompts must be >= 1"),
      (["--checkpoint", model_dir, "--output_dir", str(tmp_path), "--name", "x", *ARGS,
        "--generations_per_prompt", "0"], "--generations_per_prompt must be >= 1"),
      (["--checkpoint", model_dir, "--output_dir", out, "--name", "teacher", *ARGS],
       "already exists"),
  ]
  for args, message in cases:
    proc = run_tool(*args)
    assert proc.returncode == 2, (args, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_overwrite_replaces(first_run, model_dir):
  out, _ = first_run
  before = read(out, "teacher")
  proc = run_tool("--checkpoint", model_dir, "--output_dir", out, "--name", "teacher",
                  "--overwrite", "--seed", "1", *ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  after = read(out, "teacher")
  assert len(after) == 8 and "response_text" not in after[0]
  assert [r["response"].tolist() for r in after] != [r["response"].tolist() for r in before]
