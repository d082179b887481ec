"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath,
arXiv 2402.03300), with the Dr. GRPO and DAPO variants as options.

Per prompt q, G samples o_1..o_G ~ pi_old with rewards r_i. No value network:
the advantage of every token of o_i is its reward normalised within the group,

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)          (scale_rewards=True)
    A_i =  r_i - mean_j r_j                               (Dr. GRPO: False)

(std with Bessel's correction, as TRL; G >= 2). Per token, the ratio
rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | ...) enters
PPO's clipped objective, and the KL to the reference is a loss term with the
"k3" estimator (Schulman 2020, "Approximating KL divergence"):

    D_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1     (>= 0; unbiased for
          KL(pi_theta || pi_ref) under samples of pi_theta)
    L_{i,t} = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta D_t

Normalisation of sum_{i,t} L_{i,t}:
  "sequence"  (GRPO)     (1/G) sum_i (1/|o_i|) sum_t L_{i,t}
  "token"     (DAPO, Yu et al. 2025, arXiv 2503.14476)  sum_{i,t} L / sum_i |o_i|
  "constant"  (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783)  sum_{i,t} L / (G * L_max)
with L_max = max_response_tokens (None: the padded row length T).

DAPO's asymmetric clipping is epsilon_high (None: = epsilon; DAPO uses 0.2 /
0.28). drop_uniform_groups (DAPO's dynamic sampling, without the re-sampling):
groups whose G rewards are all equal carry no signal (A = 0) and are removed
from the loss and its normaliser. Defaults: eps 0.2; the paper's beta 0.04 is
the job's `beta`.

With one optimizer step per rollout rho = 1, nothing is clipped, and the
gradient is REINFORCE's with the group-normalised advantage minus beta grad KL
(tests/rl/test_grpo.py checks both by enumeration).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from posttrain_jax.rl.policy_optimization import clipped_surrogate

NORMALIZATIONS = ("sequence", "token", "constant")


def k3_kl(logp: jax.Array, logp_ref: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(pi || pi_ref) at a token sampled from pi:
  exp(lr) - lr - 1 with lr = log pi_ref - log pi (elementwise, >= 0)."""
  log_ratio = logp_ref - logp
  return jnp.exp(log_ratio) - log_ratio - 1.0


def group_advantages(rewards: jax.Array, samples_per_prompt: int, scale: bool = True,
                     eps: float = 1e-4, valid: jax.Array | None = None) -> jax.Array:
  """[b] (r_i - mean_g) / (std_g + eps) over consecutive groups of G rows.

  valid [b] (0/1): mean and std over the group's valid rows only (those of a
  group of n valid rows are the advantages of that n-sample group); 0 on
  invalid rows and in groups with fewer than 2 valid rows (`group_weights`).
  """
  g = samples_per_prompt
  if rewards.shape[0] % g:
    raise ValueError(f"Batch of {rewards.shape[0]} sequences is not a whole number of "
                     f"groups of samples_per_prompt={g}.")
  groups = rewards.astype(jnp.float32).reshape(-1, g)
  if valid is not None:
    return _masked_group_advantages(groups, valid.reshape(-1, g), scale,
                                    eps).reshape(rewards.shape)
  centred = groups - jnp.mean(groups, axis=1, keepdims=True)
  if scale:
    centred = centred / (jnp.std(groups, axis=1, ddof=1, keepdims=True) + eps)
  return centred.reshape(rewards.shape)


def _masked_group_advantages(groups, valid, scale: bool, eps: float):
  v = valid.astype(jnp.float32)
  n = jnp.sum(v, axis=1, keepdims=True)
  r = jnp.where(v > 0, groups, 0.0)
  centred = r - jnp.sum(r, axis=1, keepdims=True) / jnp.maximum(n, 1.0)
  if scale:
    var = jnp.sum(v * centred**2, axis=1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    centred = centred / (jnp.sqrt(var) + eps)
  return jnp.where((v > 0) & (n >= 2), centred, 0.0)


def group_weights(valid: jax.Array, samples_per_prompt: int) -> jax.Array:
  """[b] 1 for valid rows of groups with >= 2 valid rows (a baseline exists)."""
  v = valid.astype(jnp.float32).reshape(-1, samples_per_prompt)
  return (v * (jnp.sum(v, axis=1, keepdims=True) >= 2)).reshape(-1)


@dataclasses.dataclass(frozen=True)
class GRPO:
  epsilon: float = 0.2
  epsilon_high: float | None = None
  scale_rewards: bool = True
  loss_normalization: str = "sequence"
  max_response_tokens: int | None = None
  drop_uniform_groups: bool = False
  std_eps: float = 1e-4
  name = "GRPO"
  max_updates = None
  masks_rows = True  # group statistics over rollout.valid rows (policy_optimization)

  def check(self, samples_per_prompt: int) -> None:
    if self.loss_normalization not in NORMALIZATIONS:
      raise ValueError(f"Unknown GRPO.loss_normalization {self.loss_normalization!r}; "
                       f"choose one of {list(NORMALIZATIONS)}.")
    high = self.epsilon if self.epsilon_high is None else self.epsilon_high
    if not (0 < self.epsilon < 1 and high > 0):
      raise ValueError(f"GRPO clip range needs 0 < epsilon < 1 and epsilon_high > 0, got "
                       f"{self.epsilon} and {self.epsilon_high}.")
    if samples_per_prompt < 2:
      raise ValueError("GRPO needs samples_per_prompt >= 2 (advantages are normalised "
                       f"within each prompt's group), got {samples_per_prompt}.")
    if self.max_response_tokens is not None and self.max_response_tokens < 1:
      raise ValueError(f"GRPO.max_response_tokens must be >= 1, got "
                       f"{self.max_response_tokens}.")

  def advantages(self, rollout, beta: float, samples_per_prompt: int):
    del beta  # the KL is a loss term, not in the reward
    r, valid = rollout.rewards, getattr(rollout, "valid", None)
    adv = group_advantages(r, samples_per_prompt, self.scale_rewards, self.std_eps, valid)
    groups = r.reshape(-1, samples_per_prompt)
    if valid is None:
      informative = jnp.max(groups, 1) > jnp.min(groups, 1)
      weights = jnp.ones_like(r)
      std = jnp.mean(jnp.std(groups, axis=1, ddof=1))
    else:  # over the valid rows; a group with < 2 of them has no baseline
      v = valid.reshape(-1, samples_per_prompt) > 0
      informative = (jnp.max(jnp.where(v, groups, -jnp.inf), 1)
                     > jnp.min(jnp.where(v, groups, jnp.inf), 1))
      weights = group_weights(valid, samples_per_prompt)
      counted = jnp.sum(v, 1) >= 2
      dev = jnp.where(v, groups - jnp.sum(jnp.where(v, groups, 0.0), 1, keepdims=True)
                      / jnp.maximum(jnp.sum(v, 1, keepdims=True), 1), 0.0)
      group_std = jnp.sqrt(jnp.sum(dev**2, 1) / jnp.maximum(jnp.sum(v, 1) - 1, 1))
      std = jnp.sum(jnp.where(counted, group_std, 0.0)) / jnp.maximum(jnp.sum(counted), 1)
    if self.drop_uniform_groups:
      weights = weights * jnp.repeat(informative.astype(jnp.float32), samples_per_prompt)
    return adv, weights, {
        "informative_groups": jnp.mean(informative.astype(jnp.float32)),
        "group_reward_std": std}

  def _token_weights(self, mask, seq_weights):
    """[b, T] weights w_{i,t} and their normaliser (sum of the 'weight')."""
    m = mask.astype(jnp.float32) * seq_weights[:, None]
    if self.loss_normalization == "token":
      return m, jnp.sum(m)
    if self.loss_normalization == "sequence":
      length = jnp.maximum(jnp.sum(mask.astype(jnp.float32), -1, keepdims=True), 1.0)
      return m / length, jnp.sum(seq_weights)
    max_len = self.max_response_tokens or mask.shape[-1]
    return m / max_len, jnp.sum(seq_weights)

  def loss_sums(self, token_logp, batch, beta: float):
    high = self.epsilon if self.epsilon_high is None else self.epsilon_high
    ratio = jnp.exp(token_logp - batch["logp_old"])
    adv = batch["advantages"][:, None]
    surrogate, clipped = clipped_surrogate(ratio, adv, self.epsilon, high)
    kl = k3_kl(token_logp, batch["logp_ref"])
    w, weight = self._token_weights(batch["mask"], batch["seq_weights"].astype(jnp.float32))
    objective = jnp.sum(w * (beta * kl - surrogate))
    stop = jax.lax.stop_gradient
    return objective, {"loss": objective, "weight": weight,
                       "clip_fraction": jnp.sum(w * clipped),
                       "ratio": jnp.sum(w * stop(ratio)), "kl_k3": jnp.sum(w * stop(kl))}
