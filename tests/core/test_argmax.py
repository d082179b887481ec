"""argmax as max + min reductions: the same index as jnp.argmax, ties included."""

import jax.numpy as jnp
import numpy as np

from posttrain_jax.core.argmax import argmax


def test_equals_jnp_argmax_on_random_rows():
  x = np.random.default_rng(0).normal(size=(3, 5, 97)).astype(np.float32)
  np.testing.assert_array_equal(argmax(jnp.asarray(x)), np.argmax(x, axis=-1))


def test_ties_give_the_first_maximum():
  x = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0],
                   [-jnp.inf, -jnp.inf, -1.0, -1.0]])
  np.testing.assert_array_equal(argmax(x), [1, 0, 3, 2])
  np.testing.assert_array_equal(argmax(x), jnp.argmax(x, axis=-1))


def test_bfloat16_and_int32_dtype():
  x = jnp.asarray([[0.5, 1.5, 1.5]], jnp.bfloat16)
  out = argmax(x)
  assert out.dtype == jnp.int32 and out.tolist() == [1]
