"""The diversity reward D = 1 - cos(E(y1), E(y2)) and its REINFORCE estimator
(Cideron et al. 2024, arXiv 2410.06084)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.rl import diversity as dv
from posttrain_jax.rl import policy_gradient as pg

K = 3
EMB = jnp.asarray([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.2]])  # E of the K "sequences"


def test_identical_samples_give_zero_and_similarity_is_symmetric():
  rng = np.random.default_rng(0)
  a, b = jnp.asarray(rng.normal(size=(4, 5))), jnp.asarray(rng.normal(size=(4, 5)))
  np.testing.assert_allclose(dv.diversity(a, a), 0.0, atol=1e-6)
  np.testing.assert_allclose(dv.cosine_similarity(a, b), dv.cosine_similarity(b, a))
  np.testing.assert_allclose(dv.diversity(a, -a), 2.0, atol=1e-6)
  want = 1 - np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(dv.diversity(a, b), want, rtol=1e-5)
  same = jnp.concatenate([a[:1], a[:1]], 0)
  adv, m = dv.diversity_advantages(same, 2, "none")
  np.testing.assert_allclose(adv, 0.0, atol=1e-6)
  assert abs(float(m["diversity"])) < 1e-6


def test_mean_pooled_embedding_ignores_masked_positions():
  h = jnp.arange(24.0).reshape(2, 3, 4)
  mask = jnp.asarray([[1, 1, 0], [0, 0, 1]])
  np.testing.assert_allclose(dv.mean_pooled_embedding(h, mask),
                             [(h[0, 0] + h[0, 1]) / 2, h[1, 2]])


def _expected_gradient(theta, prompts, g, baseline):
  """E over every outcome of prompts x g samples of the surrogate's gradient,
  by exact enumeration."""
  p = jax.nn.softmax(theta)
  total = jnp.zeros_like(theta)
  for ys in itertools.product(range(K), repeat=prompts * g):
    ys = jnp.asarray(ys)
    prob = jnp.prod(p[ys])
    adv, _ = dv.diversity_advantages(EMB[ys], g, baseline)
    grad = jax.grad(lambda t: -pg.reinforce_loss_sums(
        jax.nn.log_softmax(t)[ys], adv)[0] / ys.shape[0])(theta)
    total = total + prob * grad
  return total


def _true_gradient(theta):
  d = dv.diversity(EMB[:, None], EMB[None, :])
  return jax.grad(lambda t: jax.nn.softmax(t) @ d @ jax.nn.softmax(t))(theta)


@pytest.mark.parametrize("prompts,g,baseline", [
    (1, 2, "none"), (1, 3, "leave_one_out"), (2, 2, "batch")])
def test_reinforce_gradient_of_d_is_unbiased_by_exact_enumeration(prompts, g, baseline):
  theta = jnp.asarray([0.3, -0.5, 0.9])
  want = _true_gradient(theta)
  got = _expected_gradient(theta, prompts, g, baseline)
  assert float(jnp.max(jnp.abs(want))) > 0.05
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_leave_one_out_baseline_excludes_sample_i():
  e = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))
  adv, _ = dv.diversity_advantages(e, 4, "leave_one_out")
  d = np.asarray(dv.pairwise_diversity(e, 4))[0]
  i = 0
  r = np.mean([d[i, j] for j in range(4) if j != i])
  b = np.mean([d[j, k] for j in range(4) for k in range(4) if j != k and i not in (j, k)])
  np.testing.assert_allclose(adv[0], 2 * (r - b), rtol=1e-5)


def test_bad_settings_rejected():
  with pytest.raises(ValueError, match="samples_per_prompt >= 3"):
    dv.check_baseline("leave_one_out", 2)
  with pytest.raises(ValueError, match="must be >= 2"):
    dv.check_baseline("none", 1)
  with pytest.raises(ValueError, match=">= 2 prompts"):
    dv.check_baseline("batch", 2, num_prompts=1)
  with pytest.raises(ValueError, match="Unknown diversity baseline"):
    dv.check_baseline("mean", 2)
