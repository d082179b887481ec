"""Direct Preference Optimization: the pairwise losses as sums, pure functions.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model", arXiv 2305.18290, Eq. 7) trains the policy
pi directly on preference pairs (x, y_w, y_l) against a frozen reference
pi_ref (the SFT model). With sequence log-probabilities
log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t) over the response tokens m,
the implicit rewards r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)) and

    h = r(x, y_w) - r(x, y_l)
      = beta [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))],

the losses per pair are

    "sigmoid"  -(1 - eps) log sigma(h) - eps log sigma(-h)
               eps = label_smoothing: conservative DPO (cDPO, Mitchell 2023,
               "A note on DPO with noisy preferences"), a label flipped with
               probability eps; eps = 0 is the DPO loss -log sigma(h). For
               0 < eps < 1/2 the minimum is at h = log((1 - eps) / eps).
    "ipo"      (h / beta - 1 / (2 tau))^2
               IPO (Azar et al. 2023, "A General Theoretical Paradigm to
               Understand Learning from Human Preferences", arXiv 2310.12036,
               Eq. 17), tau = ipo_tau its regulariser: the log-likelihood-ratio
               gap h / beta is regressed onto 1 / (2 tau) instead of pushed to
               infinity. beta only scales the reported implicit rewards.
               Default tau = 0.1 (TRL's default, where beta doubles as tau),
               i.e. a target gap of 5 nats.

Gradients (eps = 0): d loss / d log pi(y_w|x) = -beta sigma(-h) and
d loss / d log pi(y_l|x) = +beta sigma(-h); the reference log-probs are
constants (stop_gradient). As beta -> 0 the loss tends to log 2 and its
gradient to -(beta / 2) grad[log pi(y_w|x) - log pi(y_l|x)].

Sums over pairs with pair weights w (0 for padding pairs) follow the
`trainer.optimizer_step` convention: `dpo_sums` returns
(objective = sum_i w_i loss_i, sums incl. "weight" = sum_i w_i), so
microbatching and padded eval batches are exact. Metrics (sums; divided by
the weight they are per-pair means): loss, rewards_chosen = r(x, y_w),
rewards_rejected = r(x, y_l), reward_margin = h, accuracy (fraction of pairs
with h > 0 strictly; a tie, e.g. pi = pi_ref at step 0, counts 0 as in TRL),
logp_chosen, logp_rejected (log pi of the policy).

The partitioned trainer is `dpo_training.DPOTrainer`; the job is
`posttrain_jax.jobs.train_dpo`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

LOSS_TYPES = ("sigmoid", "ipo")
METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "accuracy",
           "logp_chosen", "logp_rejected")


def check_dpo_args(beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                   ipo_tau: float = 0.1) -> None:
  """Rejects beta <= 0, label_smoothing outside [0, 0.5), an unknown loss_type
  or ipo_tau <= 0, one clear error each."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"Unknown DPO loss_type {loss_type!r}; choose one of "
                     f"{list(LOSS_TYPES)}.")
  if not beta > 0.0:
    raise ValueError(f"DPO beta must be > 0 (the KL strength; 0.1 in the DPO paper), "
                     f"got {beta}.")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"DPO label_smoothing (cDPO's label-flip probability) must be in "
                     f"[0, 0.5), got {label_smoothing}; at 0.5 the loss no longer "
                     "prefers either response.")
  if not ipo_tau > 0.0:
    raise ValueError(f"ipo_tau (the IPO regulariser) must be > 0, got {ipo_tau}.")


def dpo_margin(logp_chosen: Array, logp_rejected: Array, ref_chosen: Array,
               ref_rejected: Array, beta: float) -> Array:
  """[b] h = beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))];
  the reference terms are stop-gradient."""
  ref = jax.lax.stop_gradient(ref_chosen.astype(jnp.float32)
                              - ref_rejected.astype(jnp.float32))
  return beta * (logp_chosen.astype(jnp.float32) - logp_rejected.astype(jnp.float32) - ref)


def dpo_losses(h: Array, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, ipo_tau: float = 0.1) -> Array:
  """Per-pair loss of the margin h (module docstring); arguments checked."""
  check_dpo_args(beta, label_smoothing, loss_type, ipo_tau)
  if loss_type == "ipo":
    return jnp.square(h / beta - 1.0 / (2.0 * ipo_tau))
  eps = label_smoothing
  return -(1.0 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)


def dpo_sums(logp_chosen: Array, logp_rejected: Array, ref_chosen: Array,
             ref_rejected: Array, weights: Array | None = None, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             ipo_tau: float = 0.1) -> tuple[Array, dict[str, Array]]:
  """(sum_i w_i loss_i, weighted sums of METRICS and "weight" = sum_i w_i).

  All inputs per pair [b]: the policy's and the reference's sequence log-probs
  of the chosen and rejected responses; weights default to 1.
  """
  shapes = {a.shape for a in (logp_chosen, logp_rejected, ref_chosen, ref_rejected)}
  if len(shapes) != 1:
    raise ValueError(f"DPO log-probs differ in shape: {sorted(shapes)}.")
  h = dpo_margin(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta)
  losses = dpo_losses(h, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                      ipo_tau=ipo_tau)
  w = jnp.ones_like(h) if weights is None else weights.astype(jnp.float32)
  sg = jax.lax.stop_gradient
  lp_w, lp_l = logp_chosen.astype(jnp.float32), logp_rejected.astype(jnp.float32)
  per_pair = {
      "loss": losses,
      "rewards_chosen": beta * (sg(lp_w) - sg(ref_chosen.astype(jnp.float32))),
      "rewards_rejected": beta * (sg(lp_l) - sg(ref_rejected.astype(jnp.float32))),
      "reward_margin": sg(h),
      "accuracy": (h > 0).astype(jnp.float32),
      "logp_chosen": sg(lp_w),
      "logp_rejected": sg(lp_l),
  }
  sums = {k: jnp.sum(w * v) for k, v in per_pair.items()}
  sums["weight"] = jnp.sum(w)
  return sums["loss"], sums
