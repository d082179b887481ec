"""Token-level distillation losses (ALGORITHMS.md §1(c), §4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax import distillation_losses as dl

KINDS = dl.KINDS
_STATIC = ("kind", "temperature", "beta")
_loss = jax.jit(dl.distillation_loss, static_argnames=_STATIC + ("temperature_squared_scale",))
_tok = jax.jit(dl.token_divergence, static_argnames=_STATIC)


def _logits(seed, shape=(2, 5, 11), scale=2.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


@jax.jit
def _all_divergences(s, t, w):
  """{(kind, temperature): per-token divergence [b, t]} for every kind, one compile."""
  out = {}
  for kind in KINDS:
    for temperature in (1.0, 0.7):
      per_tok = dl.token_divergence(s, t, kind=kind, temperature=temperature, beta=0.3)
      # CE minus the teacher entropy is its divergence part
      out[kind, temperature] = w * (per_tok["loss"] - per_tok.get("teacher_entropy", 0.0))
  return out


def test_zero_iff_equal():
  s, t = _logits(0), _logits(1)
  w = jnp.ones(s.shape[:2])
  # equal distributions (logits equal up to a per-position shift) -> 0
  shift = jax.random.normal(jax.random.PRNGKey(2), s.shape[:2] + (1,))
  for key, d in _all_divergences(s + shift, s, w).items():
    np.testing.assert_allclose(d, 0.0, atol=1e-5, err_msg=str(key))
  # different distributions -> > 0 at every position
  for key, d in _all_divergences(s, t, w).items():
    assert np.all(np.asarray(d) > 1e-4), key


def test_cross_entropy_parts_and_matches_forward_kl():
  s, t = _logits(3), _logits(4)
  w = jnp.ones(s.shape[:2]).at[0, 1].set(0.0)
  ce = _loss(s, t, w, kind="cross_entropy")
  fk = _loss(s, t, w, kind="forward_kl")
  np.testing.assert_allclose(ce["forward_kl"], fk["loss"], rtol=1e-5)
  np.testing.assert_allclose(ce["loss"], ce["forward_kl"] + ce["teacher_entropy"], rtol=1e-5)
  g_ce = jax.jit(jax.grad(lambda x: dl.distillation_loss(x, t, w, kind="cross_entropy")["loss"]))(s)
  g_fk = jax.jit(jax.grad(lambda x: dl.distillation_loss(x, t, w, kind="forward_kl")["loss"]))(s)
  np.testing.assert_allclose(g_ce, g_fk, atol=1e-6)


def test_reference_values_numpy():
  s, t = np.asarray(_logits(5, (1, 1, 7))), np.asarray(_logits(6, (1, 1, 7)))
  ps = np.exp(s - s.max(-1, keepdims=True)); ps /= ps.sum(-1, keepdims=True)
  pt = np.exp(t - t.max(-1, keepdims=True)); pt /= pt.sum(-1, keepdims=True)
  kl = lambda p, q: float(np.sum(p * np.log(p / q)))
  beta = 0.3
  m = beta * pt + (1 - beta) * ps
  expected = {
      "forward_kl": kl(pt, ps), "reverse_kl": kl(ps, pt),
      "jsd": beta * kl(pt, m) + (1 - beta) * kl(ps, m),
      "jeffreys": beta * kl(pt, ps) + (1 - beta) * kl(ps, pt),
      "cross_entropy": float(-np.sum(pt * np.log(ps))),
  }
  w = jnp.ones((1, 1))
  for kind, want in expected.items():
    got = _loss(jnp.asarray(s), jnp.asarray(t), w, kind=kind, beta=beta)["loss"]
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=kind)


def test_forward_kl_gradient_is_ps_minus_pt_times_weight():
  s, t = _logits(7), _logits(8)
  w = jax.random.uniform(jax.random.PRNGKey(9), s.shape[:2]).at[1, 2].set(0.0)
  g = jax.jit(jax.grad(lambda x: dl.distillation_loss(x, t, w)["loss"]))(s)
  want = (jax.nn.softmax(s) - jax.nn.softmax(t)) * w[..., None]
  np.testing.assert_allclose(g, want, atol=1e-6)


def test_temperature_and_t2_scale():
  s, t = _logits(10), _logits(11)
  w = jnp.ones(s.shape[:2])
  tau = 2.0
  a = _loss(s, t, w, temperature=tau)["loss"]
  b = _loss(s / tau, t / tau, w)["loss"]
  np.testing.assert_allclose(a, b, rtol=1e-5)
  c = _loss(s, t, w, temperature=tau, temperature_squared_scale=True)["loss"]
  np.testing.assert_allclose(c, tau ** 2 * a, rtol=1e-5)


def test_jsd_half_bounded_by_log2():
  w = jnp.ones((4, 8))
  for seed in range(3):
    s, t = _logits(20 + seed, (4, 8, 13), scale=5.0), _logits(30 + seed, (4, 8, 13), scale=5.0)
    d = _tok(s, t, kind="jsd", beta=0.5)["loss"]
    assert float(jnp.max(d)) <= math.log(2) + 1e-6
  # extreme: near one-hot on disjoint tokens approaches log 2 from below
  v = 6
  s = jnp.full((1, 1, v), -1e4).at[0, 0, 0].set(1e4)
  t = jnp.full((1, 1, v), -1e4).at[0, 0, 1].set(1e4)
  d, g = jax.jit(jax.value_and_grad(
      lambda x: dl.distillation_loss(x, t, jnp.ones((1, 1)), kind="jsd")["loss"]))(s)
  d = float(d)
  assert d <= math.log(2) + 1e-6
  np.testing.assert_allclose(d, math.log(2), rtol=1e-5)
  # finite gradient in the extreme case too
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kind", KINDS)
def test_no_gradient_reaches_teacher(kind):
  s, t = _logits(40), _logits(41)
  w = jnp.ones(s.shape[:2])
  g = jax.jit(jax.grad(lambda y: dl.distillation_loss(s, y, w, kind=kind)["loss"]))(t)
  assert np.all(np.asarray(g) == 0.0)
  g = jax.jit(jax.grad(
      lambda y: dl.chunked_distillation_loss(s, y, w, chunk_size=2, kind=kind)["loss"]))(t)
  assert np.all(np.asarray(g) == 0.0)


def test_masking_and_bf16_inputs():
  s, t = _logits(50), _logits(51)
  w = jnp.zeros(s.shape[:2]).at[0, :3].set(1.0)
  full = _loss(s, t, w)
  part = _loss(s[:1, :3], t[:1, :3], jnp.ones((1, 3)))
  np.testing.assert_allclose(full["loss"], part["loss"], rtol=1e-6)
  assert float(full["weight"]) == 3.0
  out = _loss(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), w)
  assert out["loss"].dtype == jnp.float32


def test_chunked_equals_unchunked():
  s, t = _logits(60, (2, 7, 9)), _logits(61, (2, 7, 9))
  w = jax.random.uniform(jax.random.PRNGKey(62), (2, 7))
  cases = [(k, 3) for k in KINDS] + [("forward_kl", c) for c in (1, 7, 8)]

  @jax.jit
  def run(x):
    out = {}
    for kind, chunk_size in cases:
      kw = dict(kind=kind, temperature=0.8, beta=0.4)
      ref_fn = lambda y, kw=kw: dl.distillation_loss(y, t, w, **kw)
      got_fn = lambda y, kw=kw, c=chunk_size: dl.chunked_distillation_loss(
          y, t, w, chunk_size=c, **kw)
      g_ref = jax.grad(lambda y, f=ref_fn: f(y)["loss"])(x)
      g = jax.grad(lambda y, f=got_fn: f(y)["loss"])(x)
      out[kind, chunk_size] = (ref_fn(x), g_ref, got_fn(x), g)
    return out

  for case, (ref, g_ref, got, g) in run(s).items():
    assert set(got) == set(ref), case
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=f"{case} {k}")
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6, err_msg=str(case))


def test_chunked_from_hidden_states_with_heads():
  d, v = 4, 10
  key = jax.random.split(jax.random.PRNGKey(70), 4)
  hs, ht = jax.random.normal(key[0], (2, 9, d)), jax.random.normal(key[1], (2, 9, d))
  es, et = jax.random.normal(key[2], (v, d)), jax.random.normal(key[3], (v, d))
  w = jnp.ones((2, 9)).at[1, 6:].set(0.0)
  head = lambda e: (lambda h: 30.0 * jnp.tanh(jnp.einsum("btd,vd->btv", h, e) / 30.0))

  def ref(es_, et_):
    return dl.distillation_loss(head(es_)(hs), head(et_)(ht), w)["loss"]

  def chunked(es_, et_):
    return dl.chunked_distillation_loss(hs, ht, w, chunk_size=4, student_head=head(es_),
                                        teacher_head=head(et_))["loss"]

  va, (ga_s, ga_t) = jax.jit(jax.value_and_grad(ref, (0, 1)))(es, et)
  vb, (gb_s, gb_t) = jax.jit(jax.value_and_grad(chunked, (0, 1)))(es, et)
  np.testing.assert_allclose(vb, va, rtol=1e-5)
  np.testing.assert_allclose(gb_s, ga_s, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(gb_t) == 0.0) and np.all(np.asarray(ga_t) == 0.0)


def test_bad_arguments():
  s = _logits(80)
  w = jnp.ones(s.shape[:2])
  with pytest.raises(ValueError):
    dl.distillation_loss(s, s, w, kind="kl")
  with pytest.raises(ValueError):
    dl.distillation_loss(s, s, w, kind="jsd", beta=1.0)
  with pytest.raises(ValueError):
    dl.distillation_loss(s, s, w, temperature=0.0)
  with pytest.raises(ValueError):
    dl.chunked_distillation_loss(s, s, w, chunk_size=0)
