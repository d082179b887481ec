"""BOND and J-BOND: distilling Best-of-N sampling into the policy.

Sessa et al. 2024, "BOND: Aligning LLMs with Best-of-N Distillation",
arXiv 2407.14622 (ICLR'25); the equations below restate the paper's.

Best-of-N of a reference pi_ref under a reward r (ties: the first maximiser):

    p<(y) = P_{y'~pi_ref}[r(y') < r(y)],   p<=(y) = P_{y'~pi_ref}[r(y') <= r(y)]
    pi_BoN(y) = pi_ref(y) p<=(y)^(N-1) sum_{i=1..N} (p<(y) / p<=(y))^(i-1)

Quantile estimate from k reference samples y_1..y_k:
p_hat<=(y) = (1/k) sum_i 1[r(y_i) <= r(y)].

Jeffreys objective J_beta = (1 - beta) KL(pi_BoN || pi) + beta KL(pi || pi_BoN):
  forward term  grad = -E_{y ~ pi_BoN}[grad log pi(y)]   (SFT on Best-of-N samples
                of the anchor);
  backward term grad = -(N - 1) E_{y ~ pi}[grad log pi(y) (log p_hat<=(y)
                - (log pi(y) - log pi_ref(y)) / (N - 1))], the collision term
                dropped; REINFORCE baseline = mean return of the other policy
                generations of the batch.

J-BOND (N = 2, per prompt one policy sample y and two anchor samples y'_1, y'_2):
  G_FW = -grad log pi(y'_Bo2);  r_J(y) = -log 16 if r(y) < min(r(y'_1), r(y'_2)) else 0;
  R = r_J - (log pi(y) - log pi_anchor(y));  G_BW = -grad log pi(y) (R - B);
  G_Reg = gamma grad log pi(y) (log pi(y) - log pi_anchor(y))   (estimates
    gamma grad KL(pi || pi_anchor));
  update (1 - beta) G_FW + beta G_BW + gamma G_Reg; EMA anchor eta = 0.02.

As `policy_optimization` algorithms (`BOND`, `JBOND`) every term is
c_i grad log pi(y_i) with a stop-gradient coefficient c_i per row, so the step is
the core's one-update REINFORCE surrogate with these coefficients as advantages.
Each prompt's group of G rows holds num_policy samples of the policy, then
G - num_policy samples of the anchor (`row_sources`; the job samples them with
`mixed_rollout.sample`): the anchor rows are the k quantile samples, and the
first N of them give the Best-of-N sample of the forward term. The anchor is
the core's: "sft" (pi_ref, one-shot BOND) or "ema" (iterative BOND / J-BOND,
with train_policy.ema_rate = eta, or ema_rate 0 and anchor_reset_every = K for
hard resets). train_policy.beta is not used: the KL weight is fixed by N.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LOG16 = math.log(16.0)


# ---------------------------------------------------------------- exact pi_BoN

def quantiles(p_ref, rewards) -> tuple[np.ndarray, np.ndarray]:
  """(p<, p<=) [n] of every outcome of a discrete pi_ref [n] with rewards [n]."""
  p, r = np.asarray(p_ref, np.float64), np.asarray(rewards, np.float64)
  below = r[None, :] < r[:, None]            # [y, y']: r(y') < r(y)
  at_most = r[None, :] <= r[:, None]
  return below @ p, at_most @ p


def best_of_n_distribution(p_ref, rewards, n: int) -> np.ndarray:
  """Exact pi_BoN [n_outcomes] of a discrete pi_ref, ties broken by the first
  maximiser: pi_ref p<=^(N-1) sum_{i=1..N} (p< / p<=)^(i-1)
  = pi_ref sum_{i=1..N} p<^(i-1) p<=^(N-i)."""
  if n < 1:
    raise ValueError(f"Best-of-N needs N >= 1, got {n}.")
  p = np.asarray(p_ref, np.float64)
  if np.any(p < 0) or not np.isclose(p.sum(), 1.0):
    raise ValueError("p_ref must be a probability vector (non-negative, sums to 1).")
  less, leq = quantiles(p, rewards)
  i = np.arange(1, n + 1)[:, None]
  return p * np.sum(less[None] ** (i - 1) * leq[None] ** (n - i), axis=0)


def bond_log_reward(p_ref, rewards, n: int) -> np.ndarray:
  """r_BOND = log p<= + log(sum_i (p< / p<=)^(i-1)) / (N - 1): pi_BoN is the
  KL-regularised optimum pi_ref exp(r_BOND / beta) with beta = 1 / (N - 1)."""
  less, leq = quantiles(p_ref, rewards)
  i = np.arange(1, n + 1)[:, None]
  collision = np.sum((less / leq)[None] ** (i - 1), axis=0)
  return np.log(leq) + np.log(collision) / max(n - 1, 1)


def log_quantile_reward(p_ref, rewards) -> np.ndarray:
  """log p<=(y): the backward term's reward (the collision term dropped)."""
  return np.log(quantiles(p_ref, rewards)[1])


