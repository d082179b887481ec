"""Soft-capped attention core with a hand-written backward pass (XLA:CPU).

For one block of query rows q [..., r, d] against keys and values [..., s, d]
with a boolean mask [..., r, s] (Gemma 2 report; the reference path of
attention.py):

  c = cap * tanh(q k^T / cap),   e = mask * exp(c - cap / 2),
  l = sum_s e,                   out = (e v) / l.

This is softmax(where(mask, c, -inf)) v. Because |c| < cap, exp needs no
row maximum: with cap <= MAX_CAP, every exp(c - cap / 2) lies in
[exp(-1.5 cap), exp(0.5 cap)], inside float32's normal range, and a row sum
of any realistic length cannot overflow. That saves the max-reduction pass,
and the normalisation is applied to the [r, d] output, not to the [r, s]
probabilities.

Backward (P = e / l, dO the output cotangent, D = rowsum(dO * out)):

  dP = dO v^T,   dS = P * (dP - D) * (1 - tanh^2),
  dq = dS k,     dk = dS^T q,   dv = P^T dO.

dk and dv contract the row dimension of dS and P. Written as such, XLA:CPU
runs them as transposed-left-operand dots in Eigen, 2.9x slower than its
YNNPACK kernels at these shapes ([128, 512] x [128, 32] per head: 32 against
93 GFLOP/s on a 2-core AMD EPYC; issue 26). Here they are computed transposed,
dk^T = q^T dS and dv^T = (dO / l)^T e, with the small [r, d] operand
transposed once behind an `optimization_barrier` (so XLA does not fold the
transpose back into the dot), and the [d, s] results transposed back.

A fully masked row has l = 0 and gets output 0 (the reference softmax over
all-masked scores gives the mean of the values); the kernels of attention.py
never produce such rows, since a query always sees itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# Largest soft-cap whose exp(c - cap / 2) range, [exp(-1.5 cap), exp(0.5 cap)],
# stays normal in float32 (smallest normal ~exp(-87.3)).
MAX_CAP = 56.0


def supported(cap: float | None, dtype) -> bool:
  """Whether softcap_attention applies: a soft-cap within MAX_CAP, and a
  compute dtype with float32's exponent range (float32 or bfloat16)."""
  return (cap is not None and 0 < cap <= MAX_CAP
          and jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)))


def _transposed(x: Array) -> Array:
  """x with its last two dims swapped, materialized (not folded into a dot)."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _forward(q, key, value, mask, cap):
  scores = jnp.einsum("...rd,...sd->...rs", q, key, preferred_element_type=jnp.float32)
  t = jnp.tanh(scores / cap)
  e = jnp.where(mask, jnp.exp(cap * t - cap / 2), 0.0)
  l = jnp.sum(e, axis=-1, keepdims=True)
  inv = jnp.where(l > 0, 1.0 / l, 0.0)
  out = jnp.einsum("...rs,...sd->...rd", e.astype(value.dtype), value,
                   preferred_element_type=jnp.float32) * inv
  return out.astype(q.dtype), (t, e, inv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softcap_attention(q: Array, key: Array, value: Array, mask: Array, cap: float) -> Array:
  """softmax over s of where(mask, cap * tanh(q k^T / cap), -inf), times v.

  q [..., r, d] (already scaled), key and value [..., s, d], mask a boolean
  array broadcastable to [..., r, s]; returns [..., r, d] in q's dtype. Needs
  supported(cap, q.dtype).
  """
  return _forward(q, key, value, mask, cap)[0]


def _fwd(q, key, value, mask, cap):
  out, (t, e, inv) = _forward(q, key, value, mask, cap)
  return out, (q, key, value, out, t, e, inv)


def _bwd(cap, residuals, dout):
  q, key, value, out, t, e, inv = residuals
  dout = dout.astype(jnp.float32)
  dout_l = dout * inv                                              # dO / l
  dp = jnp.einsum("...rd,...sd->...rs", dout_l.astype(value.dtype), value,
                  preferred_element_type=jnp.float32)            # dP * l
  dsum = jnp.sum(dout * out, axis=-1, keepdims=True) * inv        # D / l
  ds = e * (dp - dsum) * (1.0 - t * t)                            # = P (dP - D)(1 - t^2)
  ds_c = ds.astype(q.dtype)
  dq = jnp.einsum("...rs,...sd->...rd", ds_c, key, preferred_element_type=jnp.float32)
  dk_t = jnp.einsum("...dr,...rs->...ds", _transposed(q), ds_c,
                    preferred_element_type=jnp.float32)
  dv_t = jnp.einsum("...dr,...rs->...ds", _transposed(dout_l.astype(value.dtype)),
                    e.astype(value.dtype), preferred_element_type=jnp.float32)
  dk = jnp.swapaxes(jax.lax.optimization_barrier(dk_t), -1, -2)
  dv = jnp.swapaxes(jax.lax.optimization_barrier(dv_t), -1, -2)
  return dq.astype(q.dtype), dk.astype(key.dtype), dv.astype(value.dtype), None


softcap_attention.defvjp(_fwd, _bwd)
