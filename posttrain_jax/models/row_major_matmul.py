"""Matmuls whose backward pass has no transposed-left-operand product (XLA:CPU).

XLA:CPU sends a dot to its fast YNNPACK kernels when the left operand is
contracted along its last dimension: [m, k] x [k, n] or [m, k] x [n, k]. A
weight gradient dW = x^T dy contracts the left operand x [tokens, in] along its
first (token) dimension, and XLA then runs Eigen's kernel instead. On a 2-core
AMD EPYC (Zen 4), for 4096 tokens (issue 26, docs/performance.md):

  dW shape      x^T dy as XLA writes it    here
  [512, 128]    106 GFLOP/s                165 GFLOP/s
  [2048, 128]    95 GFLOP/s (tied logits)  171 GFLOP/s

The gradients here are written as row-major products: the narrower of the two
operands is transposed once (a small copy, behind `optimization_barrier` so
that XLA does not fold the transpose back into the dot), and the product is
formed with its wider dimension last, then transposed if needed:

  x^T dy  = (x^T) @ dy                   when in <= out
          = ((dy^T) @ x)^T               when in > out

The same results as autodiff of `jnp.dot` (equal up to float summation
order). On TPU and GPU the transposes would only cost memory traffic, so the
model uses these functions on the CPU backend only (ModelConfig.gradient_layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _barrier(x: Array) -> Array:
  return jax.lax.optimization_barrier(x)


def transposed_product(a: Array, b: Array) -> Array:
  """a^T b for a [tokens, m] and b [tokens, n]: [m, n], by a row-major product.

  The narrower operand is transposed (materialized), so the product is
  [m, tokens] x [tokens, n] when m <= n and ([n, tokens] x [tokens, m])^T
  otherwise: the wide dimension is the product's last, which YNNPACK runs fastest.
  """
  if a.shape[1] > b.shape[1]:
    return _barrier(jnp.dot(_barrier(b.T), a)).T
  return jnp.dot(_barrier(a.T), b)


@jax.custom_vjp
def dense(x: Array, w: Array) -> Array:
  """x @ w for x [tokens, in] and w [in, out], with row-major gradients:

  dx = dy w^T (an [tokens, out] x [in, out] product), dw = transposed_product(x, dy).
  """
  return jnp.dot(x, w)


def _dense_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _dense_bwd(residuals, dy):
  x, w = residuals
  dx = jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())))
  return dx.astype(x.dtype), transposed_product(x, dy).astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def dense_nt(x: Array, w: Array) -> Array:
  """x @ w^T in float32 for x [tokens, d] and w [n, d] (the tied output
  projection: w is the embedding table), with row-major gradients:

  dx = dy w (cast to x's dtype), dw = transposed_product(dy, x).
  """
  return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _dense_nt_fwd(x, w):
  return dense_nt(x, w), (x, w)


def _dense_nt_bwd(residuals, dy):
  x, w = residuals
  dx = jnp.dot(dy, w.astype(dy.dtype))
  dw = transposed_product(dy, x.astype(dy.dtype))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense_nt.defvjp(_dense_nt_fwd, _dense_nt_bwd)
