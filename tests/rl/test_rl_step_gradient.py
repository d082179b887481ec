"""The wired REINFORCE step (`rl_step`) against the exact gradient of
J(theta) = E_pi[r] - beta KL(pi || pi_anchor), computed by enumerating every
response of a toy policy.

The toy policy (tests/toy_policy.py) is a table of next-token logits per
position. At w = 0 it is uniform, so a batch that holds every response exactly
once is an exact expectation under pi: with plain SGD (lr 1) the step must move the
parameters by exactly grad J. Dropping the KL term, flipping its sign or
mis-scaling beta changes the update and fails these tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.rl.policy_training import PolicyState, rl_step

from toy_policy import N, T, V, TablePolicy, batch, log_pi  # pylint: disable=g-bad-import-order


def objective(w, w_anchor, rewards, beta):
  """J(w) = sum_y pi(y) r(y) - beta sum_y pi(y) (log pi(y) - log pi_anchor(y))."""
  lp, lp_anchor = log_pi(w), log_pi(w_anchor)
  p = jnp.exp(lp)
  return jnp.sum(p * rewards) - beta * jnp.sum(p * (lp - lp_anchor))


REWARDS = np.random.default_rng(0).normal(size=N).astype(np.float32)
W_ANCHOR = jnp.asarray(np.random.default_rng(1).normal(size=(T, V)), jnp.float32)


def step(beta, anchor, baseline="none", ema_rate=0.0):
  """One rl_step from the uniform policy with SGD(lr=1); anchor "sft" uses
  W_ANCHOR as the SFT model, "ema" starts the EMA anchor at W_ANCHOR."""
  model, tx = TablePolicy(), optax.sgd(1.0)
  params = {"w": jnp.zeros((T, V), jnp.float32)}
  anchor_params = {"w": W_ANCHOR} if anchor == "ema" else None
  state = PolicyState(jnp.zeros((), jnp.int32), params, tx.init(params), anchor_params)
  new, metrics = rl_step(state, {"w": W_ANCHOR}, batch(REWARDS), model=model, tx=tx,
                         schedule=lambda _: 1.0, beta=beta, ema_rate=ema_rate,
                         baseline=baseline, samples_per_prompt=N)
  return new, metrics


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("anchor", ["sft", "ema"])
def test_update_is_the_exact_gradient_of_reward_minus_beta_kl(beta, anchor):
  new, _ = step(beta, anchor)
  exact = jax.grad(objective)(jnp.zeros((T, V)), W_ANCHOR, REWARDS, beta)
  np.testing.assert_allclose(new.params["w"], exact, rtol=1e-5, atol=1e-6)
  # The KL term matters here: without it the update would differ by this much.
  if beta:
    without_kl = jax.grad(objective)(jnp.zeros((T, V)), W_ANCHOR, REWARDS, 0.0)
    assert np.max(np.abs(np.asarray(exact - without_kl))) > 1e-2


def test_a_mean_baseline_leaves_the_expected_update_unchanged():
  # sum_y grad log pi(y) = 0 exactly for the uniform policy, so subtracting the
  # batch mean of r_beta changes nothing.
  np.testing.assert_allclose(step(0.5, "sft", baseline="mean")[0].params["w"],
                             step(0.5, "sft", baseline="none")[0].params["w"],
                             rtol=1e-5, atol=1e-6)


def test_kl_metrics_are_the_exact_kl_for_the_enumerated_batch():
  _, metrics = step(0.5, "sft")
  lp, lp_anchor = log_pi(jnp.zeros((T, V))), log_pi(W_ANCHOR)
  # The batch is an exact expectation under the uniform policy.
  exact_kl = float(jnp.mean(lp - lp_anchor))
  np.testing.assert_allclose(float(metrics["kl_sft"]), exact_kl, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl_anchor"]), exact_kl, rtol=1e-5)


def test_ema_anchor_moves_towards_the_updated_policy():
  rate = 0.25
  new, _ = step(0.5, "ema", ema_rate=rate)
  np.testing.assert_allclose(new.anchor_params["w"],
                             (1 - rate) * W_ANCHOR + rate * new.params["w"], rtol=1e-6)
