"""Building blocks: soft_cap, apply_rope, RMSNorm, Embedder, FeedForward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.models.layers import apply_rope as _apply_rope
from posttrain_jax.models.layers import (Embedder, FeedForward, RMSNorm,
                                         soft_cap)

# Jitted: eager op-by-op dispatch compiles every primitive separately (slow).
apply_rope = jax.jit(_apply_rope, static_argnums=2)


def rand(seed, shape, scale=1.0):
  """float32 normal noise from numpy (eager jax.random compiles per shape)."""
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(
      np.float32)


def init(module, *args, **kwargs):
  return jax.jit(lambda key: module.init(key, *args, **kwargs))(jax.random.key(0))

# ------------------------------------------------------------------ soft-cap


@pytest.mark.parametrize("cap", [30.0, 50.0])
def test_soft_cap_bounded_for_huge_inputs(cap):
  x = jnp.array([-1e6, -1e4, -3 * cap, -cap, 0.0, cap, 3 * cap, 1e4, 1e6],
                jnp.float32)
  y = np.asarray(soft_cap(x, cap))
  assert np.all(np.isfinite(y))
  # cap * tanh(x / cap) is strictly inside (-cap, cap) in exact arithmetic; in
  # float32 tanh saturates to exactly 1.0 for |x| >~ 9 cap, so the value can
  # reach +-cap but never exceed it.
  assert np.all(np.abs(y) <= cap)
  assert y[-1] == pytest.approx(cap) and y[0] == pytest.approx(-cap)
  # Strict bound where float32 can represent it.
  moderate = np.abs(np.asarray(x)) <= 3 * cap
  assert np.all(np.abs(y[moderate]) < cap)
  assert np.all(np.diff(y) >= 0)  # monotone
  np.testing.assert_allclose(y, -y[::-1])  # odd


@pytest.mark.parametrize("cap", [30.0, 50.0])
def test_soft_cap_is_near_identity_for_small_inputs(cap):
  x = jnp.linspace(-0.02 * cap, 0.02 * cap, 101, dtype=jnp.float32)
  x = x[x != 0]
  y = soft_cap(x, cap)
  rel = np.abs(np.asarray(y - x)) / np.abs(np.asarray(x))
  assert rel.max() < 1e-3


def test_soft_cap_none_is_identity():
  x = rand(0, (3, 5)) * 1e3
  assert soft_cap(x, None) is x


def test_soft_cap_matches_formula():
  x = jnp.array([-100.0, -7.0, 0.5, 42.0])
  np.testing.assert_allclose(soft_cap(x, 30.0), 30.0 * np.tanh(np.asarray(x) / 30.0),
                             rtol=1e-6)


# ------------------------------------------------------------------ RoPE


def _rope_scores(q, k, m, n, base=10_000.0):
  """q, k: [head_dim]; returns <rope(q, m), rope(k, n)>."""
  qr = apply_rope(q[None, None, None, :], jnp.array([[m]]), base)[0, 0, 0]
  kr = apply_rope(k[None, None, None, :], jnp.array([[n]]), base)[0, 0, 0]
  return float(jnp.dot(qr, kr))


def test_rope_position_zero_is_identity():
  x = rand(1, (2, 3, 4, 16))
  out = apply_rope(x, jnp.zeros((2, 3), jnp.int32), 10_000.0)
  np.testing.assert_allclose(out, x, rtol=0, atol=0)


def test_rope_preserves_norm_and_dtype():
  x = rand(2, (1, 6, 2, 8))
  pos = jnp.arange(6)[None] * 37
  out = apply_rope(x, pos, 10_000.0)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  assert apply_rope(x.astype(jnp.bfloat16), pos, 10_000.0).dtype == jnp.bfloat16


@pytest.mark.parametrize("shift", [3, 250])
def test_rope_scores_depend_only_on_relative_position(shift):
  q = rand(31, (16,))
  k = rand(32, (16,))
  for m, n in [(5, 2), (7, 7), (1, 9)]:
    base_score = _rope_scores(q, k, m, n)
    shifted = _rope_scores(q, k, m + shift, n + shift)
    assert shifted == pytest.approx(base_score, rel=1e-4, abs=1e-4)
  # ... and do depend on the offset (RoPE is not a no-op).
  assert abs(_rope_scores(q, k, 5, 2) - _rope_scores(q, k, 5, 4)) > 1e-3


def test_rope_half_split_convention():
  # Pair (x[i], x[i + half]) rotates by angle pos * base^(-2i / head_dim).
  head_dim, base, pos = 8, 100.0, 3
  x = np.zeros((1, 1, 1, head_dim), np.float32)
  x[..., 1] = 1.0  # unit vector in the first half, pair index 1
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.array([[pos]]), base))[0, 0, 0]
  theta = pos * base ** (-2 * 1 / head_dim)
  expected = np.zeros(head_dim)
  expected[1], expected[1 + head_dim // 2] = np.cos(theta), np.sin(theta)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_rope_uses_per_example_positions():
  x = rand(4, (2, 3, 1, 8))
  pos = jnp.array([[0, 1, 2], [5, 0, 1]])
  out = apply_rope(x, pos, 10_000.0)
  single = apply_rope(x[1:, 1:2], jnp.array([[0]]), 10_000.0)
  np.testing.assert_allclose(out[1, 1], single[0, 0], atol=0)
  np.testing.assert_allclose(out[0, 0], x[0, 0], atol=0)


# ------------------------------------------------------------------ RMSNorm


def test_rmsnorm_zero_scale_gives_unit_rms():
  x = rand(5, (2, 3, 32)) * 7.0 + 2.0
  norm = RMSNorm(eps=1e-6)
  params = init(norm, x)
  scale = nn.unbox(params)["params"]["scale"]
  assert scale.shape == (32,)
  np.testing.assert_array_equal(scale, 0.0)
  y = norm.apply(params, x)
  rms = jnp.sqrt(jnp.mean(y * y, axis=-1))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-5)


def test_rmsnorm_one_plus_w_scaling():
  x = rand(6, (4, 16))
  w = rand(7, (16,))
  norm = RMSNorm(eps=1e-6)
  y = norm.apply({"params": {"scale": w}}, x)
  xn = np.asarray(x, np.float64)
  ref = xn / np.sqrt(np.mean(xn ** 2, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y, ref * (1.0 + np.asarray(w)), rtol=1e-5, atol=1e-6)
  # w = -1 zeroes the output.
  y0 = norm.apply({"params": {"scale": -jnp.ones(16)}}, x)
  np.testing.assert_allclose(y0, 0.0, atol=0)


def test_rmsnorm_keeps_input_dtype_and_zero_input_is_finite():
  norm = RMSNorm()
  x = jnp.zeros((2, 8), jnp.bfloat16)
  params = init(norm, x)
  y = norm.apply(params, x)
  assert y.dtype == jnp.bfloat16
  assert np.all(np.asarray(y, np.float32) == 0.0)
  assert nn.unbox(params)["params"]["scale"].dtype == jnp.float32


# ------------------------------------------------------------------ Embedder


@pytest.mark.parametrize("embed_dim", [16, 24])
def test_embedder_encode_scales_by_sqrt_d(embed_dim):
  emb = Embedder(vocab_size=11, embed_dim=embed_dim)
  tokens = jnp.array([[0, 3, 10, 3]])
  params = init(emb, tokens, method=Embedder.encode)
  table = nn.unbox(params)["params"]["embedding"]
  assert table.shape == (11, embed_dim)
  out = emb.apply(params, tokens, method=Embedder.encode)
  np.testing.assert_allclose(out, table[tokens] * np.sqrt(embed_dim), rtol=1e-6)


def test_embedder_decode_is_tied_projection():
  emb = Embedder(vocab_size=7, embed_dim=8)
  params = init(emb, jnp.zeros((1, 1), jnp.int32),
                    method=Embedder.encode)
  table = nn.unbox(params)["params"]["embedding"]
  x = rand(2, (2, 3, 8))
  logits = emb.apply(params, x, method=Embedder.decode)
  assert logits.shape == (2, 3, 7) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.einsum("btd,vd->btv", x, table),
                             rtol=1e-5, atol=1e-6)


def test_embedder_bf16_compute_keeps_f32_table():
  emb = Embedder(vocab_size=7, embed_dim=8, dtype=jnp.bfloat16)
  tokens = jnp.array([[1, 2]])
  params = init(emb, tokens, method=Embedder.encode)
  assert nn.unbox(params)["params"]["embedding"].dtype == jnp.float32
  out = emb.apply(params, tokens, method=Embedder.encode)
  assert out.dtype == jnp.bfloat16
  logits = emb.apply(params, out, method=Embedder.decode)
  assert logits.dtype == jnp.float32


# ------------------------------------------------------------------ FeedForward


def test_feedforward_is_geglu_with_tanh_gelu():
  ff = FeedForward(embed_dim=8, mlp_dim=12)
  x = rand(8, (2, 3, 8))
  params = init(ff, x)
  p = nn.unbox(params)["params"]
  assert p["gate"].shape == (8, 12) and p["up"].shape == (8, 12)
  assert p["down"].shape == (12, 8)
  y = ff.apply(params, x)
  xn = np.asarray(x, np.float64)
  g = xn @ np.asarray(p["gate"], np.float64)
  gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
  ref = (gelu * (xn @ np.asarray(p["up"], np.float64))) @ np.asarray(p["down"],
                                                                      np.float64)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
