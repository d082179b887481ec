"""The policy-optimization core (rl/policy_optimization.py): several clipped
updates per rollout on strided minibatches against a hand-written loop, the
update-count rules, the sharded step on 8 CPU devices, the job with GRPO/RLOO."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.rl import policy_optimization as po
from posttrain_jax.rl.grpo import GRPO
from posttrain_jax.rl.policy_optimization import PolicyState, policy_step
from posttrain_jax.rl.policy_training import PolicyTrainer
from posttrain_jax.rl.reinforce import Reinforce
from posttrain_jax.rl.rloo import RLOO

from policy_runs import CFG, OPT, leaves, run, sft_dir  # pylint: disable=g-bad-import-order,unused-import
from toy_policy import L, N, T, V, TablePolicy, batch, token_log_pi  # pylint: disable=g-bad-import-order

REWARDS = np.random.default_rng(0).normal(size=N).astype(np.float32)
W_REF = jnp.asarray(np.random.default_rng(1).normal(size=(T, V)), jnp.float32)
RESPONSES = np.asarray(batch(REWARDS)["tokens"])[:, 1:]
G, EPS, BETA, LR, MU = 3, 0.2, 0.2, 3.0, 0.3


def hand_written_updates(num_epochs, num_minibatches):
  """GRPO by hand: advantages and pi_old, pi_ref fixed at the rollout; minibatch
  k = rows k, k + n, ...; SGD; EMA anchor after each step."""
  w = jnp.zeros((T, V))
  anchor = W_REF
  groups = REWARDS.reshape(-1, G).astype(np.float64)
  adv = ((groups - groups.mean(1, keepdims=True))
         / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
  lp_old, lp_ref = token_log_pi(w, RESPONSES), token_log_pi(anchor, RESPONSES)

  def loss(w, rows):
    lp = token_log_pi(w, RESPONSES[rows])
    rho = jnp.exp(lp - lp_old[rows])
    a = jnp.asarray(adv[rows], jnp.float32)[:, None]
    surrogate = jnp.minimum(rho * a, jnp.clip(rho, 1 - EPS, 1 + EPS) * a)
    d = lp_ref[rows] - lp
    k3 = jnp.exp(d) - d - 1
    return jnp.sum(jnp.mean(BETA * k3 - surrogate, axis=1)) / len(rows)

  for u in range(num_epochs * num_minibatches):
    rows = np.arange(N)[u % num_minibatches::num_minibatches]
    w = w - LR * jax.grad(loss)(w, rows)
    anchor = (1 - MU) * anchor + MU * w
  return w, anchor


@pytest.mark.parametrize("num_epochs,num_minibatches", [(1, 3), (2, 3), (3, 1)])
def test_several_updates_per_rollout_match_a_hand_written_loop(num_epochs, num_minibatches):
  model, tx = TablePolicy(), optax.sgd(LR)
  params = {"w": jnp.zeros((T, V), jnp.float32)}
  state = PolicyState(jnp.zeros((), jnp.int32), params, tx.init(params), {"w": W_REF})
  new, metrics = policy_step(state, {"w": W_REF}, batch(REWARDS), model=model, tx=tx,
                             schedule=lambda _: LR, algorithm=GRPO(epsilon=EPS), beta=BETA,
                             ema_rate=MU, samples_per_prompt=G, num_epochs=num_epochs,
                             num_minibatches=num_minibatches)
  w, anchor = hand_written_updates(num_epochs, num_minibatches)
  np.testing.assert_allclose(new.params["w"], w, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(new.anchor_params["w"], anchor, rtol=2e-5, atol=2e-6)
  assert int(new.step) == num_epochs * num_minibatches
  if num_epochs * num_minibatches > 1:  # later steps are off-policy
    # (on the enumerated batch the mean ratio stays 1: E_old[pi / pi_old] = 1)
    if num_minibatches > 1:  # small minibatches move far enough to clip
      assert float(metrics["clip_fraction"]) > 0.0
    # not reached by the on-policy single step: the ratios must come from the rollout
    single, _ = hand_written_updates(1, 1)
    assert np.max(np.abs(np.asarray(w - single))) > 1e-2


def test_update_count_rules():
  with pytest.raises(ValueError, match="at most 1 optimizer step"):
    po.check_updates(Reinforce(), 2, 1, 2)
  with pytest.raises(ValueError, match=">= 1"):
    po.check_updates(GRPO(), 0, 1, 2)
  po.check_updates(GRPO(), 4, 2, 2)
  po.check_updates(RLOO(), 2, 2, 2)


def _tiny_batch(b=16, t=10, prompt=4, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, t), np.float32)
  mask[:, prompt:] = 1.0
  return {"tokens": jnp.asarray(rng.integers(2, CFG.vocab_size, (b, t)), jnp.int32),
          "positions": jnp.tile(jnp.arange(t), (b, 1)),
          "segment_ids": jnp.ones((b, t), jnp.int32), "mask": jnp.asarray(mask),
          "rewards": jnp.asarray(rng.normal(size=b), jnp.float32)}


def test_sharded_step_equals_unsharded_on_8_devices(sft_dir):
  from posttrain_jax.models import params_checkpoint  # pylint: disable=g-import-not-at-top
  schedule, tx = OPT.build(10)
  results = []
  for ici, devices in (({"data": 1}, jax.devices()[:1]),
                       ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())):
    mesh = partitioning.create_mesh(ici, devices=devices)
    trainer = PolicyTrainer(CFG, tx, schedule, mesh, beta=0.1, anchor="ema", ema_rate=0.5,
                            samples_per_prompt=2, algorithm=GRPO(), num_epochs=2,
                            num_minibatches=2)
    sft = params_checkpoint.restore_params(sft_dir, trainer.abstract_params, CFG)
    state = trainer.init_state(sft)
    metrics = None
    for s in range(2):
      state, metrics = trainer.step(state, sft, _tiny_batch(seed=s))
    results.append((jax.device_get(state.params), jax.device_get(state.anchor_params),
                    jax.device_get(metrics)))
  (p1, a1, m1), (p8, a8, m8) = results
  for x, y in zip(jax.tree.leaves((p1, a1)), jax.tree.leaves((p8, a8))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  for key in ("loss", "kl_k3", "ratio", "kl_sft", "reward"):
    np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, atol=1e-6)
  assert float(m8["ratio"]) != 1.0   # the second update of each rollout is off-policy


@pytest.mark.parametrize("algorithm", [GRPO(loss_normalization="token"), RLOO()])
def test_train_policy_runs_each_algorithm(tmp_path, sft_dir, algorithm):
  result = run(tmp_path / "run", sft_dir, 2, algorithm=algorithm, num_epochs=2,
               num_minibatches=2)
  assert result.final_step == 2
  m = result.metrics[2]
  for key in ("loss", "clip_fraction", "ratio", "kl_sft", "kl_anchor", "reward"):
    assert np.isfinite(m[key]), key
  assert int(jax.device_get(result.state.step)) == 8   # 2 rollouts x 4 optimizer steps
  with pytest.raises(ValueError, match="at most 1"):
    run(tmp_path / "bad", sft_dir, 1, num_epochs=2)


def test_resume_counts_rollout_steps_not_optimizer_steps(tmp_path, sft_dir):
  kw = dict(algorithm=GRPO(), num_minibatches=2, checkpoint_every=2)
  full = run(tmp_path / "full", sft_dir, 4, **kw)
  run(tmp_path / "part", sft_dir, 2, **kw)
  resumed = run(tmp_path / "part", sft_dir, 4, **kw)
  assert resumed.resumed_from == 2 and sorted(resumed.metrics) == [3, 4]
  for step in (3, 4):
    assert resumed.metrics[step] == full.metrics[step]
  for a, b in zip(leaves(resumed.state), leaves(full.state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="not a multiple of num_epochs x num_minibatches"):
    run(tmp_path / "part", sft_dir, 6, algorithm=GRPO(), num_minibatches=3)


@pytest.mark.parametrize("name,cls,settings", [
    ("grpo_gold", GRPO, {"train_policy.beta": 0.04, "train_policy.anchor": "sft",
                         "train_policy.num_minibatches": 2, "%SAMPLES_PER_PROMPT": 4}),
    ("rloo_gold", RLOO, {"train_policy.beta": 0.1, "train_policy.anchor": "sft",
                         "%SAMPLES_PER_PROMPT": 4}),
])
def test_experiment_gins_select_the_algorithm(name, cls, settings):
  import gin  # pylint: disable=g-import-not-at-top
  from posttrain_jax import cli, main  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main.register_configurables()
  gin.clear_config()
  try:
    cli.configure(cli.parse_flags([f"--gin_file={repo}/gin/experiments/{name}.gin"]))
    algorithm = gin.query_parameter("train_policy.algorithm").scoped_configurable_fn()
    assert isinstance(algorithm, cls)
    for key, value in settings.items():
      assert gin.query_parameter(key) == value, key
  finally:
    gin.clear_config()
