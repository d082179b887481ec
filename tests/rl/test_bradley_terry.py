"""Bradley-Terry loss: swap identities, limits, weights, accuracy."""

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.rl.bradley_terry import (bradley_terry_loss, bradley_terry_sums,
                                         pairwise_accuracy)

RNG = np.random.default_rng(0)
CHOSEN = jnp.asarray(RNG.normal(size=64) * 3, jnp.float32)
REJECTED = jnp.asarray(RNG.normal(size=64) * 3, jnp.float32)


def test_swap_gives_complementary_probabilities():
  # sigma(d) + sigma(-d) = 1  <=>  exp(-L(c, r)) + exp(-L(r, c)) = 1
  forward = bradley_terry_loss(CHOSEN, REJECTED)
  swapped = bradley_terry_loss(REJECTED, CHOSEN)
  np.testing.assert_allclose(np.exp(-forward) + np.exp(-swapped), 1.0, rtol=1e-6)
  # L(c, r) - L(r, c) = -(r_c - r_r)
  np.testing.assert_allclose(forward - swapped, -(CHOSEN - REJECTED), atol=1e-5)


def test_limits_and_reference_values():
  np.testing.assert_allclose(bradley_terry_loss(jnp.zeros(3), jnp.zeros(3)), np.log(2.0),
                             rtol=1e-6)
  big = bradley_terry_loss(jnp.array([50.0, -50.0]), jnp.array([0.0, 0.0]))
  np.testing.assert_allclose(big, [0.0, 50.0], atol=1e-6)  # stable, no overflow
  d = np.array([0.3, -1.2])
  np.testing.assert_allclose(bradley_terry_loss(jnp.asarray(d), jnp.zeros(2)),
                             np.log1p(np.exp(-d)), rtol=1e-6)


def test_sums_weights_and_accuracy():
  w = jnp.array([1.0, 1.0, 0.0, 1.0])
  c, r = jnp.array([2.0, 0.0, 5.0, 1.0]), jnp.array([1.0, 3.0, -5.0, 1.0])
  sums = bradley_terry_sums(c, r, w)
  assert float(sums["weight"]) == 3.0
  np.testing.assert_allclose(sums["correct"], 1.5)  # win, loss, (padding), tie
  np.testing.assert_allclose(sums["margin"], 1.0 - 3.0 + 0.0)
  ref = np.log1p(np.exp(-1.0)) + np.log1p(np.exp(3.0)) + np.log(2.0)
  np.testing.assert_allclose(sums["loss"], ref, rtol=1e-6)
  np.testing.assert_allclose(pairwise_accuracy(c, r, w), 0.5)
  acc = pairwise_accuracy(CHOSEN, REJECTED) + pairwise_accuracy(REJECTED, CHOSEN)
  np.testing.assert_allclose(acc, 1.0)


def test_shape_mismatch_is_rejected():
  with pytest.raises(ValueError, match="differ in shape"):
    bradley_terry_sums(jnp.zeros(3), jnp.zeros(4))
