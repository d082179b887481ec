"""row_major_matmul: dense / dense_nt equal jnp.dot with autodiff, and their
backward passes compile without a transposed-left-operand dot on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlo_dots import lhs_transposed_dots  # pylint: disable=g-bad-import-order
from posttrain_jax.models import row_major_matmul as rm


def rand(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("m, n", [(4, 12), (12, 4), (8, 8)])
def test_transposed_product_equals_a_transpose_b(m, n):
  # Both branches: the narrower operand is the one transposed.
  a, b = rand(0, (32, m)), rand(1, (32, n))
  np.testing.assert_allclose(jax.jit(rm.transposed_product)(a, b), a.T @ b,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_in, d_out", [(6, 20), (20, 6)])
def test_dense_value_and_grads_equal_jnp_dot(d_in, d_out):
  x, w, cot = rand(2, (40, d_in)), rand(3, (d_in, d_out)), rand(4, (40, d_out))
  grad = lambda f: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) * cot),
                                              argnums=(0, 1)))(x, w)
  (v1, (dx1, dw1)), (v0, (dx0, dw0)) = grad(rm.dense), grad(jnp.dot)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-5)


def test_dense_nt_equals_dot_general_in_float32_and_keeps_dtypes():
  x, table, cot = rand(5, (40, 8)), rand(6, (30, 8)), rand(7, (40, 30))
  ref = lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
  grad = lambda f, x, w: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * cot),
                                          argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(rm.dense_nt(x, table), ref(x, table), rtol=1e-5)
  for a, b in zip(grad(rm.dense_nt, x, table), grad(ref, x, table)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # bf16 activations and table: float32 logits, gradients in the inputs' dtypes.
  xb, tb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(table, jnp.bfloat16)
  assert rm.dense_nt(xb, tb).dtype == jnp.float32
  dx, dw = grad(rm.dense_nt, xb, tb)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dw, np.float32), grad(ref, x, table)[1],
                             rtol=0.05, atol=0.05)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU dot forms")
@pytest.mark.parametrize("d_in, d_out", [(16, 64), (64, 16)])
def test_backward_has_no_transposed_lhs_dot_on_cpu(d_in, d_out):
  # The reason the module exists: autodiff of jnp.dot contracts x's token
  # dimension (a transposed-lhs dot); dense's backward does not.
  x, w = rand(8, (256, d_in)), rand(9, (d_in, d_out))
  hlo = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))),
                                   argnums=(0, 1))).lower(x, w).compile().as_text()
  assert lhs_transposed_dots(hlo(jnp.dot)), "the check itself finds autodiff's form"
  assert lhs_transposed_dots(hlo(rm.dense)) == []
