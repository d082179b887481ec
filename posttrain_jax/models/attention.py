"""Gemma 2 attention: grouped-query, RoPE, logit soft-cap, local/global masks.

Order of operations (Gemma 2 report; HF `Gemma2Attention`):
  q <- q * query_scale;  s = q k^T;  s <- cap * tanh(s / cap);  mask;  softmax.
Local layers see keys with 0 <= q_index - k_index < sliding_window_size; packed
sequences never attend across segments. Without a cache, a local layer whose
window is under half the length computes only the in-window score blocks
(`local_block_attention`), the same result at 2 * window / length of the work;
with `ModelConfig.causal_block_size`, a global layer computes only the causal
lower triangle of query/key blocks (`causal_block_attention`).

`ModelConfig.attention_impl` picks the kernel for attention without a KV cache
(training, scoring): "xla" is the reference path below; "splash" is TPU splash
attention with the soft-cap in the kernel (splash_attention.py); "dot_product_attention"
calls `jax.nn.dot_product_attention` (causal flag, the window as
local_window_size = (window - 1, 0), segments as a boolean mask; cuDNN flash
attention with dpa_implementation="cudnn"), which has no logit soft-cap.
A sampler's prefill into an empty cache (`CacheInfo.fresh`) takes the same
kernels as training; decoding attends over the whole cache by the reference path.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.models import lora as lora_lib
from posttrain_jax.models import softcap_attention
from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.layers import apply_rope, soft_cap, token_dense

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


def _grouped_rows(q: Array, num_kv_heads: int) -> Array:
  """[b, t, heads, d] -> [b, kv_heads, t * groups, d]: head-major, the query
  heads that share a key/value head stacked as extra rows (row r is position
  r // groups), so each score product is one large matmul per kv head."""
  b, t, h, hd = q.shape
  q = q.reshape(b, t, num_kv_heads, h // num_kv_heads, hd)
  return q.transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, t * (h // num_kv_heads), hd)


def _ungrouped_rows(out: Array, t: int) -> Array:
  """Inverse of _grouped_rows: [b, kv_heads, t * groups, d] -> [b, t, heads, d]."""
  b, k, rows, hd = out.shape
  out = out.reshape(b, k, t, rows // t, hd).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, t, k * (rows // t), hd)


def _masked_softmax(scores: Array, mask: Array, cap: float | None) -> Array:
  """softmax(where(mask, cap * tanh(scores / cap), MASK_VALUE)) over the keys."""
  scores = jnp.where(mask, soft_cap(scores, cap), MASK_VALUE)
  return jax.nn.softmax(scores, axis=-1)


def _attend(rows: Array, keys: Array, values: Array, mask: Array, cap: float | None,
            row_major_grads: bool) -> Array:
  """One block of the blocked kernels: rows [..., r, d], keys and values
  [..., s, d], mask broadcastable to [..., r, s]; returns [..., r, d].

  With row_major_grads (ModelConfig.gradient_layout) and a soft-cap it
  supports, the softcap_attention core (no row maximum, row-major key/value
  gradients); otherwise scores, the masked softmax and the value product by
  autodiff. Same result either way.
  """
  if row_major_grads and softcap_attention.supported(cap, rows.dtype):
    return softcap_attention.softcap_attention(rows, keys, values.astype(rows.dtype),
                                               mask, cap)
  scores = jnp.einsum("...rd,...sd->...rs", rows, keys, preferred_element_type=jnp.float32)
  probs = _masked_softmax(scores, mask, cap).astype(rows.dtype)
  return jnp.einsum("...rs,...sd->...rd", probs, values.astype(rows.dtype))


def local_block_attention(q: Array, key: Array, value: Array,
                          segment_ids: Array | None, window: int,
                          cap: float | None, row_major_grads: bool = False) -> Array:
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
  g, w = h // k, window
  nb = -(-t // w)
  pad = nb * w - t

  def blocks(x, fill=0):  # [b, t, ...] -> [b, nb, w, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape((b, nb, w) + x.shape[2:])

  def with_previous(x, axis, fill=0):  # block n -> blocks n - 1 and n along `axis`
    widths = [(0, 0)] * x.ndim
    widths[1] = (1, 0)
    prev = jnp.pad(x, widths, constant_values=fill)[:, :-1]
    return jnp.concatenate([prev, x], axis=axis)

  # [b, nb, k, w * g, d]: rows of block n are (position, group) pairs.
  qb = _grouped_rows(blocks(q).reshape(b * nb, w, h, hd), k).reshape(b, nb, k, w * g, hd)
  kv_blocks = lambda x: with_previous(blocks(x).transpose(0, 1, 3, 2, 4), axis=3)
  kb, vb = kv_blocks(key), kv_blocks(value)                        # [b, nb, k, 2w, d]
  # Row r of block n is position n*w + r // g; key j is position (n - 1)*w + j.
  i = (jnp.arange(w * g) // g)[:, None]
  j = jnp.arange(2 * w)[None, :]
  diff = w + i - j
  mask = (diff >= 0) & (diff < w)                                   # [w g, 2w]
  first = jnp.arange(nb)[:, None, None] > 0
  mask = jnp.broadcast_to(mask[None] & (first | (j >= w)[None]), (b, nb, w * g, 2 * w))
  if segment_ids is not None:
    qs = jnp.repeat(blocks(segment_ids), g, axis=2)                 # [b, nb, w g]
    ks = with_previous(blocks(segment_ids), axis=2, fill=-1)        # [b, nb, 2w]
    mask &= qs[:, :, :, None] == ks[:, :, None, :]
  out = _attend(qb, kb, vb, mask[:, :, None], cap, row_major_grads)  # [b, nb, k, w g, d]
  out = _ungrouped_rows(out.reshape(b * nb, k, w * g, hd), w)       # [b nb, w, h, d]
  return out.reshape(b, nb * w, h, hd)[:, :t]


def causal_block_attention(q: Array, key: Array, value: Array,
                           segment_ids: Array | None, block: int,
                           cap: float | None, row_major_grads: bool = False) -> Array:
  """Causal attention that skips the score blocks above the diagonal.

  Queries are cut into nb = ceil(t / block) blocks; block n (positions
  [n * block, (n + 1) * block)) can only see keys [0, (n + 1) * block), so its
  scores are [block, (n + 1) * block] instead of [block, t]: (nb + 1) / (2 nb)
  of the full score, soft-cap, mask and softmax work, forward and backward.
  Same result as the reference path (soft-cap, causality and segments applied
  to the same scores, softmax over the same keys; the skipped keys would have
  been masked). The blocks have different shapes, so the loop is unrolled.

  q: [b, t, heads, d] already scaled; key, value: [b, t, kv_heads, d];
  returns [b, t, heads, d].
  """
  b, t, h, hd = q.shape
  k = key.shape[2]
  g = h // k
  rows = _grouped_rows(q, k)                                        # [b, k, t g, d]
  key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [b, k, t, d]
  outs = []
  for start in range(0, t, block):
    stop = min(start + block, t)
    position = np.arange(start * g, stop * g) // g                  # of each row (static)
    mask = jnp.arange(stop)[None, :] <= position[:, None]           # [rows, keys]
    mask = jnp.broadcast_to(mask, (b, (stop - start) * g, stop))
    if segment_ids is not None:
      mask &= segment_ids[:, position, None] == segment_ids[:, None, :stop]
    outs.append(_attend(rows[:, :, start * g:stop * g], key[:, :, :stop], value[:, :, :stop],
                        mask[:, None], cap, row_major_grads))
  return _ungrouped_rows(jnp.concatenate(outs, axis=2), t)


def reference_attention(q: Array, keys: Array, values: Array, q_index: Array,
                        k_index: Array, q_segment_ids: Array | None,
                        k_segment_ids: Array | None, window: int | None,
                        cap: float | None) -> Array:
  """Attention over all given keys with the full mask: the reference path.

  q: [b, t, heads, d] already scaled; keys [b, kv_heads, d, s] and values [b,
  kv_heads, s, d] (the KV cache layout); q_index [t] and k_index [s] are the
  tokens' slots. The query heads that share a kv head are stacked as rows
  (_grouped_rows), so each kv head's scores and outputs are one [t g, d] x [d,
  s] and one [t g, s] x [s, d] matmul. (The "btkgd,bksd->bkgts" einsum form
  made XLA:CPU compute a decode step's value product as a transposed [s, d]^T x
  [s, g] dot, 40% of the step: issue 26.) Returns [b, t, heads, d].
  """
  b, t = q.shape[:2]
  k = keys.shape[1]
  groups = q.shape[2] // k
  rows = _grouped_rows(q, k)                                        # [b, k, t g, d]
  scores = jnp.einsum("bkrd,bkds->bkrs", rows, keys, preferred_element_type=jnp.float32)
  mask = attention_mask(jnp.broadcast_to(q_index, (b, t)),
                        jnp.broadcast_to(k_index, (b, k_index.shape[0])),
                        q_segment_ids, k_segment_ids, window)       # [b, t, s]
  mask = jnp.repeat(mask, groups, axis=1)                           # [b, t g, s]
  probs = _masked_softmax(scores, mask[:, None], cap).astype(q.dtype)
  return _ungrouped_rows(jnp.einsum("bkrs,bksd->bkrd", probs, values), t)


@flax.struct.dataclass
class CacheInfo:
  """Where new tokens go in a KV cache, shared by every layer.

  index: scalar slot of the first new token (new tokens fill index..index+T-1).
  segment_ids: [batch, cache_len]; 0 marks slots that must never be attended
    (left padding of prompts), 1 marks real tokens. Unwritten future slots are
    excluded by causality.
  fresh: (static) the cache holds nothing before these tokens and index is 0,
    as in a sampler's prefill: the tokens then attend among themselves by the
    same kernels as training (blocked local and causal paths), not over the
    whole cache.
  """

  index: Array
  segment_ids: Array
  fresh: bool = flax.struct.field(pytree_node=False, default=False)


def init_kv_cache(batch: int, length: int, num_kv_heads: int, head_dim: int,
                  dtype) -> dict[str, Array]:
  """Zero key/value cache of one layer: keys [batch, kv_heads, head_dim,
  length], values [batch, kv_heads, length, head_dim].

  Head-major, so a decode step's score and value products read the cache in
  place: scores are [t g, d] x [d, s] and outputs [t g, s] x [s, d], plain
  row-major matmuls per kv head. (Keys stored [s, d] made XLA:CPU transpose
  every kv head's keys each step: 2.2x slower score products, issue 26.)
  """
  return {"k": jnp.zeros((batch, num_kv_heads, head_dim, length), dtype),
          "v": jnp.zeros((batch, num_kv_heads, length, head_dim), dtype)}


def to_cache_layout(key: Array, value: Array) -> tuple[Array, Array]:
  """[b, t, kv_heads, d] keys/values -> keys [b, kv_heads, d, t], values [b,
  kv_heads, t, d]: the KV cache's layout, which reference_attention reads."""
  return jnp.transpose(key, (0, 2, 3, 1)), jnp.swapaxes(value, 1, 2)


def write_cache(cache: dict[str, Array], key: Array, value: Array,
                info: CacheInfo) -> dict[str, Array]:
  """Writes keys/values [b, t, kv_heads, d] of positions index..index+t-1.

  A cache with fewer slots than info.segment_ids (a local layer's ring buffer,
  gemma2.init_cache) keeps position p in slot p mod slots: one token at a time
  (decoding), or a fresh prefill, whose last `slots` tokens are kept.
  """
  key, value = to_cache_layout(key, value)
  key, value = key.astype(cache["k"].dtype), value.astype(cache["v"].dtype)
  slots, t = cache["k"].shape[-1], key.shape[-1]
  index = info.index
  if slots < info.segment_ids.shape[1]:  # ring buffer
    if t > 1 and not info.fresh:
      raise ValueError(
          f"A local layer's ring-buffer cache ({slots} slots) takes one new token per "
          f"call or a fresh prefill (CacheInfo(fresh=True)), got {t} tokens at a traced "
          "index; decode one token at a time.")
    if t > slots:  # fresh prefill: keep the last `slots`, position p in slot p % slots
      shift = (t - slots) % slots
      key = jnp.roll(key[..., t - slots:], shift, axis=3)
      value = jnp.roll(value[:, :, t - slots:], shift, axis=2)
    index = index % slots
  return {
      "k": nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(cache["k"], key, (0, 0, 0, index)),
          ("batch", "kv_heads", "kv", "length")),
      "v": nn.with_logical_constraint(
          jax.lax.dynamic_update_slice(cache["v"], value, (0, 0, index, 0)),
          ("batch", "kv_heads", "length", "kv")),
  }


def cache_positions(slots: int, info: CacheInfo, length: int) -> tuple[Array, Array]:
  """(position of the token in each cache slot [slots], its segment id [b, slots])
  after writing `length` tokens at info.index. In a ring buffer slot j holds the
  latest position p <= index + length - 1 with p = j mod slots; a slot not
  written yet gets segment -1 (never attended)."""
  if slots == info.segment_ids.shape[1]:
    return jnp.arange(slots, dtype=jnp.int32), info.segment_ids
  last = info.index + length - 1
  j = jnp.arange(slots, dtype=jnp.int32)
  positions = last - jnp.mod(last - j, slots)
  segments = jnp.take(info.segment_ids, jnp.maximum(positions, 0), axis=1)
  return positions, jnp.where(positions >= 0, segments, -1)


class Attention(nn.Module):
  """Multi-head attention with grouped key/value heads.

  Without a cache it attends within the given tokens (training, scoring). With
  `cache` (init_kv_cache) and `cache_info` it writes the new keys/values at
  cache_info.index (write_cache) and attends over the cache's slots (a local
  layer's ring buffer holds its window), or, for a fresh prefill, among the new
  tokens; it returns (output, updated_cache).
  """

  config: ModelConfig
  attention_type: str  # "local" or "global"
  lora: lora_lib.LoraConfig | None = None  # adapters used where present (models/lora.py)

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

    row_major = cfg.row_major_gradients
    adapted = lambda y, name, h, in_dims=1: lora_lib.apply_delta(y, lora_lib.delta(
        self, name, h, in_dims, self.lora, dtype, row_major))
    q = adapted(token_dense(x, w_q, row_major_grads=row_major), "q", x)
    key = adapted(token_dense(x, w_k, row_major_grads=row_major), "k", x)
    value = adapted(token_dense(x, w_v, row_major_grads=row_major), "v", x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "kv"))
    value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "kv"))

    q = apply_rope(q, positions, cfg.rope_base)
    key = apply_rope(key, positions, cfg.rope_base)
    q = q * jnp.asarray(cfg.query_scale, dtype)

    batch, length = x.shape[:2]
    window = cfg.sliding_window_size if self.attention_type == "local" else None
    new_cache = None
    if cache is not None:
      new_cache = write_cache(cache, key, value, cache_info)
    if cache is None or cache_info.fresh:
      if cache is not None:  # prefill into an empty cache: attend among the new tokens
        segment_ids = cache_info.segment_ids[:, :length]
        # as decoding would read them back: rounded to the cache's dtype
        key = key.astype(cache["k"].dtype).astype(dtype)
        value = value.astype(cache["v"].dtype).astype(dtype)
      out = self._kernel_attention(q, key, value, segment_ids, window, length)
      if out is None:
        q_index = jnp.arange(length, dtype=jnp.int32)
        out = reference_attention(q, *to_cache_layout(key, value), q_index, q_index,
                                  segment_ids, segment_ids, window,
                                  cfg.attn_logits_soft_cap)
    else:
      # A local layer's ring buffer holds its window only (gemma2.init_cache);
      # slicing the window out of a full-length cache instead made XLA:CPU copy
      # both cache tensors every step (issue 26).
      q_index = cache_info.index + jnp.arange(length, dtype=jnp.int32)
      k_index, k_segment_ids = cache_positions(new_cache["k"].shape[-1], cache_info, length)
      if segment_ids is None:
        segment_ids = jnp.ones((batch, length), jnp.int32)
      out = reference_attention(
          q, new_cache["k"].astype(dtype), new_cache["v"].astype(dtype), q_index,
          k_index, segment_ids, k_segment_ids, window, cfg.attn_logits_soft_cap)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    out = adapted(token_dense(out, w_o, in_dims=2, row_major_grads=row_major), "o", out, 2)
    return out if cache is None else (out, new_cache)

  def _kernel_attention(self, q, key, value, segment_ids, window, length):
    """[b, t, heads, d] by the configured kernel or a blocked path, or None
    for the reference path (no KV cache here)."""
    cfg = self.config
    if cfg.attention_impl == "splash":
      from posttrain_jax.models.splash_attention import splash_attention  # pylint: disable=import-outside-toplevel
      return splash_attention(q, key, value, segment_ids, window,
                              cfg.attn_logits_soft_cap, cfg.splash_block_size)
    if cfg.attention_impl == "dot_product_attention":
      return dot_product_attention(q, key, value, segment_ids, window,
                                   cfg.dpa_implementation)
    if window is not None and 2 * window < length:
      return local_block_attention(q, key, value, segment_ids, window,
                                   cfg.attn_logits_soft_cap, cfg.row_major_gradients)
    if window is None and cfg.causal_block_size and cfg.causal_block_size < length:
      return causal_block_attention(q, key, value, segment_ids, cfg.causal_block_size,
                                    cfg.attn_logits_soft_cap, cfg.row_major_gradients)
    return None
