"""Gemma 2 attention: grouped-query, RoPE, logit soft-cap, local/global masks.

Order of operations (Gemma 2 report; HF `Gemma2Attention`):
  q <- q * query_scale;  s = q k^T;  s <- cap * tanh(s / cap);  mask;  softmax.
Local layers see keys with 0 <= q_index - k_index < sliding_window_size; packed
sequences never attend across segments. Without a cache, a local layer whose
window is under half the length computes only the in-window score blocks
(`local_block_attention`), the same result at 2 * window / length of the work.

`ModelConfig.attention_impl` picks the kernel for attention without a KV cache
(training, scoring): "xla" is the reference path below; "dot_product_attention"
calls `jax.nn.dot_product_attention` (causal flag, the window as
local_window_size = (window - 1, 0), segments as a boolean mask; cuDNN flash
attention with dpa_implementation="cudnn"), which has no logit soft-cap.
Decoding with a cache always takes the reference path.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.layers import apply_rope, soft_cap

Array = jax.Array

# Large finite negative: fully-masked rows stay finite (NaN-free) under softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_index: Array,
    k_index: Array,
    q_segment_ids: Array | None = None,
    k_segment_ids: Array | None = None,
    sliding_window_size: int | None = None,
) -> Array:
  """Boolean [batch, q_len, k_len] mask; True where attention is allowed.

  q_index: [batch, q_len] and k_index: [batch, k_len] are absolute token
  indices in the sequence (for a KV cache, the cache slots' indices). Allowed
  iff the key is not in the future, lies within the window when one is given,
  and belongs to the same segment when segment ids are given.
  """
  diff = q_index[:, :, None] - k_index[:, None, :]
  mask = diff >= 0
  if sliding_window_size is not None:
    mask &= diff < sliding_window_size
  if q_segment_ids is not None:
    mask &= q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
  return mask


def dot_product_attention(q: Array, key: Array, value: Array,
                          segment_ids: Array | None, window: int | None,
                          implementation: str | None = None) -> Array:
  """Causal (optionally windowed, packed) attention by jax.nn.dot_product_attention.

  q: [b, t, heads, d] already scaled by query_scale; key, value: [b, t,
  kv_heads, d] (grouped-query attention when kv_heads < heads). Same result as
  the reference path without soft-cap: keys with 0 <= q - k < window in the
  same segment. Returns [b, t, heads, d].
  """
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      q, key.astype(q.dtype), value.astype(q.dtype), mask=mask, scale=1.0,
      is_causal=True, local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)


def local_block_attention(q: Array, key: Array, value: Array,
                          segment_ids: Array | None, window: int,
                          cap: float | None) -> Array:
  """Sliding-window attention that only forms the scores inside the window.

  The reference path computes all [t, t] scores of a local layer and masks
  those outside the window. Here queries are cut into blocks of `window`
  positions; block n attends to key blocks n - 1 and n (the only keys within
  the window of any of its queries), so scores are [window, 2 * window] per
  block: 2 * window / t of the full work. Same result as the reference path
  (soft-cap, window, causality and segments applied to the same scores).

  q: [b, t, heads, d] already scaled; key, value: [b, t, kv_heads, d];
  returns [b, t, heads, d].
  """
  b, t, h, hd = q.shape
  k = key.shape[2]
  w = window
  nb = -(-t // w)
  pad = nb * w - t

  def blocks(x, fill=0):  # [b, t, ...] -> [b, nb, w, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape((b, nb, w) + x.shape[2:])

  def with_previous(x, fill=0):  # [b, nb, w, ...] -> [b, nb, 2w, ...]
    prev = jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2),
                   constant_values=fill)[:, :-1]
    return jnp.concatenate([prev, x], axis=2)

  qb = blocks(q).reshape(b, nb, w, k, h // k, hd)
  kb, vb = with_previous(blocks(key)), with_previous(blocks(value))
  scores = jnp.einsum("bnqkgd,bnskd->bnkgqs", qb, kb, preferred_element_type=jnp.float32)
  scores = soft_cap(scores, cap)
  # Query i of block n is position n*w + i; key j is position (n - 1)*w + j.
  i = jnp.arange(w)[:, None]
  j = jnp.arange(2 * w)[None, :]
  diff = w + i - j
  mask = (diff >= 0) & (diff < w)                                   # [w, 2w]
  first = jnp.arange(nb)[:, None, None] > 0
  mask = mask[None] & (first | (j >= w)[None])                      # [nb, w, 2w]
  mask = jnp.broadcast_to(mask, (b, nb, w, 2 * w))
  if segment_ids is not None:
    qs = blocks(segment_ids)
    ks = with_previous(qs, fill=-1)
    mask &= qs[:, :, :, None] == ks[:, :, None, :]
  scores = jnp.where(mask[:, :, None, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  out = jnp.einsum("bnkgqs,bnskd->bnqkgd", probs, vb.astype(q.dtype))
  return out.reshape(b, nb * w, h, hd)[:, :t]


@flax.struct.dataclass
class CacheInfo:
  """Where new tokens go in a KV cache, shared by every layer.

  index: scalar slot of the first new token (new tokens fill index..index+T-1).
  segment_ids: [batch, cache_len]; 0 marks slots that must never be attended
    (left padding of prompts), 1 marks real tokens. Unwritten future slots are
    excluded by causality.
  """

  index: Array
  segment_ids: Array


def init_kv_cache(batch: int, length: int, num_kv_heads: int, head_dim: int,
                  dtype) -> dict[str, Array]:
  """Zero key/value cache of one layer: [batch, kv_heads, length, head_dim].

  Head-major, so the per-step score and value contractions read the cache in
  place instead of transposing all of it every decode step.
  """
  shape = (batch, num_kv_heads, length, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class Attention(nn.Module):
  """Multi-head attention with grouped key/value heads.

  Without a cache it attends within the given tokens (training, scoring). With
  `cache` (init_kv_cache) and `cache_info` it writes the new keys/values at
  cache_info.index and attends over the whole cache (prefill when T > 1,
  decode when T == 1), returning (output, updated_cache).
  """

  config: ModelConfig
  attention_type: str  # "local" or "global"

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
               cache: dict[str, Array] | None = None,
               cache_info: CacheInfo | None = None):
    cfg = self.config
    dtype, pdtype = cfg.compute_dtype, cfg.weight_dtype
    d, h, k, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(name, shape, axes, in_axis, out_axis):
      init = nn.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        pdtype).astype(dtype)

    w_q = proj("q", (d, h, hd), ("embed", "heads", "kv"), 0, (1, 2))
    w_k = proj("k", (d, k, hd), ("embed", "kv_heads", "kv"), 0, (1, 2))
    w_v = proj("v", (d, k, hd), ("embed", "kv_heads", "kv"), 0, (1, 2))
    w_o = proj("o", (h, hd, d), ("heads", "kv", "embed"), (0, 1), 2)

    q = jnp.einsum("btd,dhk->bthk", x, w_q)
    key = jnp.einsum("btd,dhk->bthk", x, w_k)
    value = jnp.einsum("btd,dhk->bthk", x, w_v)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "kv"))
    value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "kv"))

    q = apply_rope(q, positions, cfg.rope_base)
    key = apply_rope(key, positions, cfg.rope_base)
    q = q * jnp.asarray(cfg.query_scale, dtype)

    batch, length = x.shape[:2]
    window = cfg.sliding_window_size if self.attention_type == "local" else None
    if cfg.attention_impl == "dot_product_attention" and cache is None:
      out = dot_product_attention(q, key, value, segment_ids, window,
                                  cfg.dpa_implementation)
      out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
      return jnp.einsum("bthk,hkd->btd", out, w_o)
    if window is not None and cache is None and 2 * window < length:
      out = local_block_attention(q, key, value, segment_ids, window,
                                  cfg.attn_logits_soft_cap)
      out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
      return jnp.einsum("bthk,hkd->btd", out, w_o)

    q_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    k_index, k_segment_ids, new_cache = q_index, segment_ids, None
    key = jnp.swapaxes(key, 1, 2)      # [b, kv_heads, t, d]
    value = jnp.swapaxes(value, 1, 2)
    if cache is not None:
      start = (0, 0, cache_info.index, 0)
      new_cache = {
          "k": jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), start),
          "v": jax.lax.dynamic_update_slice(cache["v"], value.astype(cache["v"].dtype), start),
      }
      new_cache = jax.tree.map(lambda c: nn.with_logical_constraint(
          c, ("batch", "kv_heads", "length", "kv")), new_cache)
      key, value = new_cache["k"].astype(dtype), new_cache["v"].astype(dtype)
      q_index = q_index + cache_info.index
      k_index = jnp.broadcast_to(jnp.arange(key.shape[2], dtype=jnp.int32),
                                 (batch, key.shape[2]))
      k_segment_ids = cache_info.segment_ids
      if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)

    groups = h // k
    q = q.reshape(batch, length, k, groups, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, key,
                        preferred_element_type=jnp.float32)
    scores = soft_cap(scores, cfg.attn_logits_soft_cap)

    mask = attention_mask(q_index, k_index, segment_ids, k_segment_ids, window)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)

    out = jnp.einsum("bkgts,bksd->btkgd", probs, value).reshape(batch, length, h, hd)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = jnp.einsum("bthk,hkd->btd", out, w_o)
    return out if cache is None else (out, new_cache)
