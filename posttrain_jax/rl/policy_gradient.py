"""KL-regularised REINFORCE: sequence log-probs, rewards, baselines, loss, EMA anchor.

Pure functions used by `policy_training` (and by later WARP/BOND/CLP trainers).

REINFORCE (Williams 1992, "Simple statistical gradient-following algorithms
for connectionist reinforcement learning"): for prompts x and responses
y ~ pi_theta(.|x),

    grad E_y[R(x, y)] = E_y[(R(x, y) - b(x)) grad log pi_theta(y|x)]

for any baseline b that does not depend on y. Sequence-level log-probability:
log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t) over the response tokens (mask m).

The reward is KL-regularised towards an anchor policy (WARP, Rame et al. 2024,
arXiv 2406.16768, Stage 1):

    R = r_beta(x, y) = r(x, y) - beta * (log pi_theta(y|x) - log pi_anchor(y|x)),

treated as a constant (stop-gradient) in the surrogate, whose expectation over
y ~ pi_theta is E[r] - beta * KL(pi_theta || pi_anchor). The anchor is either
the SFT model or an exponential moving average of the policy,
theta_ema <- (1 - mu) * theta_ema + mu * theta (WARP: mu = 0.01, beta = 0.1).

Baselines: "none"; "mean" (batch mean; it includes each sample's own reward,
so the gradient is scaled by (1 - 1/B), a small bias that the tests check
exactly); "leave_one_out" (mean of the OTHER samples of the same prompt, the
REINFORCE baseline of BOND, Sessa et al. 2024, arXiv 2407.14622; unbiased, and
needs samples_per_prompt >= 2).

Layout: as `sampling.SampleOutput` (prompt then response, [b, T]); logits
[b, T, V] from scoring those tokens, logits[:, t - 1] predicting token t; the
G samples of one prompt are consecutive rows (b = num_prompts * G).
KL estimates reuse `sequence_kl` (mc_sequence_kl / expected_token_kl).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from posttrain_jax.distillation.sequence_kl import next_token_logprobs

Array = jax.Array

BASELINES = ("none", "mean", "leave_one_out")


def token_logprobs(logits: Array, tokens: Array, mask: Array) -> Array:
  """[b, T] m_t * log pi(tokens_t | tokens_<t) (0 where mask is 0 and at t = 0)."""
  return mask.astype(jnp.float32) * next_token_logprobs(logits, tokens)


def sequence_logprobs(logits: Array, tokens: Array, mask: Array) -> Array:
  """[b] log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t)."""
  return jnp.sum(token_logprobs(logits, tokens, mask), axis=-1)


def kl_regularized_reward(reward: Array, logp_policy: Array, logp_anchor: Array,
                          beta: float) -> Array:
  """r_beta = r - beta * (log pi(y|x) - log pi_anchor(y|x)), stop-gradient.

  All arguments per sequence [b]. beta = 0 returns the reward unchanged.
  """
  log_ratio = jax.lax.stop_gradient(logp_policy - logp_anchor)
  return jax.lax.stop_gradient(reward.astype(jnp.float32) - beta * log_ratio)


def check_baseline(kind: str, samples_per_prompt: int) -> None:
  """Rejects an unknown baseline, or leave-one-out with fewer than 2 samples."""
  if kind not in BASELINES:
    raise ValueError(f"Unknown baseline {kind!r}; choose one of {list(BASELINES)}.")
  if samples_per_prompt < 1:
    raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}.")
  if kind == "leave_one_out" and samples_per_prompt < 2:
    raise ValueError(
        "The leave_one_out baseline needs samples_per_prompt >= 2 (it averages the "
        f"other samples of the same prompt), got {samples_per_prompt}; raise "
        "samples_per_prompt or use baseline 'mean'.")


def _groups(x: Array, g: int) -> Array:
  if x.shape[0] % g:
    raise ValueError(f"Batch of {x.shape[0]} sequences is not a whole number "
                     f"of groups of samples_per_prompt={g}.")
  return x.reshape(-1, g)


def baseline(rewards: Array, kind: str, samples_per_prompt: int = 1,
             valid: Array | None = None) -> Array:
  """[b] baseline b_i for rewards [b] (the G samples of a prompt consecutive).

  none:           b_i = 0
  mean:           b_i = (1/B) sum_j R_j
  leave_one_out:  b_i = (1/(G-1)) sum_{j in group(i), j != i} R_j

  valid [b] (0/1): only rows with valid = 1 enter the sums and counts (rows
  with a non-finite reward, whose R_j may be anything finite, e.g. 0): the
  baseline of the batch without those rows. A row without a defined baseline
  (leave-one-out with no other valid row in its group) gets 0; its weight is 0
  (`baseline_weights`).
  """
  check_baseline(kind, samples_per_prompt)
  rewards = rewards.astype(jnp.float32)
  if kind == "none":
    return jnp.zeros_like(rewards)
  if valid is None:
    if kind == "mean":
      return jnp.broadcast_to(jnp.mean(rewards), rewards.shape)
    g = samples_per_prompt
    groups = _groups(rewards, g)
    others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (g - 1)
    return others.reshape(rewards.shape)
  v = valid.astype(jnp.float32)
  r = jnp.where(v > 0, rewards, 0.0)
  if kind == "mean":
    return jnp.broadcast_to(jnp.sum(r) / jnp.maximum(jnp.sum(v), 1.0), rewards.shape)
  groups, vg = _groups(r, samples_per_prompt), _groups(v, samples_per_prompt)
  others = ((jnp.sum(groups, axis=1, keepdims=True) - groups)
            / jnp.maximum(jnp.sum(vg, axis=1, keepdims=True) - vg, 1.0))
  return others.reshape(rewards.shape)


def baseline_weights(kind: str, samples_per_prompt: int, valid: Array) -> Array:
  """[b] 1 for the valid rows that have a baseline, else 0: leave-one-out needs
  another valid row in the group (a group of one valid sample is dropped)."""
  v = valid.astype(jnp.float32)
  if kind != "leave_one_out":
    return v
  vg = _groups(v, samples_per_prompt)
  enough = jnp.sum(vg, axis=1, keepdims=True) >= 2
  return (vg * enough).reshape(v.shape)


def advantages(rewards: Array, kind: str, samples_per_prompt: int = 1,
               valid: Array | None = None) -> Array:
  """A_i = R_i - b_i (stop-gradient); with `valid`, 0 on rows of weight 0."""
  adv = rewards.astype(jnp.float32) - baseline(rewards, kind, samples_per_prompt, valid)
  if valid is not None:
    adv = jnp.where(baseline_weights(kind, samples_per_prompt, valid) > 0, adv, 0.0)
  return jax.lax.stop_gradient(adv)


def reinforce_loss_sums(logp: Array, advantage: Array,
                        weights: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """REINFORCE surrogate in the `trainer.optimizer_step` convention.

  objective = -sum_i w_i A_i log pi(y_i|x_i), A stop-gradient, so that
  -grad(objective) / sum_i w_i is the REINFORCE estimate of grad E[R]. Returns
  (objective, {"loss": objective, "weight": sum_i w_i}); w defaults to 1 per
  sequence (weight = number of sequences).
  """
  adv = jax.lax.stop_gradient(advantage.astype(jnp.float32))
  w = jnp.ones_like(adv) if weights is None else weights.astype(jnp.float32)
  objective = -jnp.sum(w * adv * logp.astype(jnp.float32))
  return objective, {"loss": objective, "weight": jnp.sum(w)}


def ema_update(anchor, params, rate: float):
  """theta_ema <- (1 - mu) * theta_ema + mu * theta (WARP's EMA anchor).

  mu = 0 returns the anchor bit for bit and mu = 1 the policy (for finite
  weights); dtypes follow the anchor.
  """
  return jax.tree.map(
      lambda a, p: ((1.0 - rate) * a + rate * p).astype(a.dtype), anchor, params)


def token_entropy_sums(logits: Array, mask: Array) -> tuple[Array, Array]:
  """(sum over masked tokens of H(pi(.|y_<t)), number of masked tokens).

  H at response position t uses logits[:, t - 1] (the distribution the token
  was drawn from, untempered); entropy per token = first / second.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  m = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(m * entropy), jnp.sum(m)