def best_of_n_kls(p_ref, rewards, n: int, p_policy) -> tuple[float, float]:
  """Exact (KL(pi_BoN || pi), KL(pi || pi_BoN)) on a discrete space."""
  bon, pi = best_of_n_distribution(p_ref, rewards, n), np.asarray(p_policy, np.float64)
  fwd = np.sum(np.where(bon > 0, bon * (np.log(np.maximum(bon, 1e-300))
                                        - np.log(np.maximum(pi, 1e-300))), 0.0))
  bwd = np.sum(np.where(pi > 0, pi * (np.log(np.maximum(pi, 1e-300))
                                      - np.log(np.maximum(bon, 1e-300))), 0.0))
  return float(fwd), float(bwd)


def best_of_n_kl_bound(n: int) -> float:
  """KL(pi_BoN || pi_ref) <= log N - (N - 1) / N (equality without ties)."""
  return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------- estimators

def quantile_estimate(reward: Array, reference_rewards: Array) -> Array:
  """p_hat<=(y) [..] = (1/k) sum_i 1[r(y_i) <= r(y)]; reference_rewards [.., k]."""
  hits = reference_rewards <= reward[..., None]
  return jnp.mean(hits.astype(jnp.float32), axis=-1)


def jbond_reward(reward: Array, anchor_1: Array, anchor_2: Array) -> Array:
  """r_J = -log 16 if r(y) < min(r(y'_1), r(y'_2)) else 0; E[r_J] = -log 16 (1 - p<=)^2."""
  worse = reward < jnp.minimum(anchor_1, anchor_2)
  return jnp.where(worse, -LOG16, 0.0).astype(jnp.float32)


def batch_loo_baseline(returns: Array, valid: Array | None = None) -> Array:
  """b_i = mean of the other entries of `returns` (all of the batch); 0 if alone.
  valid (0/1, returns' shape): only valid entries count (rows with a non-finite
  reward are left out)."""
  flat = returns.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  if n < 2:
    return jnp.zeros_like(returns, jnp.float32)
  if valid is None:
    return ((jnp.sum(flat) - flat) / (n - 1)).reshape(returns.shape)
  v = valid.reshape(-1).astype(jnp.float32)
  flat = jnp.where(v > 0, flat, 0.0)
  return ((jnp.sum(flat) - flat) / jnp.maximum(jnp.sum(v) - v, 1.0)).reshape(returns.shape)


def first_best(rewards: Array) -> Array:
  """One-hot [.., m] of the first maximiser of rewards [.., m]."""
  return jax.nn.one_hot(jnp.argmax(rewards, axis=-1), rewards.shape[-1])


def jeffreys_coefficients(backward_return: Array, best_onehot: Array, beta: float,
                          reg: Array | None = None, gamma: float = 0.0,
                          valid: Array | None = None) -> tuple[Array, Array]:
  """Per-row coefficients c of grad log pi in the ascent direction
  (the loss is -sum c log pi): policy rows [B, P] and anchor rows [B, A].

    policy: beta (R - B) / P - gamma (log pi - log pi_anchor)
    anchor: (1 - beta) 1[row = Best-of-N sample]
  beta = 0 is pure forward KL (SFT on Best-of-N), beta = 1 pure backward.
  """
  p = backward_return.shape[-1]
  adv = backward_return - batch_loo_baseline(backward_return, valid)
  pol = beta * adv / p
  if reg is not None and gamma:
    pol = pol - gamma * reg
  return pol, (1.0 - beta) * best_onehot


