"""RL loop: steps on 8 CPU devices (data / fsdp), EMA limits, exact resume, bad input."""

import os
import signal

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax import cli, main
from posttrain_jax.models import ModelConfig
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl import nonfinite_rewards, reward_model, rewards

from policy_runs import (CFG, FixedPrompts, leaves, low_ids_reward, run,  # pylint: disable=g-bad-import-order
                         save_random_model, sft_dir, sft_leaves)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("ici,ema_rate", [({"data": -1}, 0.0), ({"data": 2, "fsdp": 4}, 1.0)])
def test_rl_steps_on_8_devices(tmp_path, sft_dir, ici, ema_rate):
  evals = [[3 + i, 10 + i] for i in range(8)]
  result = run(tmp_path / "run", sft_dir, 3, ici_parallelism=ici, ema_rate=ema_rate,
               gold_reward=True, eval_prompt_list=evals, eval_every=2)
  assert result.final_step == 3 and sorted(result.metrics) == [1, 2, 3]
  assert sorted(result.eval_metrics) == [2, 3]
  for m in result.eval_metrics.values():
    assert set(m) == {"reward", "gold_reward", "kl_sft", "kl_sft_token_sum", "entropy",
                      "response_length"}
    assert all(np.isfinite(v) for v in m.values())
    assert 0.0 <= m["gold_reward"] < 1.0 and m["kl_sft_token_sum"] >= 0.0
  for m in result.metrics.values():
    for key in ("reward", "kl_sft", "kl_anchor", "entropy", "response_length", "loss",
                "grad_norm", "learning_rate", "shaped_reward", "gold_reward"):
      assert np.isfinite(m[key]), key
    assert m["nonfinite"] == 0.0 and 1.0 <= m["response_length"] <= 6.0
  first = result.metrics[1]
  # policy == SFT == anchor: zero up to float32 rounding (the policy's
  # log-probs and the reference's come from different compiled programs)
  assert abs(first["kl_sft"]) < 1e-5 and abs(first["kl_anchor"]) < 1e-5
  assert first["grad_norm"] > 0.0
  state = result.state
  params, anchor, sft = leaves(state.params), leaves(state.anchor_params), sft_leaves(sft_dir)
  assert any(not np.array_equal(p, s) for p, s in zip(params, sft))  # the policy moved
  want = sft if ema_rate == 0.0 else params  # mu = 0 freezes, mu = 1 copies
  for a, w in zip(anchor, want):
    np.testing.assert_array_equal(a, w)
  for m in result.metrics.values():  # mu = 0: anchor is the SFT; mu = 1: the sampling policy
    assert m["kl_anchor"] == pytest.approx(m["kl_sft"] if ema_rate == 0.0 else 0.0, abs=1e-5)
  assert result.metrics[3]["kl_sft"] != 0.0


def test_sft_anchor_stores_no_copy(tmp_path, sft_dir, capfd):
  result = run(tmp_path / "run", sft_dir, 2, anchor="sft", baseline="mean")
  assert result.state.anchor_params is None
  # The start line names no EMA rate for a fixed anchor (mu moves only "ema").
  header = [l for l in capfd.readouterr().out.splitlines() if "initialised from" in l]
  assert len(header) == 1 and "| anchor sft | beta 0.1 |" in header[0], header
  m = result.metrics[2]
  assert m["kl_sft"] == m["kl_anchor"] and np.isfinite(m["loss"])
  # the run directory reads like any run (locate finds the policy's params)
  np.testing.assert_array_equal(
      leaves(params_checkpoint.load_numpy_params(str(tmp_path / "run"), CFG))[0],
      leaves(result.state.params)[0])


