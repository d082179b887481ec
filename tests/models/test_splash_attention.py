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


def test_splash_pads_a_length_that_is_not_a_multiple_of_the_block():
  # 192 = 1.5 blocks of 128 and the (1, 1) batch of the parameter init: padded
  # at the end to whole blocks (the TPU kernel's tiles are multiples of 128),
  # cut off again; the same values and gradients as the reference path.
  ref_cfg = tiny_config(attn_logits_soft_cap=5.0)
  splash_cfg = dataclasses.replace(ref_cfg, attention_impl="splash", splash_block_size=128)
  params = jax.tree.map(jnp.asarray, attn_params(ref_cfg, seed=5, scale=3.0))
  x = rand(1, (1, 192, 16))
  pos = np.arange(192, dtype=np.int32)[None]
  ref_fn, splash_fn = (_fn(c, "global", pos, None) for c in (ref_cfg, splash_cfg))
  np.testing.assert_allclose(np.asarray(jax.jit(splash_fn)(params, x)),
                             np.asarray(jax.jit(ref_fn)(params, x)), rtol=1e-5, atol=1e-5)
  grad = lambda fn: jax.jit(jax.grad(lambda p: jnp.sum(fn(p, x) ** 2)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               grad(_fn(splash_cfg, "local", pos, None)), grad(_fn(ref_cfg, "local", pos, None)))
  for bad in (0, 100):
    with pytest.raises(ValueError, match="splash_block_size must be a positive multiple of 128"):
      tiny_config(splash_block_size=bad)


def test_a_splash_trainer_builds():
  # Trainer construction traces the parameter init on a (1, 1) batch: one
  # padded block (it failed with "bkv_compute=1 must be a multiple of 128").
  from posttrain_jax.core.optimizer import OptimizerConfig  # pylint: disable=g-import-not-at-top
  from posttrain_jax.core.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from posttrain_jax.models import Transformer, presets  # pylint: disable=g-import-not-at-top
  cfg = presets.load_preset("tiny", attention_impl="splash", splash_block_size=128)
  schedule, tx = OptimizerConfig().build(10)
  trainer = Trainer(Transformer(cfg), tx, schedule, partitioning.create_mesh({"data": -1}))
  assert trainer.abstract_state.params["layer_0"]["attn"]["q"].shape == (128, 4, 32)
