"""RLOO (rl/rloo.py): leave-one-out advantages with the KL in the reward, the
one-step update equals REINFORCE's, the sequence ratio is clipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.rl.policy_optimization import PolicyState, Rollout, policy_step
from posttrain_jax.rl.policy_training import PolicyTrainer, rl_step
from posttrain_jax.rl.rloo import RLOO

from toy_policy import N, T, V, TablePolicy, batch  # pylint: disable=g-bad-import-order

REWARDS = np.random.default_rng(0).normal(size=N).astype(np.float32)
W_REF = jnp.asarray(np.random.default_rng(1).normal(size=(T, V)), jnp.float32)


def test_advantages_are_leave_one_out_of_the_kl_shaped_reward():
  rng = np.random.default_rng(5)
  r, lp, ref = (rng.normal(size=6).astype(np.float32) for _ in range(3))
  mask = np.ones((6, 1), np.float32)
  rollout = Rollout(jnp.asarray(r), jnp.asarray(mask), jnp.asarray(lp)[:, None],
                    jnp.asarray(ref)[:, None])
  adv, weights, metrics = RLOO().advantages(rollout, 0.5, 3)
  shaped = (r - 0.5 * (lp - ref)).reshape(2, 3)
  want = shaped - (shaped.sum(1, keepdims=True) - shaped) / 2
  np.testing.assert_allclose(adv, want.reshape(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(weights, np.ones(6))
  np.testing.assert_allclose(float(metrics["shaped_reward"]), shaped.mean(), rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_one_step_equals_reinforce_with_the_leave_one_out_baseline(beta):
  model, tx = TablePolicy(), optax.sgd(1.0)
  w0 = {"w": jnp.asarray(np.random.default_rng(6).normal(size=(T, V)) * 0.3, jnp.float32)}
  state = PolicyState(jnp.zeros((), jnp.int32), w0, tx.init(w0), None)
  kw = dict(model=model, tx=tx, schedule=lambda _: 1.0, beta=beta, ema_rate=0.0,
            samples_per_prompt=3)
  rloo, metrics = policy_step(state, {"w": W_REF}, batch(REWARDS), algorithm=RLOO(), **kw)
  reinforce, _ = rl_step(state, {"w": W_REF}, batch(REWARDS), baseline="leave_one_out", **kw)
  np.testing.assert_allclose(rloo.params["w"], reinforce.params["w"], rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(np.asarray(rloo.params["w"] - w0["w"]))) > 1e-2   # it moved
  np.testing.assert_allclose(float(metrics["ratio"]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("adv,log_ratio,zero_grad", [
    (1.0, np.log(1.5), True), (-1.0, np.log(0.5), True),
    (1.0, np.log(0.5), False), (-1.0, np.log(1.5), False)])
def test_sequence_ratio_is_clipped(adv, log_ratio, zero_grad):
  lp = jnp.array([[0.0, -1.0, -0.5]])
  old = lp - jnp.array([[0.0, log_ratio / 2, log_ratio / 2]])   # ratio of the sum
  data = {"mask": jnp.array([[0.0, 1.0, 1.0]]), "logp_old": old, "logp_ref": lp,
          "advantages": jnp.array([adv]), "seq_weights": jnp.ones(1)}
  grad = jax.grad(lambda x: RLOO(epsilon=0.2).loss_sums(x, data, 0.0)[0])(lp)[0, 1:]
  if zero_grad:
    np.testing.assert_array_equal(grad, [0.0, 0.0])
  else:
    np.testing.assert_allclose(grad, [-np.exp(log_ratio) * adv] * 2, rtol=1e-6)


def test_a_negative_beta_is_refused_as_dpo_refuses_it():
  # The job's KL penalty towards the anchor; beta < 0 would be a bonus for
  # moving away from it (rl/dpo.py refuses beta <= 0 the same way).
  with pytest.raises(ValueError, match=r"^beta \(the KL penalty towards the anchor\) must "
                     r"be >= 0, got -0.1"):
    PolicyTrainer(None, None, None, None, beta=-0.1, anchor="sft", ema_rate=0.0,
                  samples_per_prompt=4, algorithm=RLOO())


def test_bad_settings_are_rejected():
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    RLOO().check(1)
  with pytest.raises(ValueError, match="epsilon"):
    RLOO(epsilon=0.0).check(2)
