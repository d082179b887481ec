"""tools/sample.py: JSONL prompts in, JSONL samples out, one-line errors."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig(vocab_size=2048, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=16, mlp_dim=64, sliding_window_size=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("model")
  params = jax.jit(Transformer(CFG).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p, nn.unbox(params["params"]))
  params_checkpoint.save(str(directory), params, CFG)
  return directory, params


def run_tool(*args):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "sample.py"), *args],
                        env=env, capture_output=True, text=True, timeout=300)


def write_prompts(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def test_greedy_samples_match_the_library(model_dir, tmp_path):
  directory, params = model_dir
  prompts = write_prompts(tmp_path / "p.jsonl", [{"text": "The list type"},
                                                 {"tokens": [5, 6, 7, 8]}])
  out = tmp_path / "out.jsonl"
  proc = run_tool("--checkpoint_dir", str(directory), "--prompts_file", prompts,
                  "--out", str(out), "--greedy", "--max_new_tokens", "6",
                  "--batch_size", "4", "--eos_id", "-1")
  assert proc.returncode == 0, proc.stderr
  assert "tensorflow" not in proc.stderr.lower()
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  # The samples are shown, not only counted.
  assert proc.stdout.splitlines() == [f"[0] {rows[0]['text']!r}", f"[1] {rows[1]['text']!r}",
                                      f"wrote 2 samples to {out}"]
  assert [r["index"] for r in rows] == [0, 1]
  assert rows[1]["prompt_tokens"] == [5, 6, 7, 8]
  assert all(len(r["tokens"]) == 6 and isinstance(r["text"], str) for r in rows)
  mesh = partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1])
  sampler = Sampler(CFG, SamplingConfig(max_new_tokens=6, greedy=True, eos_id=None), mesh)
  ref = sampler(params, [r["prompt_tokens"] for r in rows], jax.random.key(0))
  for i, r in enumerate(rows):
    assert r["tokens"] == np.asarray(ref.tokens[i, -6:]).tolist()
    np.testing.assert_allclose(r["model_logprobs"], ref.model_logprobs[i, -6:], atol=1e-5)


@pytest.mark.parametrize("record,message", [
    ({"tokens": []}, "Prompt 0 is empty"),
    ({"tokens": [1, 4096]}, "token id 4096, outside [0, vocab_size=2048)"),
    ({"prompt": "x"}, 'expected a "tokens" or "text" field'),
])
def test_bad_prompts_give_one_line(model_dir, tmp_path, record, message):
  prompts = write_prompts(tmp_path / "p.jsonl", [record])
  proc = run_tool("--checkpoint_dir", str(model_dir[0]), "--prompts_file", prompts,
                  "--out", str(tmp_path / "o.jsonl"), "--greedy", "--max_new_tokens", "2")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert message in proc.stderr.strip().splitlines()[-1]


def test_prompt_longer_than_the_cache_is_rejected(model_dir, tmp_path):
  prompts = write_prompts(tmp_path / "p.jsonl", [{"tokens": list(range(3, 40))}])
  proc = run_tool("--checkpoint_dir", str(model_dir[0]), "--prompts_file", prompts,
                  "--out", str(tmp_path / "o.jsonl"), "--greedy", "--max_new_tokens", "8",
                  "--max_cache_length", "32")
  assert proc.returncode == 2
  assert "exceeds the cache length 32" in proc.stderr.strip().splitlines()[-1]