# ---------------------------------------------------------------- algorithms

@dataclasses.dataclass(frozen=True)
class BOND:
  """BOND's Jeffreys objective as a `policy_optimization` algorithm.

  n: Best-of-N of the anchor (N = 8 on XSum; n in {2, 4} for iterative BOND);
  beta: the Jeffreys weight (0.5); num_policy: policy samples per prompt;
  samples_per_prompt - num_policy = k anchor samples (quantile, k = 16; the
  first n give the Best-of-N sample); quantile_floor: log p_hat is taken of
  max(p_hat, floor) (default 1 / (2 k)) so that a sample below all k reference
  samples gets a finite reward.
  """
  n: int = 8
  beta: float = 0.5
  num_policy: int = 2
  quantile_floor: float | None = None
  name = "BOND"
  max_updates = 1
  uses_beta = False  # train_policy.beta: the KL weight is fixed by N
  # The progress line shows the Jeffreys objective's pieces, not the surrogate
  # "loss" (-sum_i c_i log pi(y_i), dominated by the Best-of-N sample's NLL).
  shown = (("bond/jeffreys", "jeffreys", "{:.3f}"), ("bond/forward_kl", "fwd_kl", "{:.3f}"),
           ("bond/backward_kl", "bwd_kl", "{:.3f}"), ("bond/quantile", "quantile", "{:.3f}"))

  def row_sources(self, samples_per_prompt: int) -> tuple[str, ...]:
    return ("policy",) * self.num_policy + ("anchor",) * (samples_per_prompt
                                                           - self.num_policy)

  def check(self, samples_per_prompt: int) -> None:
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"{self.name}.beta (Jeffreys weight) must be in [0, 1], got "
                       f"{self.beta}.")
    if self.n < 2:
      raise ValueError(f"{self.name}.n must be >= 2 (Best-of-1 is pi_ref), got {self.n}.")
    if self.num_policy < 1:
      raise ValueError(f"{self.name}.num_policy must be >= 1, got {self.num_policy}.")
    if samples_per_prompt - self.num_policy < self.n:
      raise ValueError(
          f"{self.name} needs samples_per_prompt >= num_policy + n = "
          f"{self.num_policy + self.n} (policy samples, then k >= n anchor samples), got "
          f"{samples_per_prompt}; raise samples_per_prompt.")

  def backward_return(self, r_policy, r_anchor, log_ratio):
    """(N - 1) log p_hat<=(y) - (log pi(y) - log pi_anchor(y)), and p_hat."""
    k = r_anchor.shape[-1]
    floor = self.quantile_floor or 0.5 / k
    p_hat = quantile_estimate(r_policy, r_anchor[:, None, :])
    return (self.n - 1) * jnp.log(jnp.maximum(p_hat, floor)) - log_ratio, p_hat

  def regulariser(self, log_ratio):
    del log_ratio
    return None, 0.0

  def advantages(self, rollout, beta: float, samples_per_prompt: int):
    del beta  # the KL weight is fixed by N
    g, p = samples_per_prompt, self.num_policy
    valid = getattr(rollout, "valid", None)  # per group here (no masks_rows)
    ok = (jnp.ones(rollout.rewards.shape[0] // g) if valid is None
          else valid.reshape(-1, g)[:, 0].astype(jnp.float32))
    mean = lambda x: jnp.sum(ok * x) / jnp.maximum(jnp.sum(ok), 1.0)  # over the groups
    r = rollout.rewards.astype(jnp.float32).reshape(-1, g)
    log_ratio = (jnp.sum(rollout.logp_old, -1)
                 - jnp.sum(rollout.logp_ref, -1)).reshape(-1, g)
    r_pol, r_anc = r[:, :p], r[:, p:]
    ret, p_hat = self.backward_return(r_pol, r_anc, log_ratio[:, :p])
    best = first_best(r_anc[:, :self.n])
    best = jnp.pad(best, ((0, 0), (0, r_anc.shape[1] - self.n)))
    reg, gamma = self.regulariser(log_ratio[:, :p])
    pol, anc = jeffreys_coefficients(ret, best, self.beta, reg, gamma,
                                     None if valid is None else jnp.broadcast_to(
                                         ok[:, None], ret.shape))
    adv = jnp.concatenate([pol, anc], axis=1).reshape(-1)
    weights = jnp.full_like(adv, 1.0 / g)    # sum = prompts: per-prompt means
    bon_quantile = quantile_estimate(jnp.sum(best * r_anc, -1), r_anc)
    k_eff = self.n - 1
    # KL(pi || pi_BoN) ~ E_pi[log pi - log pi_a - (N-1) log p_hat] (collision dropped)
    backward_kl = mean(jnp.mean(ret * -1.0, -1))
    # KL(pi_BoN || pi) ~ E_BoN[log pi_a - log pi + (N-1) log p_hat] (same caveat)
    forward_kl = mean(jnp.sum(best * -log_ratio[:, p:], -1)
                      + k_eff * jnp.log(jnp.maximum(bon_quantile, 1e-6)))
    metrics = {
        # J_beta = (1 - beta) KL(pi_BoN || pi) + beta KL(pi || pi_BoN), estimated
        "bond/jeffreys": (1.0 - self.beta) * forward_kl + self.beta * backward_kl,
        "bond/quantile": mean(jnp.mean(p_hat, -1)),   # reward quantile vs the anchor
        "bond/policy_reward": mean(jnp.mean(r_pol, -1)),
        "bond/anchor_reward": mean(jnp.mean(r_anc, -1)),
        "bond/best_of_n_reward": mean(jnp.sum(best * r_anc, -1)),
        "bond/backward_return": mean(jnp.mean(ret, -1)),
        "bond/backward_kl": backward_kl,
        "bond/forward_kl": forward_kl,
    }
    return adv, weights, metrics

  def loss_sums(self, token_logp, batch, beta: float):
    """objective = -sum_i c_i log pi(y_i); weight = number of prompts."""
    del beta
    c = jax.lax.stop_gradient(batch["advantages"].astype(jnp.float32))
    objective = -jnp.sum(c * jnp.sum(token_logp, -1).astype(jnp.float32))
    return objective, {"loss": objective, "weight": jnp.sum(batch["seq_weights"])}


@dataclasses.dataclass(frozen=True)
class JBOND(BOND):
  """J-BOND: N = 2, one policy and two anchor samples per prompt
  (samples_per_prompt = 3), reward r_J, optional G_Reg with weight gamma; use
  anchor "ema" with ema_rate = eta (0.02)."""
  n: int = 2
  beta: float = 0.5
  num_policy: int = 1
  quantile_floor: float | None = None
  gamma: float = 0.0
  name = "J-BOND"

  def check(self, samples_per_prompt: int) -> None:
    if self.n != 2 or self.num_policy != 1:
      raise ValueError("J-BOND is defined for n = 2 and num_policy = 1; use BOND for "
                       "other settings.")
    if samples_per_prompt != 3:
      raise ValueError("J-BOND needs samples_per_prompt = 3 (one policy sample and two "
                       f"anchor samples per prompt), got {samples_per_prompt}.")
    if self.gamma < 0:
      raise ValueError(f"J-BOND.gamma must be >= 0, got {self.gamma}.")
    super().check(samples_per_prompt)

  def backward_return(self, r_policy, r_anchor, log_ratio):
    r_j = jbond_reward(r_policy, r_anchor[:, None, 0], r_anchor[:, None, 1])
    return r_j - log_ratio, quantile_estimate(r_policy, r_anchor[:, None, :])

  def regulariser(self, log_ratio):
    return log_ratio, self.gamma
