"""GRPO (rl/grpo.py): the one-step update against enumeration, clipping signs,
the k3 estimator, loss normalisations, DAPO's group filter, bad settings.

Exact tests use the enumerable toy policy (tests/toy_policy.py): at w = 0 the
policy is uniform and the batch holds every response once, so with SGD (lr 1)
the update is minus the gradient of the loss, computed here with independent
code (numpy advantages, log-probs from the table).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.rl.grpo import GRPO, group_advantages, k3_kl
from posttrain_jax.rl.policy_optimization import PolicyState, policy_step
from posttrain_jax.rl.policy_training import PolicyTrainer

from toy_policy import L, N, T, V, TablePolicy, batch, token_log_pi  # pylint: disable=g-bad-import-order

G = 9                                             # 3 groups of 9 responses
ORDER = np.random.default_rng(2).permutation(N)   # groups mix the responses
REWARDS = np.random.default_rng(0).normal(size=N).astype(np.float32)  # row i
W_REF = jnp.asarray(np.random.default_rng(1).normal(size=(T, V)), jnp.float32)


def numpy_advantages(r, g, scale):
  groups = np.asarray(r, np.float64).reshape(-1, g)
  a = groups - groups.mean(1, keepdims=True)
  if scale:
    a = a / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
  return a.reshape(-1)


def grpo_step(algorithm, beta, num_epochs=1, num_minibatches=1, lr=1.0):
  model, tx = TablePolicy(), optax.sgd(lr)
  params = {"w": jnp.zeros((T, V), jnp.float32)}
  state = PolicyState(jnp.zeros((), jnp.int32), params, tx.init(params), None)
  return policy_step(state, {"w": W_REF}, batch(REWARDS, ORDER), model=model, tx=tx,
                     schedule=lambda _: lr, algorithm=algorithm, beta=beta, ema_rate=0.0,
                     samples_per_prompt=G, num_epochs=num_epochs,
                     num_minibatches=num_minibatches)


def reference_loss(w, adv, beta, normaliser):
  """sum_{i,t} [-rho_{i,t} A_i + beta k3_{i,t}] / normaliser at rho = 1 (pi_old = pi_w)."""
  lp = token_log_pi(w, RESPONSES_IN_ORDER)
  rho = jnp.exp(lp - jax.lax.stop_gradient(lp))
  lr = token_log_pi(W_REF, RESPONSES_IN_ORDER) - lp
  k3 = jnp.exp(lr) - lr - 1.0
  return jnp.sum(-rho * adv[:, None] + beta * k3) / normaliser


RESPONSES_IN_ORDER = np.asarray(batch(REWARDS, ORDER)["tokens"])[:, 1:]


@pytest.mark.parametrize("scale", [True, False])     # GRPO / Dr. GRPO advantages
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_one_step_is_group_normalised_reinforce_minus_beta_grad_k3(scale, beta):
  new, metrics = grpo_step(GRPO(scale_rewards=scale), beta)
  adv = jnp.asarray(numpy_advantages(REWARDS, G, scale), jnp.float32)
  want = -jax.grad(reference_loss)(jnp.zeros((T, V)), adv, beta, N * L)
  np.testing.assert_allclose(new.params["w"], want, rtol=1e-5, atol=1e-6)
  if beta == 0.0:  # REINFORCE with the group-normalised advantage, (1/(N L)) sum A grad log pi
    reinforce = jax.grad(lambda w: jnp.sum(adv * jnp.sum(token_log_pi(w, RESPONSES_IN_ORDER),
                                                         -1)) / (N * L))(jnp.zeros((T, V)))
    np.testing.assert_allclose(new.params["w"], reinforce, rtol=1e-5, atol=1e-6)
  else:  # the KL term moves the update
    without = -jax.grad(reference_loss)(jnp.zeros((T, V)), adv, 0.0, N * L)
    assert np.max(np.abs(np.asarray(want - without))) > 1e-2
  assert float(metrics["clip_fraction"]) == 0.0
  np.testing.assert_allclose(float(metrics["ratio"]), 1.0, rtol=1e-6)


def test_constant_normalisation_divides_by_the_padded_length():
  # Dr. GRPO: sum_{i,t} L / (G L_max); L_max defaults to the row length T.
  seq, _ = grpo_step(GRPO(), 0.3)
  const, _ = grpo_step(GRPO(loss_normalization="constant"), 0.3)
  np.testing.assert_allclose(const.params["w"], seq.params["w"] * L / T, rtol=1e-5,
                             atol=1e-7)
  const5, _ = grpo_step(GRPO(loss_normalization="constant", max_response_tokens=5), 0.3)
  np.testing.assert_allclose(const5.params["w"], seq.params["w"] * L / 5, rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize("normalization", ["sequence", "token", "constant"])
def test_normalisations_with_unequal_lengths(normalization):
  rng = np.random.default_rng(3)
  b, t = 6, 7
  lengths = np.array([1, 2, 3, 5, 6, 6])
  mask = (np.arange(t)[None] >= t - lengths[:, None]).astype(np.float32)
  lp = jnp.asarray(rng.normal(size=(b, t)) * mask, jnp.float32)
  ref = jnp.asarray(rng.normal(size=(b, t)) * mask, jnp.float32)
  adv = rng.normal(size=b).astype(np.float32)
  algo = GRPO(loss_normalization=normalization, max_response_tokens=8)
  data = {"mask": jnp.asarray(mask), "logp_old": lp, "logp_ref": ref,
          "advantages": jnp.asarray(adv), "seq_weights": jnp.ones(b)}
  objective, sums = algo.loss_sums(lp, data, 0.5)
  per_token = (-adv[:, None] + 0.5 * (np.exp(ref - lp) - (ref - lp) - 1.0)) * mask
  want = {"sequence": np.mean(per_token.sum(1) / lengths),
          "token": per_token.sum() / lengths.sum(),
          "constant": per_token.sum() / (b * 8)}[normalization]
  np.testing.assert_allclose(float(objective / sums["weight"]), want, rtol=1e-5)


@pytest.mark.parametrize("adv,log_ratio,zero_grad", [
    (1.0, np.log(1.5), True),     # A > 0, rho > 1 + eps: clipped, no push further up
    (1.0, np.log(0.5), False),    # A > 0, rho < 1 - eps: min is rho A, gradient A rho
    (-1.0, np.log(0.5), True),    # A < 0, rho < 1 - eps: clipped
    (-1.0, np.log(1.5), False),   # A < 0, rho > 1 + eps: unclipped, pulls down
    (1.0, np.log(1.1), False),    # inside the range
])
def test_clipping_zeroes_the_gradient_on_the_side_the_advantage_pushes(adv, log_ratio,
                                                                       zero_grad):
  algo = GRPO(epsilon=0.2)
  lp = jnp.array([[0.0, -1.0]])
  data = {"mask": jnp.array([[0.0, 1.0]]), "logp_old": lp - jnp.array([[0.0, log_ratio]]),
          "logp_ref": lp, "advantages": jnp.array([adv]), "seq_weights": jnp.ones(1)}
  grad = jax.grad(lambda x: algo.loss_sums(x, data, 0.0)[0])(lp)[0, 1]
  _, sums = algo.loss_sums(lp, data, 0.0)
  if zero_grad:
    assert float(grad) == 0.0 and float(sums["clip_fraction"]) == 1.0
  else:  # d(-rho A)/d log pi = -rho A: descending raises log pi when A > 0
    np.testing.assert_allclose(float(grad), -np.exp(log_ratio) * adv, rtol=1e-6)
    assert float(sums["clip_fraction"]) == 0.0


def test_asymmetric_clip_high():
  # DAPO: with epsilon_high 0.28 a ratio of 1.25 is inside the range for A > 0.
  lp = jnp.array([[0.0, -1.0]])
  data = {"mask": jnp.array([[0.0, 1.0]]), "logp_old": lp - jnp.array([[0.0, np.log(1.25)]]),
          "logp_ref": lp, "advantages": jnp.array([1.0]), "seq_weights": jnp.ones(1)}
  grads = [float(jax.grad(lambda x, a=a: a.loss_sums(x, data, 0.0)[0])(lp)[0, 1])
           for a in (GRPO(epsilon=0.2), GRPO(epsilon=0.2, epsilon_high=0.28))]
  assert grads[0] == 0.0 and grads[1] == pytest.approx(-1.25)


def test_k3_is_an_unbiased_nonnegative_kl_estimator():
  rng = np.random.default_rng(4)
  p = rng.dirichlet(np.ones(6))
  q = rng.dirichlet(np.ones(6))
  k3 = np.asarray(k3_kl(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q))))
  assert np.all(k3 >= 0.0)
  kl = np.sum(p * np.log(p / q))
  np.testing.assert_allclose(np.sum(p * k3), kl, rtol=1e-5)   # exact expectation
  draws = rng.choice(6, size=200_000, p=p)                    # and by sampling
  assert abs(np.mean(k3[draws]) - kl) < 4 * np.std(k3[draws]) / np.sqrt(len(draws))
  # the naive estimate of the reverse KL would differ
  assert abs(np.sum(q * np.log(q / p)) - kl) > 1e-2


def test_group_advantages_match_numpy_and_uniform_groups_are_dropped():
  r = jnp.array([1.0, 2.0, 4.0, 3.0, 3.0, 3.0])
  np.testing.assert_allclose(group_advantages(r, 3), numpy_advantages(r, 3, True),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(group_advantages(r, 3, scale=False),
                             numpy_advantages(r, 3, False), atol=1e-6)

  class Rollout:
    rewards = r
  _, keep, metrics = GRPO(drop_uniform_groups=True).advantages(Rollout, 0.0, 3)
  np.testing.assert_array_equal(keep, [1, 1, 1, 0, 0, 0])
  assert float(metrics["informative_groups"]) == 0.5
  _, keep_all, _ = GRPO().advantages(Rollout, 0.0, 3)
  np.testing.assert_array_equal(keep_all, np.ones(6))


@pytest.mark.parametrize("kwargs,g,match", [
    ({"loss_normalization": "batch"}, 4, "loss_normalization"),
    ({}, 1, "samples_per_prompt >= 2"),
    ({"epsilon": 0.0}, 4, "clip range"),
    ({"epsilon": 0.2, "epsilon_high": -0.1}, 4, "clip range"),
    ({"max_response_tokens": 0}, 4, "max_response_tokens"),
])
def test_bad_settings_are_rejected(kwargs, g, match):
  with pytest.raises(ValueError, match=match):
    GRPO(**kwargs).check(g)


@pytest.mark.parametrize("beta", [-0.04, float("nan")])
def test_a_negative_beta_is_refused_as_dpo_refuses_it(beta):
  with pytest.raises(ValueError, match="must be >= 0, got"):
    PolicyTrainer(None, None, None, None, beta=beta, anchor="sft", ema_rate=0.0,
                  samples_per_prompt=4, algorithm=GRPO())
  # beta = 0 (no KL term) is allowed: the check comes later (no model given).
  with pytest.raises(AttributeError):
    PolicyTrainer(None, None, None, None, beta=0.0, anchor="sft", ema_rate=0.0,
                  samples_per_prompt=4, algorithm=GRPO())
