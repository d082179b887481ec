"""Rows with a non-finite reward (policy_step's nonfinite_rewards): dropped rows
give the update of the batch without them, baselines stay clean, and a step
is skipped only when configured or when no row is left."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.rl import nonfinite_rewards
from posttrain_jax.rl.bond import BOND
from posttrain_jax.rl.grpo import GRPO, group_advantages
from posttrain_jax.rl.policy_optimization import PolicyState, policy_step
from posttrain_jax.rl.reinforce import Reinforce
from posttrain_jax.rl.rloo import RLOO

from toy_policy import N, T, V, TablePolicy, batch  # pylint: disable=g-bad-import-order

REWARDS = np.random.default_rng(0).normal(size=N).astype(np.float32)
W_REF = jnp.asarray(np.random.default_rng(1).normal(size=(T, V)), jnp.float32)
LR = 1.0


def step(rewards, rows=None, *, algorithm, g, policy="drop_rows", num_minibatches=1):
  """(w after one SGD update from w = 0, metrics) on the given rows of the batch."""
  b = batch(rewards)
  if rows is not None:
    b = {k: v[np.asarray(rows)] for k, v in b.items()}
  tx = optax.sgd(LR)
  params = {"w": jnp.zeros((T, V), jnp.float32)}
  state = PolicyState(jnp.zeros((), jnp.int32), params, tx.init(params), None)
  fn = functools.partial(policy_step, model=TablePolicy(), tx=tx, schedule=lambda _: LR,
                         algorithm=algorithm, beta=0.3, ema_rate=0.0, samples_per_prompt=g,
                         num_minibatches=num_minibatches, nonfinite_rewards=policy)
  new, metrics = jax.jit(fn)(state, {"w": W_REF}, b)
  return np.asarray(new.params["w"]), {k: float(v) for k, v in metrics.items()}


def with_nan(rows, value=np.nan):
  r = REWARDS.copy()
  r[list(rows)] = value
  return r


@pytest.mark.parametrize("baseline", ["mean", "none"])
def test_one_nan_row_gives_the_update_of_the_batch_without_it(baseline):
  w, metrics = step(with_nan([5]), algorithm=Reinforce(baseline), g=1)
  keep = [i for i in range(N) if i != 5]
  w_without, m_without = step(REWARDS, keep, algorithm=Reinforce(baseline), g=1)
  np.testing.assert_allclose(w, w_without, rtol=1e-6, atol=1e-7)
  assert metrics["nonfinite_rewards"] == 1.0 and metrics["nonfinite"] == 0.0
  assert metrics["reward"] == pytest.approx(m_without["reward"], rel=1e-6)
  assert all(np.isfinite(v) for v in metrics.values())
  assert np.abs(w).sum() > 0  # the rest of the batch still trains


# G = 3: group 4 (rows 12-14) loses row 13, group 6 (rows 18-20) keeps one row.
BAD = [13, 19, 20]


@pytest.mark.parametrize("algorithm", [
    Reinforce("leave_one_out"), RLOO(), GRPO(), GRPO(scale_rewards=False,
                                                      loss_normalization="token")],
    ids=["reinforce_loo", "rloo", "grpo", "dr_grpo_token"])
def test_group_baselines_use_only_the_finite_rows(algorithm):
  """The update is linear in the rows' terms: the NaN batch (23 rows counted) =
  the 7 intact groups (21 rows, G = 3) + rows 12, 14 as one group of G = 2;
  the group left with one row (18) has no baseline and is dropped."""
  w, metrics = step(with_nan(BAD), algorithm=algorithm, g=3)
  intact = [i for i in range(N) if i // 3 not in (4, 6)]
  w_intact, _ = step(REWARDS, intact, algorithm=algorithm, g=3)
  w_pair, _ = step(REWARDS, [12, 14], algorithm=algorithm, g=2)
  np.testing.assert_allclose(23 * w, 21 * w_intact + 2 * w_pair, rtol=1e-5, atol=1e-6)
  assert metrics["nonfinite_rewards"] == 3.0 and metrics["nonfinite"] == 0.0
  assert all(np.isfinite(v) for v in metrics.values())


def test_an_algorithm_without_row_masks_loses_the_whole_group():
  """BOND's quantiles are per group: a bad row drops its group, exactly."""
  algorithm = BOND(n=2, num_policy=1)
  w, metrics = step(with_nan(BAD), algorithm=algorithm, g=3)
  intact = [i for i in range(N) if i // 3 not in (4, 6)]
  w_intact, _ = step(REWARDS, intact, algorithm=algorithm, g=3)
  np.testing.assert_allclose(w, w_intact, rtol=1e-5, atol=1e-6)
  assert metrics["nonfinite_rewards"] == 3.0 and np.isfinite(metrics["loss"])


def test_masked_group_advantages_are_those_of_the_smaller_group():
  r = jnp.array([1.0, 0.0, 4.0, 2.0, 7.0, 3.0])
  valid = jnp.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
  adv = np.asarray(group_advantages(r, 3, valid=valid))
  np.testing.assert_allclose(adv[[0, 2]], group_advantages(jnp.array([1.0, 4.0]), 2),
                             rtol=1e-6)
  np.testing.assert_allclose(adv[3:], group_advantages(r[3:], 3), rtol=1e-6)
  assert adv[1] == 0.0


@pytest.mark.parametrize("policy,bad", [("skip_step", [5]), ("drop_rows", range(N))])
def test_a_step_is_skipped_only_when_configured_or_nothing_is_left(policy, bad):
  w, metrics = step(with_nan(bad, np.inf), algorithm=Reinforce("mean"), g=1, policy=policy)
  np.testing.assert_array_equal(w, np.zeros((T, V)))
  assert metrics["nonfinite"] == 1.0 and metrics["nonfinite_rewards"] == len(bad)


def test_the_warning_and_the_error_name_the_reward_and_the_rows():
  lines = []
  rewards = jnp.asarray(with_nan([3, 7], np.nan).astype(np.float32))
  check = nonfinite_rewards.RewardCheck("runs/rm", "drop_rows", lines.append)
  assert check(4, jnp.asarray(REWARDS)) is not None and not lines  # finite: silent
  check(4, rewards)
  assert lines == [
      f"warning: reward 'runs/rm' is non-finite on 2 of {N} rows at step 4 (rows [3, 7]: "
      "nan, nan); those rows are left out of the update (nonfinite_rewards='drop_rows'; "
      "'skip_step' or 'error' to stop on them)"]
  with pytest.raises(nonfinite_rewards.NonFiniteRewardError,
                     match=r"reward 'runs/rm' is non-finite on 2 of 27 rows at step 4 "
                           r"\(rows \[3, 7\]: nan, nan\); stopping"):
    nonfinite_rewards.RewardCheck("runs/rm", "error", lines.append)(4, rewards)
  many = jnp.full((20,), jnp.nan)
  nonfinite_rewards.RewardCheck("gold", "skip_step", lines.append)(1, many)
  assert "(rows [0, 1, 2, 3, 4, 5, 6, 7], ... (12 more): nan" in lines[-1]
  assert "the step is not applied (nonfinite_rewards='skip_step')" in lines[-1]
  with pytest.raises(ValueError, match="nonfinite_rewards must be one of"):
    nonfinite_rewards.RewardCheck("gold", "ignore", lines.append)
