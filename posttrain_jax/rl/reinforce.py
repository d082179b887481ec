"""KL-regularised REINFORCE as a `policy_optimization` algorithm (WARP stage 1).

Rame et al. 2024 (WARP, arXiv 2406.16768); Williams 1992 (REINFORCE). The
reward is shaped by the KL to the anchor, a baseline is subtracted, and the
surrogate is the sequence log-prob (`policy_gradient` has the equations):

    R_i = r_i - beta (log pi_old(y_i|x_i) - log pi_ref(y_i|x_i))
    A_i = R_i - b_i        (baseline: none, batch mean, or leave-one-out)
    loss = -(1/B) sum_i A_i log pi_theta(y_i|x_i)

The surrogate has no importance ratio, so it takes one optimizer step per
rollout (max_updates = 1); RLOO is the same estimator with a clipped ratio.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from posttrain_jax.rl import policy_gradient as pg


@dataclasses.dataclass(frozen=True)
class Reinforce:
  """baseline: "leave_one_out" (needs G >= 2), "mean" or "none"."""
  baseline: str = "leave_one_out"
  name = "REINFORCE"
  max_updates = 1
  masks_rows = True  # baselines over rollout.valid rows (policy_optimization)

  def check(self, samples_per_prompt: int) -> None:
    pg.check_baseline(self.baseline, samples_per_prompt)

  def advantages(self, rollout, beta: float, samples_per_prompt: int):
    shaped = pg.kl_regularized_reward(rollout.rewards, jnp.sum(rollout.logp_old, -1),
                                      jnp.sum(rollout.logp_ref, -1), beta)
    return baselined(shaped, self.baseline, samples_per_prompt, rollout.valid)

  def loss_sums(self, token_logp, batch, beta: float):
    del beta
    return pg.reinforce_loss_sums(jnp.sum(token_logp, -1), batch["advantages"],
                                  batch["seq_weights"])


def baselined(shaped, kind: str, samples_per_prompt: int, valid):
  """(advantages, weights, metrics) of shaped rewards under a baseline, over the
  valid rows (all rows when valid is None); REINFORCE's and RLOO's."""
  adv = pg.advantages(shaped, kind, samples_per_prompt, valid)
  if valid is None:
    return adv, jnp.ones_like(adv), {"shaped_reward": jnp.mean(shaped)}
  weights = pg.baseline_weights(kind, samples_per_prompt, valid)
  count = jnp.maximum(jnp.sum(valid), 1.0)
  return adv, weights, {"shaped_reward": jnp.sum(jnp.where(valid > 0, shaped, 0.0)) / count}
