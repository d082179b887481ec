"""Named reward registry: built-ins, registration, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.rl import gold_reward, rewards

TOKENS = jnp.array([[5, 6, 100, 200, 1, 0], [7, 300, 301, 300, 302, 1]], jnp.int32)
MASK = jnp.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool)


def test_length_counts_response_tokens():
  np.testing.assert_array_equal(rewards.get("length")(TOKENS, MASK), [3.0, 5.0])


def test_gold_is_the_gold_reward():
  np.testing.assert_allclose(rewards.get("gold")(TOKENS, MASK),
                             gold_reward.gold_reward(TOKENS, MASK), rtol=1e-6)


def test_register_and_errors():
  fn = lambda tokens, mask: jnp.sum(mask, -1) * 2.0
  rewards.register("test_rewards_double", fn)
  rewards.register("test_rewards_double", fn)  # same function again: fine
  assert "test_rewards_double" in rewards.names()
  np.testing.assert_array_equal(rewards.get("test_rewards_double")(TOKENS, MASK), [6.0, 10.0])
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("test_rewards_double", lambda t, m: m)
  with pytest.raises(ValueError, match=r"Unknown reward 'golden'.*'gold'"):
    rewards.get("golden")