def test_resume_after_preemption_continues_identically(tmp_path, sft_dir):
  calls = []

  def sigterm_in_step_2(tokens, mask):  # a preemption notice arrives during step 2
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return low_ids_reward(tokens, mask)
  rewards.register("test_sigterm_in_step_2", sigterm_in_step_2)

  full = run(tmp_path / "full", sft_dir, 4)
  part = run(tmp_path / "part", sft_dir, 4, reward="test_sigterm_in_step_2",
             checkpoint_every=100)
  assert part.preempted and part.final_step == 2 and part.resumed_from is None
  resumed = run(tmp_path / "part", sft_dir, 4)  # fresh prompt source: state restored
  assert resumed.resumed_from == 2 and sorted(resumed.metrics) == [3, 4]
  for step in (3, 4):
    assert resumed.metrics[step] == full.metrics[step]
  for a, b in zip(leaves(resumed.state), leaves(full.state)):
    np.testing.assert_array_equal(a, b)
  # gradient accumulation over 2 microbatches gives the same update
  accumulated = run(tmp_path / "micro", sft_dir, 2, num_microbatches=2)
  assert accumulated.metrics[1]["reward"] == part.metrics[1]["reward"]
  for a, b in zip(leaves(accumulated.state.params), leaves(part.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bad_input(tmp_path, sft_dir):
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    run(tmp_path / "a", sft_dir, 1, samples_per_prompt=1)
  with pytest.raises(ValueError, match="Unknown reward 'nope'"):
    run(tmp_path / "b", sft_dir, 1, reward="nope")
  with pytest.raises(ValueError, match="needs initial_checkpoint"):
    run(tmp_path / "c", None, 1)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run(tmp_path / "d", str(tmp_path / "missing"), 1)
  with pytest.raises(ValueError, match=r"ema_rate \(mu\) must be in \[0, 1\]"):
    run(tmp_path / "h", sft_dir, 1, ema_rate=1.5)
  with pytest.raises(ValueError, match="Unknown anchor"):
    run(tmp_path / "e", sft_dir, 1, anchor="reference")
  with pytest.raises(ValueError, match="not divisible by the mesh's 8 batch shards"):
    run(tmp_path / "f", sft_dir, 1, prompt_source=FixedPrompts(batch_size=3))
  with pytest.raises(ValueError, match="needs prompts"):
    run(tmp_path / "g", sft_dir, 1, prompt_source=None)


def test_reward_model_directory_as_reward(tmp_path, sft_dir):
  params = nn.unbox(reward_model.init_boxed(reward_model.RewardModel(CFG), jax.random.key(1)))
  params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
  rm_dir = str(tmp_path / "rm")
  reward_model.save_reward_model(rm_dir, params, CFG)
  result = run(tmp_path / "run", sft_dir, 1, reward=rm_dir, anchor="sft")
  m = result.metrics[1]
  assert np.isfinite(m["reward"]) and m["reward"] != 0.0 and np.isfinite(m["loss"])
  with pytest.raises(ValueError, match="not a reward model directory"):
    run(tmp_path / "run2", sft_dir, 1, reward=sft_dir)


def nan_row_1(tokens, mask):
  return low_ids_reward(tokens, mask).at[1].set(jnp.nan)


rewards.register("test_nan_row_1", nan_row_1)


def test_a_nan_reward_row_is_left_out_and_named(tmp_path, sft_dir, capsys):
  result = run(tmp_path / "drop", sft_dir, 1, reward="test_nan_row_1")
  m = result.metrics[1]
  assert m["nonfinite_rewards"] == 1.0 and m["nonfinite"] == 0.0 and result.skipped_steps == 0
  assert np.isfinite(m["loss"]) and np.isfinite(m["reward"]) and m["grad_norm"] > 0.0
  assert any(not np.array_equal(p, s) for p, s in zip(leaves(result.state.params),
                                                       sft_leaves(sft_dir)))  # it trained
  assert ("warning: reward 'test_nan_row_1' is non-finite on 1 of 8 rows at step 1 "
          "(rows [1]: nan); those rows are left out") in capsys.readouterr().out
  with pytest.raises(nonfinite_rewards.NonFiniteRewardError,
                     match=r"reward 'test_nan_row_1' is non-finite on 1 of 8 rows at step 1 "
                           r"\(rows \[1\]: nan\); stopping before the update"):
    run(tmp_path / "error", sft_dir, 1, reward="test_nan_row_1", nonfinite_rewards="error")
  skipped = run(tmp_path / "skip", sft_dir, 1, reward="test_nan_row_1",
                nonfinite_rewards="skip_step")
  assert skipped.skipped_steps == 1 and skipped.metrics[1]["nonfinite"] == 1.0
  for p, s in zip(leaves(skipped.state.params), sft_leaves(sft_dir)):
    np.testing.assert_array_equal(p, s)


def test_a_reward_model_that_does_not_fit_the_policy_is_refused(tmp_path, sft_dir):
  """Before any step, in one line: another vocab_size, or another tokenizer."""
  small = ModelConfig(**{**CFG.__dict__, "vocab_size": 32})
  rm_dir = str(tmp_path / "rm32")
  reward_model.save_reward_model(rm_dir, nn.unbox(reward_model.init_boxed(
      reward_model.RewardModel(small), jax.random.key(1))), small)
  with pytest.raises(ValueError) as raised:
    run(tmp_path / "run", sft_dir, 1, reward=rm_dir)
  line = str(raised.value)
  assert "\n" not in line and f"Reward model {rm_dir} has vocab_size 32 but the policy " \
      f"({sft_dir}) has vocab_size 64" in line
  assert not (tmp_path / "run").exists()  # nothing started
  # same vocab_size, but the reward model records another tokenizer than the SFT's
  sft = save_random_model(str(tmp_path / "sft"), CFG)
  os.makedirs(os.path.join(sft, "hf_files"))
  with open(os.path.join(sft, "hf_files", "tokenizer.model"), "wb") as f:
    f.write(b"policy tokenizer")
  rm_dir = str(tmp_path / "rm_other")
  reward_model.save_reward_model(rm_dir, nn.unbox(reward_model.init_boxed(
      reward_model.RewardModel(CFG), jax.random.key(1))), CFG,
      info={"tokenizer": {"path": "/data/other.model", "sha256": "ab" * 32}})
  with pytest.raises(ValueError, match=r"trained with the tokenizer /data/other.model "
                                       r"\(sha256 abababababab\) but the policy"):
    run(tmp_path / "run", sft, 1, reward=rm_dir)
  assert not (tmp_path / "run").exists()


def _configure(flags):
  main.register_configurables()
  gin.clear_config()
  cli.configure(cli.parse_flags(flags))


def test_gin_run_on_the_prompt_task(tmp_path):
  """The documented command's configuration (SFT model.gin + reinforce.gin) runs
  on pydoc_prompts with the gold reward and held-out eval."""
  sft = save_random_model(str(tmp_path / "sft"),
                          ModelConfig(**{**CFG.__dict__, "vocab_size": 2048}))
  _configure([
      f"--gin_file={sft}/model.gin", f"--gin_file={REPO}/gin/experiments/rl/reinforce.gin",
      f"--gin.RUN_DIR='{tmp_path / 'rl'}'", f"--gin.SFT_CHECKPOINT='{sft}'",
      "--gin.REWARD='gold'", "--gin.NUM_STEPS=2", "--gin.PROMPTS_PER_STEP=4",
      "--gin.MAX_NEW_TOKENS=6", "--gin.PROMPT_LENGTH=8",
      "--gin.train_policy.num_eval_prompts=8", "--gin.train_policy.log_every=1"])
  try:
    assert gin.query_parameter("job.name") == "train_policy"
    result = gin.get_configurable("posttrain_jax.train_policy")(
        operative_config=gin.config_str())
  finally:
    gin.clear_config()
  assert sorted(result.metrics) == [1, 2] and sorted(result.eval_metrics) == [2]
  m = result.metrics[2]
  assert m["reward"] == m["gold_reward"] and np.isfinite(m["loss"])
  assert 1.0 <= m["response_length"] <= 6.0
  assert (tmp_path / "rl" / "config.gin").exists()


def test_reinforce_gin_requires_its_macros():
  try:
    with pytest.raises(cli.ConfigError, match="REWARD"):
      _configure([f"--gin_file={REPO}/gin/models/gemma2_tiny.gin",
                  f"--gin_file={REPO}/gin/experiments/rl/reinforce.gin",
                  "--gin.RUN_DIR='/tmp/unused'", "--gin.SFT_CHECKPOINT='/tmp/unused'"])
    _configure([f"--gin_file={REPO}/gin/experiments/rl/reinforce_tiny.gin"])
    assert (gin.query_parameter("train_policy.anchor"), gin.query_parameter(
        "train_policy.ema_rate"), gin.query_parameter("train_policy.beta")) == ("ema", 0.01, 0.1)
    assert gin.query_parameter("%REWARD") == "gold"
  finally:
    gin.clear_config()
