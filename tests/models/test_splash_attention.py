"""attention_impl="splash": TPU splash attention (Pallas interpreter on CPU)
equals the reference path, with soft-cap, window, GQA and packing, sharded or not."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.models.attention import Attention
from test_attention import attn_params, rand, reference_attention, tiny_config  # pylint: disable=g-bad-import-order

LENGTH = 256  # two 128-position kernel blocks


def _inputs(packed, batch=2, seed=1):
  x = rand(seed, (batch, LENGTH, 16))
  pos = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (batch, LENGTH))
  if not packed:
    return x, pos, None
  seg = np.ones((batch, LENGTH), np.int32)
  seg[0, 100:200], seg[0, 200:] = 2, 3
  pos = pos.copy()
  pos[0] = np.concatenate([np.arange(100), np.arange(100), np.arange(56)])
  return x, pos, seg


def _fn(cfg, attention_type, pos, seg):
  module = Attention(cfg, attention_type)
  return lambda p, x: module.apply({"params": p}, x, pos, seg)


CASES = [  # (overrides, attention_type)
    (dict(), "global"),                            # GQA 4 / 2, soft-cap 50
    (dict(attn_logits_soft_cap=2.0), "local"),     # window 3, strong cap
    (dict(num_kv_heads=1, attn_logits_soft_cap=None), "global"),  # MQA, no cap
    (dict(num_kv_heads=4, sliding_window_size=5), "local"),       # MHA
]


@pytest.mark.parametrize("overrides, attention_type", CASES)
def test_splash_matches_reference_forward_and_grad(overrides, attention_type):
  ref_cfg = tiny_config(**{"attn_logits_soft_cap": 50.0, **overrides})
  splash_cfg = dataclasses.replace(ref_cfg, attention_impl="splash", splash_block_size=128)
  params = jax.tree.map(jnp.asarray, attn_params(ref_cfg, seed=3, scale=3.0))
  for packed in (False, True):
    x, pos, seg = _inputs(packed)
    ref_fn, splash_fn = (_fn(c, attention_type, pos, seg) for c in (ref_cfg, splash_cfg))
    out = np.asarray(jax.jit(splash_fn)(params, x))
    np.testing.assert_allclose(out, np.asarray(jax.jit(ref_fn)(params, x)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(  # and against the float64 numpy reference
        out, reference_attention(params, x, pos, seg, ref_cfg, attention_type),
        rtol=1e-4, atol=1e-5)
    cot = rand(7, out.shape)
    grad = lambda fn: jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * cot),
                                       argnums=(0, 1)))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 grad(splash_fn), grad(ref_fn))


def test_splash_sharded_over_batch_and_kv_heads_equals_unsharded():
  # 8 CPU devices: batch over data=4, the 2 kv heads over tensor=2; the kernel
  # runs per shard under shard_map.
  cfg = tiny_config(attention_impl="splash", splash_block_size=128, attn_logits_soft_cap=5.0)
  params = jax.tree.map(jnp.asarray, attn_params(cfg, seed=4, scale=3.0))
  x, pos, seg = _inputs(True, batch=4)
  seg = np.concatenate([seg[:1]] * 4)
  pos = np.concatenate([pos[:1]] * 4)
  fn = _fn(cfg, "global", pos, seg)
  want = np.asarray(jax.jit(fn)(params, x))
  mesh = partitioning.create_mesh({"data": 4, "tensor": 2})
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
    got = jax.jit(fn)(params, x)
    assert "shard_map" in str(jax.make_jaxpr(fn)(params, x))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(fn(p, x) ** 2)))(params)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  want_grads = jax.grad(lambda p: jnp.sum(fn(p, x) ** 2))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               grads, want_grads)


def test_splash_length_not_a_multiple_of_the_block_is_rejected():
  cfg = tiny_config(attention_impl="splash", splash_block_size=128)
  params = attn_params(cfg, seed=5)
  x = rand(1, (1, 192, 16))
  pos = np.arange(192, dtype=np.int32)[None]
  with pytest.raises(ValueError, match="multiple of ModelConfig.splash_block_size"):
    _fn(cfg, "global", pos, None)(params, x)
  for bad in (0, 100):
    with pytest.raises(ValueError, match="splash_block_size must be a positive multiple of 128"):
      tiny_config(splash_block_size=bad)
