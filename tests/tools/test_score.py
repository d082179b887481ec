"""tools/score.py: pairwise accuracy, margins and gold reward from a reward model dir."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.data.preferences import pairs_to_batch, write_preferences
from posttrain_jax.models import ModelConfig
from posttrain_jax.rl.gold_reward import gold_reward
from posttrain_jax.rl.reward_model import RewardModel, save_reward_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig(vocab_size=2048, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)


def run_tool(*args):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "score.py"), *args],
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("rm")
  p = nn.unbox(RewardModel(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  p = dict(p, head={"kernel": jax.random.normal(jax.random.key(1), (16, 1))})
  save_reward_model(str(d / "rm"), p, CFG)
  return str(d / "rm"), p


def pairs(n=12):
  rng = np.random.default_rng(0)
  return [{"prompt": rng.integers(3, 2048, size=3).tolist(),
           "chosen": rng.integers(3, 2048, size=rng.integers(2, 7)).tolist(),
           "rejected": rng.integers(3, 2048, size=rng.integers(2, 7)).tolist(),
           "flipped": i % 4 == 0} for i in range(n)]


def test_pairs_accuracy_margin_and_gold(reward_dir, tmp_path):
  directory, params = reward_dir
  records = pairs()
  write_preferences(str(tmp_path / "pairs.jsonl"), records)
  out = tmp_path / "scores.jsonl"
  proc = run_tool("--reward_model", directory, "--input", str(tmp_path / "pairs.jsonl"),
                  "--gold", "--output", str(out), "--batch_size", "5")
  assert proc.returncode == 0, proc.stderr
  assert "tensorflow" not in proc.stderr.lower()
  length = max(len(r["prompt"]) + len(r[s]) for r in records for s in ("chosen", "rejected"))
  b = pairs_to_batch(records, length)
  score = lambda s: np.asarray(RewardModel(CFG).apply(
      {"params": params}, b[f"{s}_tokens"], b[f"{s}_positions"], b[f"{s}_segment_ids"]))
  gold = lambda s: np.asarray(gold_reward(jnp.asarray(b[f"{s}_tokens"]),
                                          jnp.asarray(b[f"{s}_response_mask"])))
  margin = score("chosen") - score("rejected")
  assert f"12 pairs | pairwise accuracy {np.mean(margin > 0):.4f}" in proc.stdout
  assert f"mean margin {np.mean(margin):.4f}" in proc.stdout
  assert "clean labels: 9 pairs" in proc.stdout and "flipped labels: 3 pairs" in proc.stdout
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  np.testing.assert_allclose([r["score_chosen"] for r in rows], score("chosen"), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose([r["gold_rejected"] for r in rows], gold("rejected"), rtol=1e-5)


def test_samples_and_bad_input(reward_dir, tmp_path):
  directory, _ = reward_dir
  path = tmp_path / "samples.jsonl"
  path.write_text("".join(json.dumps({"prompt_tokens": [5, 6], "tokens": [7, 8, 9, 1]}) + "\n"
                          for _ in range(3)))
  proc = run_tool("--reward_model", directory, "--input", str(path), "--gold")
  assert proc.returncode == 0, proc.stderr
  assert "3 samples | mean score" in proc.stdout and "mean gold reward" in proc.stdout
  path.write_text(json.dumps({"prompt": [5]}) + "\n")
  proc = run_tool("--reward_model", directory, "--input", str(path))
  assert proc.returncode == 2 and "expected a pair" in proc.stderr
  proc = run_tool("--reward_model", str(tmp_path), "--input", str(path))
  assert proc.returncode == 2 and "not a reward model directory" in proc.stderr


def test_a_reward_model_run_directory_points_to_its_export(reward_dir, tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from posttrain_jax import cli  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"  # as train_reward_model writes it: RUN/reward_model
  run.mkdir()
  os.symlink(reward_dir[0], run / "reward_model")
  spec = importlib.util.spec_from_file_location("score_tool", os.path.join(REPO, "tools",
                                                                           "score.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  with pytest.raises(cli.ConfigError, match=(
      rf"is not a reward model directory \(no reward_model.json\)\. It is a reward-model "
      rf"training run: pass --reward_model {run}/reward_model$")):
    tool.main(["--reward_model", str(run), "--input", str(tmp_path / "x.jsonl")])
