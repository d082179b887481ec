"""Building blocks of the Gemma 2 decoder: RMSNorm, embedder, GeGLU MLP, RoPE, soft-cap.

Every parameter carries logical axis names ("vocab", "embed", "mlp", "norm");
the partitioning rules map them to mesh axes outside the model.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain_jax.models import lora as lora_lib
from posttrain_jax.models import row_major_matmul

Array = jax.Array


def token_dense(x: Array, w: Array, in_dims: int = 1, row_major_grads: bool = False) -> Array:
  """Contracts x's last `in_dims` dims with w's first `in_dims` dims.

  The same as the einsum "btd,dhk->bthk" (in_dims=1) or "bthk,hkd->btd"
  (in_dims=2), computed as one 2-D matmul over the flattened token dims, so
  the weight gradient is one [in, tokens] x [tokens, out] matmul. XLA:CPU runs
  the 3-D einsum form, whose weight gradient contracts batch and length
  together, 1.5-1.8x slower (docs/performance.md); on TPU/GPU the reshapes are
  free. row_major_grads: that weight gradient as a row-major product
  (row_major_matmul.dense; ModelConfig.gradient_layout).
  """
  lead, k = x.shape[:x.ndim - in_dims], math.prod(w.shape[:in_dims])
  matmul = row_major_matmul.dense if row_major_grads else jnp.dot
  y = matmul(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(lead + w.shape[in_dims:])


def soft_cap(x: Array, cap: float | None) -> Array:
  """Gemma 2 soft-capping: cap * tanh(x / cap); identity when cap is None.

  Bounded in (-cap, cap) and ~x for |x| << cap (Gemma 2 report, Sec. 2).
  """
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def apply_rope(x: Array, positions: Array, base: float) -> Array:
  """Rotary position embedding, half-split (rotate_half) convention.

  x: [batch, length, heads, head_dim]; positions: [batch, length].
  Frequencies base^(-2i/head_dim) for i < head_dim/2 rotate the pairs
  (x[..., i], x[..., i + head_dim/2]). Computed in float32.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(0, half, dtype=jnp.float32) * 2 / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  # x * [cos, cos] + rotate_half(x) * [-sin, sin]: two whole-width products
  # instead of four half-width ones and a concatenation (same values).
  sin = jnp.concatenate([-sin, sin], axis=-1)
  cos = jnp.concatenate([cos, cos], axis=-1)
  xf = x.astype(jnp.float32)
  out = xf * cos + jnp.concatenate([xf[..., half:], xf[..., :half]], axis=-1) * sin
  return out.astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a (1 + w) scale, w initialised to zero; computed in float32."""

  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
  """Token embedding shared by the input lookup and the output projection."""

  vocab_size: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  row_major_grads: bool = False  # decode's table gradient: row_major_matmul.dense_nt

  def setup(self):
    init = nn.initializers.normal(stddev=self.embed_dim ** -0.5)
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
        (self.vocab_size, self.embed_dim), self.param_dtype)

  def encode(self, tokens: Array) -> Array:
    """Look up tokens and scale by sqrt(embed_dim) (factor cast to the compute dtype)."""
    # FSDP-style: gather the table's embed dim first; the vocab-sharded lookup
    # then partitions as a masked local gather plus an all-reduce.
    table = nn.with_logical_constraint(self.embedding, ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    return x * jnp.asarray(self.embed_dim ** 0.5, self.dtype)

  def decode(self, x: Array) -> Array:
    """Tied output projection to float32 vocabulary logits."""
    x2d, table = x.reshape(-1, x.shape[-1]), self.embedding.astype(self.dtype)
    if self.row_major_grads:
      logits = row_major_matmul.dense_nt(x2d, table)
    else:
      logits = jax.lax.dot_general(  # [tokens, d] x [vocab, d]^T, see token_dense
          x2d, table, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return logits.reshape(x.shape[:-1] + (self.vocab_size,))


class FeedForward(nn.Module):
  """GeGLU MLP: down(gelu_tanh(x W_gate) * (x W_up))."""

  embed_dim: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  row_major_grads: bool = False  # token_dense's weight gradients
  lora: lora_lib.LoraConfig | None = None  # adapters used where present (models/lora.py)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    w_gate = self.param("gate", nn.with_logical_partitioning(init, ("embed", "mlp")),
                        (self.embed_dim, self.mlp_dim), self.param_dtype)
    w_up = self.param("up", nn.with_logical_partitioning(init, ("embed", "mlp")),
                      (self.embed_dim, self.mlp_dim), self.param_dtype)
    w_down = self.param("down", nn.with_logical_partitioning(init, ("mlp", "embed")),
                        (self.mlp_dim, self.embed_dim), self.param_dtype)
    dense = lambda h, w, name: lora_lib.apply_delta(
        token_dense(h, w.astype(self.dtype), row_major_grads=self.row_major_grads),
        lora_lib.delta(self, name, h, 1, self.lora, self.dtype, self.row_major_grads))
    gate, up = dense(x, w_gate, "gate"), dense(x, w_up, "up")
    h = jax.nn.gelu(gate, approximate=True) * up
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(h, w_down, "down")
