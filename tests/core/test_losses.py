"""losses.chunked_cross_entropy_sums and the LM step's loss_chunk_size option."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.core.losses import chunked_cross_entropy_sums, cross_entropy_sums
from posttrain_jax.core.trainer import Trainer, lm_loss_sums, lm_objective
from posttrain_jax.models import ModelConfig, Transformer

KEYS = ("loss", "cross_entropy", "z_loss", "weight", "correct")


def small_config(**overrides):
  kwargs = dict(vocab_size=97, embed_dim=16, num_layers=2, num_heads=2,
                num_kv_heads=1, head_dim=8, mlp_dim=24, sliding_window_size=4,
                final_logit_soft_cap=5.0)
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def batch_for(cfg, batch=2, length=11, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
  weights = (rng.random((batch, length)) > 0.3).astype(np.float32)
  weights[:, 0] = 0.0  # a masked prompt position
  return {"decoder_input_tokens": jnp.asarray(tokens[:, :-1]),
          "decoder_target_tokens": jnp.asarray(tokens[:, 1:]),
          "decoder_loss_weights": jnp.asarray(weights)}


def init_params(cfg, seed=0):
  model = Transformer(cfg)
  return model, nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))
                         ["params"])


def assert_sums_close(got, want, rtol=1e-5, atol=1e-5):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


# ------------------------------------------------------------ the pure function


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 16])
def test_chunked_equals_plain_with_linear_head(chunk_size):
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.standard_normal((2, 11, 6)), jnp.float32)
  w_out = jnp.asarray(rng.standard_normal((6, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (2, 11)), jnp.int32)
  weights = jnp.asarray(rng.random((2, 11)) > 0.4, jnp.float32)
  head = lambda h, w: 10.0 * jnp.tanh(h @ w / 10.0)  # a soft-capped head

  def plain(h, w):
    return cross_entropy_sums(head(h, w), targets, weights, z_loss=1e-2)

  def chunked(h, w):
    return chunked_cross_entropy_sums(h, targets, weights, head=lambda x: head(x, w),
                                      chunk_size=chunk_size, z_loss=1e-2)

  assert_sums_close(chunked(hidden, w_out), plain(hidden, w_out))
  assert float(plain(hidden, w_out)["z_loss"]) > 0
  g_plain = jax.grad(lambda h, w: plain(h, w)["loss"], argnums=(0, 1))(hidden, w_out)
  g_chunk = jax.grad(lambda h, w: chunked(h, w)["loss"], argnums=(0, 1))(hidden, w_out)
  for a, b in zip(g_chunk, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Masked positions get exactly zero gradient w.r.t. their hidden state.
  masked = np.asarray(weights) == 0
  assert np.all(np.asarray(g_chunk[0])[masked] == 0)


def test_chunked_rejects_bad_chunk_size():
  with pytest.raises(ValueError, match="chunk_size must be >= 1"):
    chunked_cross_entropy_sums(jnp.zeros((1, 4, 2)), jnp.zeros((1, 4), jnp.int32),
                               jnp.ones((1, 4)), head=lambda h: h, chunk_size=0)


def test_chunked_never_builds_full_logits():
  # The jaxpr of the gradient holds no [batch, length, vocab] array: the
  # largest logits-shaped value is one chunk.
  b, t, d, v, c = 2, 64, 4, 1000, 8
  w = jnp.ones((d, v)) * 0.01
  targets = jnp.zeros((b, t), jnp.int32)
  weights = jnp.ones((b, t))
  fn = lambda h, w: chunked_cross_entropy_sums(
      h, targets, weights, head=lambda x: x @ w, chunk_size=c)["loss"]
  jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(jnp.ones((b, t, d)), w)

  def shapes(jp):
    for eqn in jp.eqns:
      for var in eqn.outvars:
        yield getattr(var.aval, "shape", ())
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else [param]):
          if hasattr(sub, "jaxpr"):
            yield from shapes(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            yield from shapes(sub)

  big = [s for s in shapes(jaxpr.jaxpr) if np.prod(s) >= b * t * v]
  assert not big, big
  chunk_logits = [s for s in shapes(jaxpr.jaxpr) if tuple(s) == (b, c, v)]
  assert chunk_logits  # the chunk body really forms [b, c, v] logits


# ------------------------------------------------------------- the model's step


@pytest.mark.parametrize("chunk_size,length", [(4, 11), (5, 10), (32, 11)])
def test_lm_loss_and_gradient_of_all_params_match(chunk_size, length):
  cfg = small_config()
  model, params = init_params(cfg)
  batch = batch_for(cfg, length=length)
  plain = lambda p: lm_objective(model, 1e-3)(p, batch)
  chunked = lambda p: lm_objective(model, 1e-3, chunk_size)(p, batch)
  (l_plain, s_plain), g_plain = jax.value_and_grad(plain, has_aux=True)(params)
  (l_chunk, s_chunk), g_chunk = jax.value_and_grad(chunked, has_aux=True)(params)
  np.testing.assert_allclose(l_chunk, l_plain, rtol=1e-5)
  assert_sums_close(s_chunk, s_plain)
  flat_plain = dict(jax.tree_util.tree_leaves_with_path(g_plain))
  for path, g in jax.tree_util.tree_leaves_with_path(g_chunk):
    np.testing.assert_allclose(g, flat_plain[path], rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The embedding gets gradient through both the input and the tied head.
  assert float(jnp.abs(g_chunk["embedder"]["embedding"]).sum()) > 0


def test_lm_loss_sums_with_segments_and_positions():
  cfg = small_config()
  model, params = init_params(cfg, seed=3)
  batch = batch_for(cfg, length=12, seed=3)
  batch["decoder_segment_ids"] = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
  batch["decoder_positions"] = jnp.asarray([list(range(5)) + list(range(7)),
                                            list(range(12))], jnp.int32)
  assert_sums_close(lm_loss_sums(model, params, batch, 0.0, 5),
                    lm_loss_sums(model, params, batch, 0.0))


def test_trainer_step_with_loss_chunk_size_matches_plain():
  cfg = small_config()
  mesh = partitioning.create_mesh({"data": 2}, devices=jax.devices()[:2])
  schedule = optax.constant_schedule(1e-2)
  tx = optax.adamw(schedule)
  batch = {k: np.asarray(v) for k, v in batch_for(cfg, batch=2, length=10).items()}
  results = []
  for chunk in (None, 3):
    trainer = Trainer(Transformer(cfg), tx, schedule, mesh, z_loss=1e-3,
                      loss_chunk_size=chunk)
    state = trainer.init_state(jax.random.key(0))
    state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p0, m0), (p1, m1) = results
  for k in ("loss", "z_loss", "accuracy", "grad_norm", "tokens"):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=k)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), p1, p0)


def test_trainer_rejects_bad_loss_chunk_size():
  cfg = small_config()
  with pytest.raises(ValueError, match="loss_chunk_size must be >= 1"):
    lm_objective(Transformer(cfg), 0.0, 0)
