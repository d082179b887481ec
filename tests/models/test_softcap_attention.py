"""softcap_attention: the hand-written core equals the autodiff reference
(soft-cap, mask, softmax, values), forward and backward, at the edges of its
exponent range; its backward has no transposed-left-operand dot on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlo_dots import lhs_transposed_dots  # pylint: disable=g-bad-import-order
from posttrain_jax.models import softcap_attention as sa


def rand(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def reference(q, key, value, mask, cap):
  """softmax(where(mask, cap tanh(q k^T / cap), -inf)) v by plain jnp."""
  s = jnp.einsum("...rd,...sd->...rs", q, key)
  s = jnp.where(mask, cap * jnp.tanh(s / cap), -1e30)
  return jnp.einsum("...rs,...sd->...rd", jax.nn.softmax(s, axis=-1), value)


def inputs(scale, rows=12, keys=20, d=8):
  q = rand(1, (2, 3, rows, d), scale)
  key, value = rand(2, (2, 3, keys, d), scale), rand(3, (2, 3, keys, d))
  # causal-like mask with an offset, plus random holes; every row keeps a key
  mask = np.arange(keys)[None, :] <= np.arange(rows)[:, None] + (keys - rows)
  mask = mask[None, None] & (np.random.default_rng(4).random((2, 1, rows, keys)) > 0.3)
  mask[..., keys - rows] = True
  return q, key, value, jnp.asarray(mask)


def assert_matches_reference(q, key, value, mask, cap, rtol=1e-5, atol=1e-6):
  fast = jax.jit(lambda q, k, v: sa.softcap_attention(q, k, v, mask, cap))
  ref = jax.jit(lambda q, k, v: reference(q, k, v, mask, cap))
  np.testing.assert_allclose(fast(q, key, value), ref(q, key, value), rtol=rtol, atol=atol)
  cot = rand(5, q.shape)
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2)))(
      q, key, value)
  for name, a, b in zip("qkv", grads(fast), grads(ref)):
    np.testing.assert_allclose(a, b, rtol=10 * rtol, atol=10 * atol, err_msg=f"d{name}")


@pytest.mark.parametrize("cap", [5.0, 50.0, sa.MAX_CAP])
def test_matches_reference_forward_and_grads(cap):
  assert_matches_reference(*inputs(scale=2.0), cap)


@pytest.mark.parametrize("cap", [50.0, sa.MAX_CAP])
def test_scores_at_the_cap_stay_finite_and_exact(cap):
  # |q k| ~ 1e3 >> cap: every soft-capped score is within a hair of +-cap, the
  # ends of the range where exp(c - cap / 2) is largest and smallest.
  q, key, value, mask = inputs(scale=12.0)
  out = sa.softcap_attention(q, key, value, mask, cap)
  assert np.isfinite(np.asarray(out)).all()
  assert_matches_reference(q, key, value, mask, cap, rtol=1e-4, atol=1e-5)


def test_masked_keys_get_no_weight_and_no_gradient():
  q, key, value, mask = inputs(scale=1.0)
  mask = mask.at[..., 5].set(False)          # key 5 is seen by no row
  cot = rand(6, q.shape)
  loss = lambda v, k: jnp.sum(sa.softcap_attention(q, k, v, mask, 50.0) * cot)
  dv, dk = jax.grad(loss, argnums=(0, 1))(value, key)
  never = ~np.asarray(mask).any(axis=2, keepdims=True)   # keys no row sees
  never = np.broadcast_to(never.transpose(0, 1, 3, 2), dv.shape)
  assert never.any() and not never.all()
  assert np.all(np.asarray(dv)[never] == 0) and np.all(np.asarray(dk)[never] == 0)


def test_fully_masked_row_gives_zero_output_and_finite_gradients():
  q, key, value, mask = inputs(scale=1.0)
  mask = mask.at[0, :, 3, :].set(False)      # row 3 of batch 0 sees no key
  out = sa.softcap_attention(q, key, value, mask, 50.0)
  np.testing.assert_array_equal(np.asarray(out)[0, :, 3], 0.0)
  grads = jax.grad(lambda *a: jnp.sum(sa.softcap_attention(*a, mask, 50.0) ** 2),
                   argnums=(0, 1, 2))(q, key, value)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  np.testing.assert_array_equal(np.asarray(grads[0])[0, :, 3], 0.0)   # dq of that row


def test_bfloat16_close_to_float32_reference():
  q, key, value, mask = inputs(scale=2.0)
  b = lambda x: jnp.asarray(x, jnp.bfloat16)
  out = sa.softcap_attention(b(q), b(key), b(value), mask, 50.0)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, key, value, mask, 50.0),
                             rtol=0.05, atol=0.05)


def test_supported_caps_and_dtypes():
  assert sa.supported(50.0, jnp.float32) and sa.supported(30.0, jnp.bfloat16)
  assert not sa.supported(None, jnp.float32)
  assert not sa.supported(sa.MAX_CAP + 1, jnp.float32)   # exp range would underflow
  assert not sa.supported(50.0, jnp.float16)             # exp(25) overflows float16


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU dot forms")
def test_backward_has_no_transposed_lhs_dot_on_cpu():
  q, key, value, mask = inputs(scale=1.0, rows=64, keys=128, d=32)
  hlo = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))).lower(
      q, key, value).compile().as_text()
  assert lhs_transposed_dots(hlo(lambda q, k, v: reference(q, k, v, mask, 50.0)))
  assert lhs_transposed_dots(hlo(lambda q, k, v: sa.softcap_attention(q, k, v, mask, 50.0))) == []
