"""Token-level language-modelling losses (pure functions).

All functions return *sums* over tokens together with the weight sum, so that a
caller can normalise once over a whole (accumulated) batch: the gradient of a
batch split into microbatches then equals the gradient of the full batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_sums(logits: Array, targets: Array, weights: Array,
                       z_loss: float = 0.0) -> dict[str, Array]:
  """Weighted next-token cross-entropy with optional z-loss.

  loss_t = logsumexp(z_t) - z_t[y_t] + z_loss * logsumexp(z_t)^2   (PaLM, Sec. 5)

  Args:
    logits: float [batch, length, vocab].
    targets: int [batch, length].
    weights: [batch, length]; 0 masks a position (padding, prompt tokens).
    z_loss: coefficient of the squared log-partition penalty.

  Returns:
    dict of scalars: "loss" = sum_t w_t * loss_t (what to differentiate),
    "cross_entropy" and "z_loss" (its two parts), "weight" = sum_t w_t, and
    "correct" = weighted count of argmax hits.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = (log_z - target_logit) * weights
  zl = z_loss * jnp.square(log_z) * weights
  correct = (jnp.argmax(logits, axis=-1) == targets) * weights
  return {
      "loss": jnp.sum(ce + zl),
      "cross_entropy": jnp.sum(ce),
      "z_loss": jnp.sum(zl),
      "weight": jnp.sum(weights),
      "correct": jnp.sum(correct),
  }
