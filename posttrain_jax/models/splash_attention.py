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

Lengths: the TPU kernel tiles queries and keys in blocks of a multiple of
128 (the lane width); a sequence whose length is not a multiple of the block
(e.g. the (1, 1) batch that traces the parameter init, or t = 192) is padded
at the end to one. Causal masking makes that exact: no real query sees a
padded key, and the padded query rows (their own segment) are cut off.

The kernel targets TPU when the mesh's devices are TPUs (also compile-only
TPU devices on a CPU host, aot/topology.py), else the default backend's;
off TPU it runs in the Pallas interpreter (`interpret=True`): same
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
LANES = 128  # the TPU kernel's block sizes are multiples of this


def _targets_tpu(mesh) -> bool:
  """Whether the program is for TPU: the mesh's devices (compile-only TPU
  devices too), else the default backend."""
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return (getattr(device, "platform", None) or jax.default_backend()) == "tpu"


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
  cap * tanh(q.k / cap). block_size: the kernel's query/key tile, clipped to t
  rounded up to 128; t is padded to a multiple of it. Returns [b, t, heads, d].
  """
  b, t, h, hd = q.shape
  k = key.shape[2]
  g = h // k
  block = min(block_size, -(-t // LANES) * LANES)
  padded = -(-t // block) * block
  mesh = jax.sharding.get_abstract_mesh()
  kernel = _kernel(padded, g, window, cap, block, interpret=not _targets_tpu(mesh))
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  if padded != t:  # at the end, in a segment of its own (see the module docstring)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t)) + ((0, 0),) * (x.ndim - 2))
    q, key, value = pad(q), pad(key), pad(value)
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - t)), constant_values=-1)
  dtype = q.dtype
  q = q.reshape(b, padded, k, g, hd).transpose(0, 2, 3, 1, 4)        # [b, k, g, t, d]
  key = key.astype(dtype).transpose(0, 2, 1, 3)                      # [b, k, t, d]
  value = value.astype(dtype).transpose(0, 2, 1, 3)

  def attend(q, key, value, segment_ids):  # one shard: [b', k', ...]
    def one(q, key, value, seg):  # [k', g, t, d], [k', t, d], [t]
      ids = kernels.SegmentIds(q=seg, kv=seg)
      return jax.vmap(lambda q, key, value: kernel(q, key, value, segment_ids=ids))(
          q, key, value)
    return jax.vmap(one)(q, key, value, segment_ids)

  if not mesh.empty:
    batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "kv_heads"))
    spec = jax.sharding.PartitionSpec
    attend = jax.shard_map(
        attend, mesh=mesh, check_vma=False,
        in_specs=(spec(batch_axes, head_axes), spec(batch_axes, head_axes),
                  spec(batch_axes, head_axes), spec(batch_axes)),
        out_specs=spec(batch_axes, head_axes))
  out = attend(q, key, value, segment_ids)                           # [b, k, g, t', d]
  return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)
