"""tools/label_preferences.py: sampled pairs labelled by the gold reward, exact label noise."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.data.preferences import read_preferences
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl.gold_reward import gold_reward

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig(vocab_size=2048, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)


def run_tool(*args):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "label_preferences.py"),
                         *args], env=env, capture_output=True, text=True, timeout=600)


def score(tokens):
  return float(gold_reward(jnp.asarray([tokens]), jnp.ones((1, len(tokens)), jnp.int32))[0])


def test_pairs_are_labelled_by_gold_with_exact_noise(tmp_path):
  params = nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
      "params"])
  params_checkpoint.save(str(tmp_path / "policy"), params, CFG)
  args = ["--checkpoint", str(tmp_path / "policy"), "--num_prompts", "12",
          "--label_noise", "0.25", "--prompt_length", "6", "--max_new_tokens", "8",
          "--batch_size", "8", "--seed", "1"]
  proc = run_tool(*args, "--output", str(tmp_path / "a.jsonl"))
  assert proc.returncode == 0, proc.stderr
  records = read_preferences(str(tmp_path / "a.jsonl"))
  assert 8 <= len(records) <= 12 and all(len(r["prompt"]) == 6 for r in records)
  flipped = [r for r in records if r["flipped"]]
  assert len(flipped) == round(0.25 * len(records))
  assert f"{len(flipped)} labels flipped" in proc.stdout
  for r in records:
    np.testing.assert_allclose(r["gold_chosen"], score(r["chosen"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r["gold_rejected"], score(r["rejected"]), rtol=1e-5, atol=1e-7)
    assert (r["gold_chosen"] < r["gold_rejected"]) == r["flipped"]
    assert 1 <= len(r["chosen"]) <= 8
  # the same seed gives the same file
  proc = run_tool(*args, "--output", str(tmp_path / "b.jsonl"))
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
  proc = run_tool(*args[:-2], "--seed", "1", "--label_noise", "2", "--output",
                  str(tmp_path / "c.jsonl"))
  assert proc.returncode == 2 and "label_noise must be in [0, 1]" in proc.stderr
