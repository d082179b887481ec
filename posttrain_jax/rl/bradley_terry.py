"""Bradley-Terry preference loss for reward models.

A reward model r scores (prompt x, response y); under the Bradley-Terry model
(Bradley & Terry, 1952) the probability that y+ is preferred over y- is
P(y+ > y- | x) = sigma(r(x, y+) - r(x, y-)), and the reward model minimises

  L = -E log sigma(r(x, y+) - r(x, y-))

as in WARM (Ramé et al., 2024, "WARM: On the Benefits of Weight Averaged
Reward Models", arXiv 2401.12187, Sec. 2). Swapping y+ and y- turns
sigma(d) into sigma(-d) = 1 - sigma(d), so exp(-L(c, r)) + exp(-L(r, c)) = 1
and L(c, r) - L(r, c) = -(r_c - r_r) per pair.

Functions return sums over pairs plus "weight" (the number of real pairs), the
convention of trainer.optimizer_step, which normalises once per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bradley_terry_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
  """Per-pair -log sigma(r(x, y+) - r(x, y-)), float32, same shape as the inputs."""
  margin = chosen_rewards.astype(jnp.float32) - rejected_rewards.astype(jnp.float32)
  return -jax.nn.log_sigmoid(margin)


def pairwise_accuracy(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                      weights: jax.Array | None = None) -> jax.Array:
  """Weighted fraction of pairs with r(y+) > r(y-) (a tie counts 1/2)."""
  sums = bradley_terry_sums(chosen_rewards, rejected_rewards, weights)
  return sums["correct"] / jnp.maximum(sums["weight"], 1e-9)


def bradley_terry_sums(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                       weights: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums over pairs: loss (BT), correct (pairwise accuracy), margin
  (r(y+) - r(y-)) and weight (sum of the pair weights; padding pairs get 0)."""
  if chosen_rewards.shape != rejected_rewards.shape:
    raise ValueError(f"chosen and rejected rewards differ in shape: "
                     f"{chosen_rewards.shape} vs {rejected_rewards.shape}.")
  w = (jnp.ones(chosen_rewards.shape, jnp.float32) if weights is None
       else weights.astype(jnp.float32))
  margin = chosen_rewards.astype(jnp.float32) - rejected_rewards.astype(jnp.float32)
  correct = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
  return {"loss": jnp.sum(w * bradley_terry_loss(chosen_rewards, rejected_rewards)),
          "correct": jnp.sum(w * correct),
          "margin": jnp.sum(w * margin),
          "weight": jnp.sum(w)}
