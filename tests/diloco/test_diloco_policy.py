"""RLHF policy gradient under Streaming DiLoCo (train_policy(diloco=...)): M = 1
reduces to the plain run; with M = 2 on the replica axis each replica samples
its row block from its own params, eval/* uses θ̃ and a resume with an
exchange in flight is exact; the gin file configures."""

import os

import gin
import jax
import numpy as np
import pytest

from posttrain_jax import cli, main
from posttrain_jax.core import partitioning
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl import rewards
from policy_runs import (CFG, FixedPrompts, leaves, low_ids_reward, run,  # pylint: disable=g-bad-import-order
                         save_random_model)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIN = f"{REPO}/gin/experiments/streaming_diloco/rl_streaming_fp4.gin"
EXACT = dict(outer_lr=1.0, outer_momentum=0.0, alpha=0.0, overlap=0, quantization="none")
SAMPLED = []  # the token batches the "test_recorded" reward scored, in order


def recorded_reward(tokens, mask):
  SAMPLED.append(np.asarray(tokens))
  return low_ids_reward(tokens, mask)


rewards.register("test_recorded", recorded_reward)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  return save_random_model(str(tmp_path_factory.mktemp("sft") / "model"), CFG)


def test_one_replica_h1_equals_the_plain_run(tmp_path, sft_dir):
  """M = 1, H = 1, outer SGD lr 1 without momentum, α = 0, τ = 0: θ̃ copies the
  replica after every step, so metrics and params equal the plain run's (EMA
  anchor included)."""
  plain = run(tmp_path / "plain", sft_dir, 3)
  config = sd.DiLoCoConfig(num_replicas=1, sync_every=1, num_fragments=2, **EXACT)
  dil = run(tmp_path / "diloco", sft_dir, 3, diloco=config)
  assert sorted(dil.metrics) == sorted(plain.metrics) == [1, 2, 3]
  for step in (1, 2, 3):
    for k, v in plain.metrics[step].items():
      # atol: the surrogate loss sums +-A log pi terms that nearly cancel
      np.testing.assert_allclose(dil.metrics[step][k], v, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{k} at step {step}")
  for a, b in zip(leaves(sd.outer_params(dil.state)), leaves(plain.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(leaves(dil.state.replicas.opt_state.anchor),
                  leaves(plain.state.anchor_params)):
    np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)
  # one replica: the all-gather of codes and data-parallel's all-reduce move nothing
  assert dil.traffic["replica_bytes"] == dil.traffic["dp_replica_bytes"] == 0


STREAMING = sd.DiLoCoConfig(num_replicas=2, sync_every=2, num_fragments=2, overlap=1,
                            alpha=0.5, quantization="fp4_e3m0")
EVAL_PROMPTS = [[3 + i, 9 + i, 20 + i] for i in range(8)]


def streaming_run(run_dir, sft_dir, num_steps, **kw):
  return run(run_dir, sft_dir, num_steps, diloco=STREAMING, prompt_source=FixedPrompts(8),
             ici_parallelism={"replica": 2, "data": -1}, eval_prompt_list=EVAL_PROMPTS,
             eval_every=2, **kw)


def block_prompts(step, m):
  """Row block m (of 2) of step `step`'s prompts, as the loop builds them."""
  data = FixedPrompts(8)
  data.set_state({"position": step - 1})
  batch = next(data)
  rows = np.repeat(batch["prompts"], 2, axis=0)
  lengths = np.repeat(batch["prompt_lengths"], 2)
  prompts = [r[len(r) - n:] for r, n in zip(rows.tolist(), lengths.tolist())]
  return prompts[8 * m:8 * (m + 1)]


def test_two_replicas_sample_their_own_params_eval_outer_and_resume(tmp_path, sft_dir):
  one = streaming_run(tmp_path / "one", sft_dir, 1)
  SAMPLED.clear()
  full = streaming_run(tmp_path / "full", sft_dir, 4, reward="test_recorded")
  train_rows = [s for s in SAMPLED if len(s) == 16]  # eval batches have 8 rows
  assert len(train_rows) == 4
  # after step 1 the replicas differ (each trained on its own rows, no merge yet)
  r0, r1 = (leaves(sd.replica_params(one.state, m)) for m in (0, 1))
  assert any(not np.allclose(a, b) for a, b in zip(r0, r1))
  # step 2's rows: block m sampled from replica m's params after step 1, key
  # fold_in(fold_in(seed, 2), m); not what the other replica's params give
  mesh = partitioning.create_mesh({"replica": 2, "data": -1})
  sampler = Sampler(CFG, SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=1), mesh)
  _, shardings = partitioning.params_and_shardings(
      lambda: jax.tree.map(lambda x: x[0], one.state.replicas.params), mesh)
  key = jax.random.fold_in(jax.random.key(0), 2)
  for m in range(2):
    prompts = block_prompts(2, m)
    own = sampler(jax.device_put(sd.replica_params(one.state, m), shardings), prompts,
                  jax.random.fold_in(key, m), prompt_length=5)
    np.testing.assert_array_equal(train_rows[1][8 * m:8 * (m + 1)], np.asarray(own.tokens))
    other = sampler(jax.device_put(sd.replica_params(one.state, 1 - m), shardings),
                    prompts, jax.random.fold_in(key, m), prompt_length=5)
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(own.tokens))

  # eval of θ̃ (the exported subtree), finite; traffic scalars
  assert sorted(full.eval_metrics) == [2, 4]
  for k in ("reward", "kl_sft", "kl_sft_token_sum", "entropy"):
    assert np.isfinite(full.eval_metrics[4][k]), k
  eval_key = jax.random.fold_in(jax.random.key(0), 0)
  def eval_reward(params):
    sample = sampler(jax.device_put(params, shardings), EVAL_PROMPTS, eval_key)
    return float(np.mean(low_ids_reward(sample.tokens, sample.generated_mask)))
  outer = eval_reward(sd.outer_params(full.state))
  np.testing.assert_allclose(full.eval_metrics[4]["reward"], outer, rtol=1e-6)
  assert outer != eval_reward(sd.replica_params(full.state, 0))
  location = params_checkpoint.locate(str(tmp_path / "full"))
  assert location.subtree == "outer_params" and location.step == 4
  assert full.traffic["replica_bytes"] > 0
  assert full.traffic["sent_bytes"] == 2 * full.traffic["replica_bytes"]
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(tmp_path / "full"))
  acc.Reload()
  assert {"traffic/sent_bytes", "traffic/dp_ratio", "eval/reward",
          "loss"} <= set(acc.Tags()["tensors"])

  # stopped after step 3 (its exchange in flight until step 4), resumed to 4
  first = streaming_run(tmp_path / "split", sft_dir, 3)
  second = streaming_run(tmp_path / "split", sft_dir, 4)
  assert second.resumed_from == 3 and sorted(second.metrics) == [4]
  metrics = {**first.metrics, **second.metrics}
  for step in range(1, 5):
    for k in ("loss", "reward", "kl_sft", "grad_norm"):
      np.testing.assert_allclose(metrics[step][k], full.metrics[step][k], rtol=1e-5,
                                 atol=1e-7, err_msg=f"{k} at step {step}")
  for k in ("reward", "kl_sft"):
    np.testing.assert_allclose(second.eval_metrics[4][k], full.eval_metrics[4][k],
                               rtol=1e-5, atol=1e-7, err_msg=k)
  assert second.traffic == full.traffic


def test_gin_file_configures_streaming_fp4_rl():
  main.register_configurables()
  gin.clear_config()
  cli.configure(cli.parse_flags([f"--gin_file={GIN}"]))
  try:
    assert gin.query_parameter("job.name") == "train_policy"
    config = gin.get_configurable(sd.DiLoCoConfig)()
    assert (config.num_replicas, config.num_fragments, config.pattern, config.overlap,
            config.alpha, config.quantization) == (2, 2, "strided", 1, 0.5, "fp4_e3m0")
    assert gin.query_parameter("%REWARD") == "gold"
    assert gin.query_parameter("train_policy.anchor") == "ema"
    sequences = gin.query_parameter("%PROMPTS_PER_STEP") * gin.query_parameter(
        "%SAMPLES_PER_PROMPT")
    assert sequences % config.num_replicas == 0
  finally:
    gin.clear_config()
