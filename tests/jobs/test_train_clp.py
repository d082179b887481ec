"""The train_clp job: a short prompt-conditioned attn-CLP run, its eval, clp.json, resume,
and tools/sample.py --weights on the run directory."""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax import cli
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.jobs.train_clp import train_clp
from posttrain_jax.models import ModelConfig, Transformer, params_checkpoint
from posttrain_jax.rl import clp, clp_training

from policy_runs import FixedPrompts  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the shipped 2k vocabulary serialises w, so the model needs its vocab_size
CFG = ModelConfig(vocab_size=2048, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=8)
CLP = clp.CLPConfig(mixing="attn", prompt_conditioning=True)


@pytest.fixture(scope="module")
def clp_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("clp")
  params = Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params_checkpoint.save(str(root / "sft"), nn.unbox(params), CFG)

  def run(steps, name="run"):
    return train_clp(model_config=CFG, run_dir=str(root / name),
                     initial_checkpoint=str(root / "sft"), rewards=["gold", "brevity"],
                     num_steps=steps, clp=CLP, prompt_source=FixedPrompts(), max_new_tokens=6,
                     optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=3),
                     eval_prompt_list=[[3 + i, 4] for i in range(8)], eval_weights=[(1.0, 0.0), (0.3, 0.7)],
                     log_every=1, checkpoint_every=2, async_checkpointing=False)
  return root, run(2), run


def test_run_logs_per_reward_metrics_and_evals_every_weighting(clp_run):
  root, result, _ = clp_run
  assert result.final_step == 2 and sorted(result.metrics) == [1, 2]
  for m in result.metrics.values():
    for key in ("reward", "reward_0", "reward_1", "kl_sft", "loss", "grad_norm"):
      assert np.isfinite(m[key]), key
  evals = result.eval_metrics[2]
  assert {k.split("/")[0] for k in evals} == {"w=1,0", "w=0.3,0.7"}
  assert 0.0 < evals["w=0.3,0.7/reward_1"] <= 1.0 and evals["w=1,0/kl_sft_token_sum"] >= 0.0
  rewards, cfg, _ = clp_training.read_clp_json(str(root / "run"))
  assert rewards == ["gold", "brevity"] and cfg == CLP
  q = jax.device_get(result.state.params)["layer_0"]["attn"]["q"]
  assert q.shape[0] == 2 and not np.allclose(q[0], q[1])  # the copies were moved apart


def test_resume_and_bad_input(clp_run):
  root, _, run = clp_run
  again = run(3)
  assert again.resumed_from == 2 and again.final_step == 3
  # the same 3 steps without the interruption (decay_steps fixed: the schedule
  # does not depend on num_steps)
  straight = run(3, "straight")
  for key, value in straight.metrics[3].items():  # same w draws, prompts, samples
    np.testing.assert_allclose(again.metrics[3][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  with pytest.raises(ValueError, match="num_rewards"):
    train_clp(model_config=CFG, run_dir=str(root / "bad"), initial_checkpoint=str(root / "sft"),
              rewards=["gold"], num_steps=1, clp=CLP, prompt_source=FixedPrompts())
  with pytest.raises(ValueError, match="simplex"):
    train_clp(model_config=CFG, run_dir=str(root / "bad"), initial_checkpoint=str(root / "sft"),
              rewards=["gold", "brevity"], num_steps=1, clp=CLP, prompt_source=FixedPrompts(),
              eval_weights=[(0.5, 0.4)])


def test_sample_tool_steers_the_run_with_weights(clp_run, tmp_path):
  root, _, _ = clp_run
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"tokens": [3, 4, 5]}\n{"text": "The list"}\n')
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  tool = [sys.executable, os.path.join(REPO, "tools", "sample.py"), "--checkpoint_dir",
          str(root / "run"), "--prompts_file", str(prompts), "--max_new_tokens", "4",
          "--batch_size", "2", "--model_gin", str(root / "sft" / "model.gin")]
  out = tmp_path / "out.jsonl"
  done = subprocess.run(tool + ["--out", str(out), "--weights", "0.24,0.76"], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  prefix = clp_training.sentencepiece_encoder()("weights 0.2 0.8: ")  # rounded to 0.1
  assert rows[0]["weights"] == pytest.approx([0.2, 0.8])
  assert rows[0]["prompt_tokens"] == prefix + [3, 4, 5]
  bad = subprocess.run(tool + ["--out", str(out), "--weights", "0.5,0.6"], env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "simplex" in bad.stderr
  # Without --weights: one line saying what to pass (was a 46-line shape mismatch).
  spec = importlib.util.spec_from_file_location("sample_tool",
                                                os.path.join(REPO, "tools", "sample.py"))
  sample_tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sample_tool)
  with pytest.raises(cli.ConfigError) as e:
    sample_tool.main(tool[2:] + ["--out", str(out)])
  assert str(e.value) == (f"{root / 'run'} is a CLP run (train_clp; rewards gold, brevity): "
                          "pass --weights with one weight per reward, summing to 1, e.g. "
                          "--weights 0.5,0.5.")


def test_eval_front_clp_mode_reports_every_reward(clp_run, tmp_path):
  root, _, _ = clp_run
  out = tmp_path / "front.json"
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "eval_front.py"), "--sft", str(root / "sft"),
       "--reward", "gold", "--rewards", "gold,brevity", "--num_prompts", "2",
       "--samples_per_prompt", "2", "--max_new_tokens", "4", "--out", str(out), "clp",
       str(root / "run"), "--grid", "0,1"], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  points = json.loads(out.read_text())["points"]
  assert [p["label"] for p in points] == ["clp w=1,0", "clp w=0,1"]
  for p in points:
    assert p["reward_0"] == pytest.approx(p["gold_reward"])
    assert 0.0 < p["reward_1"] <= 1.0 and p["kl_sft_token_sum"] >= 0.0
