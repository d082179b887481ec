"""Token-level language-modelling losses (pure functions).

All functions return *sums* over tokens together with the weight sum, so that a
caller can normalise once over a whole (accumulated) batch: the gradient of a
batch split into microbatches then equals the gradient of the full batch.
`chunked_cross_entropy_sums` gives the same sums from hidden states without
ever materialising the [batch, length, vocab] logits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from posttrain_jax.core.argmax import argmax

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
  correct = (argmax(logits) == targets) * weights
  return {
      "loss": jnp.sum(ce + zl),
      "cross_entropy": jnp.sum(ce),
      "z_loss": jnp.sum(zl),
      "weight": jnp.sum(weights),
      "correct": jnp.sum(correct),
  }


def chunked_cross_entropy_sums(hidden: Array, targets: Array, weights: Array, *,
                               head: Callable[[Array], Array], chunk_size: int,
                               z_loss: float = 0.0) -> dict[str, Array]:
  """`cross_entropy_sums(head(hidden), ...)` without the [batch, length, vocab] logits.

  Same sums (up to float summation order), computed by a `lax.scan` over
  sequence chunks: only one [batch, chunk_size, vocab] float32 block of logits
  is live at a time, and the chunk body is wrapped in `jax.checkpoint`, so the
  backward pass recomputes each chunk's logits instead of storing them for the
  whole sequence (the memory saving of e.g. Wijmans et al. 2024, "Cut Your
  Losses in Large-Vocabulary Language Models", by the simpler chunking route).
  Gradients w.r.t. `hidden` and whatever `head` closes over are exact.

  Args:
    hidden: float [batch, length, d] final-normed hidden states.
    targets: int [batch, length].
    weights: [batch, length]; 0 masks a position.
    head: [batch, c, d] -> logits [batch, c, vocab], e.g.
      functools.partial(model.apply, {"params": p}, method="hidden_to_logits")
      (tied unembedding + final soft-cap). May close over parameters.
    chunk_size: positions per chunk; the length is zero-padded (weight 0) to a
      multiple of it.
    z_loss: as `cross_entropy_sums`.
  """
  return scan_chunk_sums(lambda h, y, w: cross_entropy_sums(head(h), y, w, z_loss),
                         (hidden, targets, weights.astype(jnp.float32)), chunk_size)


def scan_chunk_sums(sums_fn: Callable[..., dict[str, Array]], arrays, chunk_size: int
                    ) -> dict[str, Array]:
  """sum over sequence chunks c of sums_fn(*(x[:, c] for x in arrays)).

  The arrays are [batch, length, ...]; the length is zero-padded to a multiple
  of chunk_size (pass the loss weights among them: padding gets weight 0). A
  `lax.scan` runs one chunk at a time and `jax.checkpoint` makes the backward
  pass recompute each chunk, so only one chunk's intermediates (e.g. its
  [batch, chunk, vocab] logits) are ever live.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  batch, length = arrays[0].shape[:2]
  num_chunks = -(-length // chunk_size)
  pad = num_chunks * chunk_size - length

  def to_chunks(x):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((batch, num_chunks, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  xs = tuple(to_chunks(x) for x in arrays)
  one_chunk = jax.checkpoint(sums_fn)

  def body(carry, x):
    return jax.tree.map(jnp.add, carry, one_chunk(*x)), None

  init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                      jax.eval_shape(sums_fn, *(x[0] for x in xs)))
  out, _ = jax.lax.scan(body, init, xs)
  return out
