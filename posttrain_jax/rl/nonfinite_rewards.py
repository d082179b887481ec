"""Host side of non-finite rewards: which rows, the warning line, the error.

A reward (a registered function or a reward model) can return NaN or inf for
some rows, e.g. a reward model fed token ids outside its vocabulary. The
policy step (`policy_optimization.policy_step`, `nonfinite_rewards`) drops such
rows on the device; this module fetches the step's rewards [b] (a few bytes),
names the reward and the rows in one line, and decides, per the job's setting:

  "drop_rows"  (default) warn; the rows are left out of the update (with their
               prompt's group where the algorithm's baseline needs it)
  "skip_step"  warn; the step is not applied (NonFiniteGuard counts it)
  "error"      raise NonFiniteRewardError (exit 1) before the step
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np

from posttrain_jax.core.nonfinite_guard import NonFiniteError
from posttrain_jax.rl.policy_optimization import NONFINITE_REWARDS, check_nonfinite_rewards

__all__ = ["NONFINITE_REWARDS", "NonFiniteRewardError", "RewardCheck", "host_rewards",
           "describe"]
SHOWN_ROWS = 8


class NonFiniteRewardError(NonFiniteError):
  """A reward was NaN/inf and nonfinite_rewards = "error"."""


def host_rewards(rewards) -> np.ndarray:
  """The global rewards [b] as float32 numpy (gathered across processes if sharded)."""
  if isinstance(rewards, jax.Array) and not rewards.is_fully_addressable:
    rewards = multihost_utils.process_allgather(rewards, tiled=True)
  return np.asarray(jax.device_get(rewards), np.float32).reshape(-1)


def describe(reward: str, step: int, values: np.ndarray, rows: np.ndarray) -> str:
  """"reward 'R' is non-finite on 2 of 8 rows at step 3 (rows [1, 5]: nan, inf)"."""
  shown = rows[:SHOWN_ROWS]
  more = f", ... ({len(rows) - len(shown)} more)" if len(rows) > len(shown) else ""
  return (f"reward {reward!r} is non-finite on {len(rows)} of {len(values)} rows at step "
          f"{step} (rows {shown.tolist()}{more}: "
          f"{', '.join(str(v) for v in values[shown])}{more and ', ...'})")


class RewardCheck:
  """check(step, rewards) -> rewards: warns or raises on non-finite rows."""

  def __init__(self, reward: str, policy: str, warn: Callable[[str], None],
               setting: str = "nonfinite_rewards"):
    check_nonfinite_rewards(policy)
    self.reward, self.policy, self.warn, self.setting = reward, policy, warn, setting
    self.rows_dropped = 0

  def __call__(self, step: int, rewards):
    values = host_rewards(rewards)
    rows = np.flatnonzero(~np.isfinite(values))
    if not len(rows):
      return rewards
    what = describe(self.reward, step, values, rows)
    if self.policy == "error":
      raise NonFiniteRewardError(
          f"The {what}; stopping before the update ({self.setting}='error'). Fix: check "
          "the reward (a reward model must share the policy's vocabulary), or set "
          f"{self.setting}='drop_rows' to leave such rows out.")
    if self.policy == "skip_step" or len(rows) == len(values):
      outcome = f"the step is not applied ({self.setting}={self.policy!r})"
    else:
      self.rows_dropped += len(rows)
      outcome = (f"those rows are left out of the update ({self.setting}='drop_rows'; "
                 "'skip_step' or 'error' to stop on them)")
    self.warn(f"warning: {what}; {outcome}")
    return rewards
