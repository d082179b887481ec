"""TPU splash attention (Pallas) for Gemma 2: soft-cap, sliding window, GQA, packing.

`ModelConfig.attention_impl = "splash"` routes attention without a KV cache
(training, scoring) through jax's splash attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`), the block-sparse flash
attention kernel MaxText uses on TPU. Unlike `jax.nn.dot_product_attention` it
applies Gemma 2's logit soft-cap inside the kernel, and its masks are block
sparse: a local layer's `LocalMask` skips every key block outside the window
and a global layer's `CausalMask` every block above the diagonal (not computed
and then masked away).

Grouped-query attention: the kernel's multi-query form takes one key/value
head and the query heads that share it; it is mapped over the key/value heads
and the batch. Packed sequences go in as the kernel's segment ids.

Off TPU the kernel runs in the Pallas interpreter (`interpret=True`): same
numerics, slow, for tests (tests/models/test_splash_attention.py checks it
against the reference path, forward and gradients). Under a mesh the call is
wrapped in `shard_map` over the batch and key/value-head axes given by the
logical axis rules, since a Pallas kernel is not partitioned automatically.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
import jax.numpy as jnp

Array = jax.Array


def _kernel(length: int, groups: int, window: int | None, cap: float | None,
            block: int, interpret: bool):
  if window is None:
    mask = masks.CausalMask((length, length))
  else:  # keys with 0 <= q - k < window: window - 1 to the left, none to the right
    mask = masks.LocalMask((length, length), (window - 1, 0), 0)
  sizes = kernels.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  return kernels.make_splash_mqa(
      masks.MultiHeadMask([mask] * groups), block_sizes=sizes,
      attn_logits_soft_cap=cap, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: Array, key: Array, value: Array, segment_ids: Array | None,
                     window: int | None, cap: float | None, block_size: int) -> Array:
  """Causal (optionally windowed, packed, soft-capped) attention by splash attention.

  q: [b, t, heads, d] already scaled by query_scale; key, value: [b, t,
  kv_heads, d]. Same result as the reference path: keys with 0 <= q - k <
  window (any k <= q when window is None) in the same segment, scores
  cap * tanh(q.k / cap). block_size: the kernel's query/key tile, clipped to t;
  t must be a multiple of it. Returns [b, t, heads, d].
  """
  b, t, h, hd = q.shape
  k = key.shape[2]
  g = h // k
  block = min(block_size, t)
  if t % block:
    raise ValueError(f"splash attention needs the sequence length ({t}) to be a "
                     f"multiple of ModelConfig.splash_block_size ({block}); pad the "
                     "sequences or choose a divisor.")
  kernel = _kernel(t, g, window, cap, block, interpret=jax.default_backend() != "tpu")
  dtype = q.dtype
  q = q.reshape(b, t, k, g, hd).transpose(0, 2, 3, 1, 4)             # [b, k, g, t, d]
  key = key.astype(dtype).transpose(0, 2, 1, 3)                      # [b, k, t, d]
  value = value.astype(dtype).transpose(0, 2, 1, 3)
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)

  def attend(q, key, value, segment_ids):  # one shard: [b', k', ...]
    def one(q, key, value, seg):  # [k', g, t, d], [k', t, d], [t]
      ids = kernels.SegmentIds(q=seg, kv=seg)
      return jax.vmap(lambda q, key, value: kernel(q, key, value, segment_ids=ids))(
          q, key, value)
    return jax.vmap(one)(q, key, value, segment_ids)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "kv_heads"))
    spec = jax.sharding.PartitionSpec
    attend = jax.shard_map(
        attend, mesh=mesh, check_vma=False,
        in_specs=(spec(batch_axes, head_axes), spec(batch_axes, head_axes),
                  spec(batch_axes, head_axes), spec(batch_axes)),
        out_specs=spec(batch_axes, head_axes))
  out = attend(q, key, value, segment_ids)                           # [b, k, g, t, d]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
