"""REINFORCE gradients vs exact enumeration, baselines, KL estimates, EMA anchor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.distillation import sequence_kl
from posttrain_jax.rl import policy_gradient as pg

V, L, BOS = 3, 3, 3  # toy autoregressive policy: vocab 3, length 3, bos id 3


def bigram_logits(table, tokens):
  """Causal bigram model: logits[:, i] = table[tokens[:, i]] ([V + 1, V] table)."""
  return table[tokens]


def sample_bigram(table, n, rng):
  tokens = [jnp.full((n,), BOS, jnp.int32)]
  for i in range(L):
    rng, key = jax.random.split(rng)
    tokens.append(jax.random.categorical(key, table[tokens[-1]]).astype(jnp.int32))
  return jnp.stack(tokens, axis=1)


def reward_of(tokens):
  """A reward that depends on the whole sequence: count of 2s plus a bonus for 0 first."""
  return (jnp.sum(tokens[:, 1:] == 2, axis=1) + 1.5 * (tokens[:, 1] == 0)).astype(jnp.float32)


def exact_grad(table):
  seqs = jnp.asarray(sequence_kl.enumerate_sequences(V, L, bos=BOS))
  mask = jnp.ones(seqs.shape).at[:, 0].set(0.0)

  def expected_reward(t):
    logp = pg.sequence_logprobs(bigram_logits(t, seqs), seqs, mask)
    return jnp.sum(jnp.exp(logp) * reward_of(seqs))
  return np.asarray(jax.grad(expected_reward)(table))


def reinforce_replicates(table, kind, groups, group_size, rng):
  """One REINFORCE gradient estimate per batch of group_size samples (iid replicates)."""
  tokens = sample_bigram(table, groups * group_size, rng).reshape(groups, group_size, L + 1)
  mask = jnp.ones((group_size, L + 1)).at[:, 0].set(0.0)

  def estimate(tok):
    def objective(t):
      logp = pg.sequence_logprobs(bigram_logits(t, tok), tok, mask)
      adv = pg.advantages(reward_of(tok), kind, group_size)
      obj, sums = pg.reinforce_loss_sums(logp, adv)
      return obj / sums["weight"]
    return -jax.grad(objective)(table)  # ascent direction = estimate of grad E[r]
  return np.asarray(jax.jit(jax.vmap(estimate))(tokens))


TABLE = jnp.asarray(np.random.default_rng(0).normal(size=(V + 1, V)), jnp.float32)


@pytest.mark.parametrize("kind,group_size,scale", [
    ("none", 1, 1.0),
    ("leave_one_out", 4, 1.0),         # unbiased
    ("mean", 4, 1.0 - 1.0 / 4),        # batch mean includes the own sample: (1 - 1/B)
])
def test_reinforce_matches_exact_gradient(kind, group_size, scale):
  reps = reinforce_replicates(TABLE, kind, 20000, group_size, jax.random.key(1))
  mean = reps.mean(0)
  stderr = reps.std(0, ddof=1) / np.sqrt(len(reps))
  want = scale * exact_grad(TABLE)
  assert np.abs(want).max() > 0.05
  np.testing.assert_array_less(np.abs(mean - want), 4 * stderr + 1e-6)


def test_leave_one_out_baseline_reduces_variance_and_values():
  r = jnp.array([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
  np.testing.assert_allclose(pg.baseline(r, "leave_one_out", 3),
                             [4.0, 3.5, 1.5, 6.0, 4.0, 2.0])
  np.testing.assert_allclose(pg.baseline(r, "mean", 3), np.full(6, 3.5))
  np.testing.assert_allclose(pg.baseline(r, "none", 3), np.zeros(6))
  loo = reinforce_replicates(TABLE, "leave_one_out", 4000, 4, jax.random.key(2))
  none = reinforce_replicates(TABLE, "none", 4000, 4, jax.random.key(2))
  assert loo.var(0).sum() < none.var(0).sum()


def test_bad_baseline_input():
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    pg.baseline(jnp.ones(4), "leave_one_out", 1)
  with pytest.raises(ValueError, match="Unknown baseline"):
    pg.baseline(jnp.ones(4), "median", 2)
  with pytest.raises(ValueError, match="whole number of groups"):
    pg.baseline(jnp.ones(5), "leave_one_out", 2)


def test_kl_regularized_reward():
  r = jnp.array([1.0, -2.0, 0.5])
  lp, la = jnp.array([-3.0, -1.0, -2.0]), jnp.array([-2.0, -1.5, -4.0])
  np.testing.assert_array_equal(pg.kl_regularized_reward(r, lp, la, 0.0), r)
  np.testing.assert_allclose(pg.kl_regularized_reward(r, lp, la, 0.1),
                             r - 0.1 * (lp - la), rtol=1e-6)
  # stop-gradient: no gradient flows into the log-probs through the shaped reward
  g = jax.grad(lambda x: jnp.sum(pg.kl_regularized_reward(r, x, la, 0.5)))(lp)
  np.testing.assert_array_equal(g, 0.0)


def test_kl_estimators_match_enumeration():
  """The trainer's KL metrics (sequence_kl on the policy's samples) vs exact KL."""
  rng = np.random.default_rng(3)
  p_table = jnp.asarray(rng.normal(size=(V + 1, V)), jnp.float32)
  q_table = jnp.asarray(rng.normal(size=(V + 1, V)), jnp.float32)
  exact = sequence_kl.exact_sequence_kl(lambda t: bigram_logits(p_table, t),
                                        lambda t: bigram_logits(q_table, t), V, L, bos=BOS)
  tokens = sample_bigram(p_table, 40000, jax.random.key(4))
  mask = jnp.ones(tokens.shape).at[:, 0].set(0.0)
  lp, lq = bigram_logits(p_table, tokens), bigram_logits(q_table, tokens)
  mc = sequence_kl.mc_sequence_kl(pg.token_logprobs(lp, tokens, mask),
                                  pg.token_logprobs(lq, tokens, mask), mask)
  per_token = sequence_kl.expected_token_kl(lp, lq, mask)
  assert exact > 0.1
  for est in (mc, per_token):
    assert abs(float(est["kl"]) - exact) < 4 * float(est["stderr"]) + 1e-6
  assert float(per_token["stderr"]) < float(mc["stderr"])


def test_ema_update_limits():
  anchor = {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array(0.3)}
  params = {"w": jnp.array([0.1, -7.0, 1e-8]), "b": jnp.array(5.0)}
  same = pg.ema_update(anchor, params, 0.0)
  copy = pg.ema_update(anchor, params, 1.0)
  for k in anchor:
    np.testing.assert_array_equal(same[k], anchor[k])
    np.testing.assert_array_equal(copy[k], params[k])
  half = pg.ema_update(anchor, params, 0.25)
  np.testing.assert_allclose(half["w"], 0.75 * anchor["w"] + 0.25 * params["w"], rtol=1e-6)


def test_token_entropy_and_sequence_logprobs():
  logits = jnp.log(jnp.array([[[0.5, 0.5, 0.0 + 1e-30], [1.0, 1e-30, 1e-30], [0.2, 0.3, 0.5]]]))
  tokens = jnp.array([[2, 0, 1]])
  mask = jnp.array([[0, 1, 1]])
  total, count = pg.token_entropy_sums(logits, mask)
  assert float(count) == 2
  np.testing.assert_allclose(float(total), np.log(2.0), rtol=1e-5)  # H(0.5,0.5) + H(1,0,0)
  np.testing.assert_allclose(pg.sequence_logprobs(logits, tokens, mask),
                             [np.log(0.5) + np.log(1e-30)], rtol=1e-4)
