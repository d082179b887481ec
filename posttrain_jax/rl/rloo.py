"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740).

k = G samples per prompt; the KL to the reference goes into the sequence reward
and each sample's baseline is the mean of the OTHER samples of its prompt:

    R_i = r_i - beta (log pi_old(y_i|x) - log pi_ref(y_i|x))
    A_i = R_i - (1 / (k - 1)) sum_{j != i, same prompt} R_j

The update is REINFORCE on the sequence log-prob. For several optimizer steps
per rollout the surrogate carries the sequence-level importance ratio
rho_i = pi_theta(y_i|x) / pi_old(y_i|x), clipped as in PPO (as TRL's
RLOOTrainer does):

    loss = -(1/B) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)

With one step per rollout rho = 1 and the gradient is exactly REINFORCE with the
leave-one-out baseline (tests/rl/test_rloo.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from posttrain_jax.rl import policy_gradient as pg
from posttrain_jax.rl import reinforce
from posttrain_jax.rl.policy_optimization import clipped_surrogate


@dataclasses.dataclass(frozen=True)
class RLOO:
  """epsilon: clip range of the sequence ratio (matters only with >1 step per rollout)."""
  epsilon: float = 0.2
  name = "RLOO"
  max_updates = None
  masks_rows = True  # leave-one-out over rollout.valid rows (policy_optimization)

  def check(self, samples_per_prompt: int) -> None:
    if not self.epsilon > 0:
      raise ValueError(f"RLOO.epsilon must be > 0, got {self.epsilon}.")
    if samples_per_prompt < 2:
      raise ValueError("RLOO needs samples_per_prompt >= 2 (the baseline averages the "
                       f"other samples of the same prompt), got {samples_per_prompt}.")

  def advantages(self, rollout, beta: float, samples_per_prompt: int):
    shaped = pg.kl_regularized_reward(rollout.rewards, jnp.sum(rollout.logp_old, -1),
                                      jnp.sum(rollout.logp_ref, -1), beta)
    return reinforce.baselined(shaped, "leave_one_out", samples_per_prompt, rollout.valid)

  def loss_sums(self, token_logp, batch, beta: float):
    del beta
    log_ratio = jnp.sum(token_logp - batch["logp_old"], -1)
    ratio = jnp.exp(log_ratio)
    surrogate, clipped = clipped_surrogate(ratio, batch["advantages"], self.epsilon,
                                           self.epsilon)
    w = batch["seq_weights"].astype(jnp.float32)
    objective = -jnp.sum(w * surrogate)
    return objective, {"loss": objective, "weight": jnp.sum(w),
                       "clip_fraction": jnp.sum(w * clipped),
                       "ratio": jnp.sum(w * jax.lax.stop_gradient(ratio))}
