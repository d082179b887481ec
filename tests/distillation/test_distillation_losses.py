"""Token-level distillation losses (forward / reverse KL and generalized JSD of
Tiapkin et al. 2025, arXiv 2502.02671; Gemma 2's cross-entropy to the teacher,
Gemma Team 2024, arXiv 2408.00118)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.distillation import losses as dl

KINDS = dl.KINDS
_STATIC = ("kind", "temperature", "beta")
_loss = jax.jit(dl.distillation_loss, static_argnames=_STATIC + ("temperature_squared_scale",))
_tok = jax.jit(dl.token_divergence, static_argnames=_STATIC)


def _logits(seed, shape=(2, 5, 11), scale=2.0):
  """Random test logits (numpy: no per-shape eager compiles)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


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
  shift = _logits(2, s.shape[:2] + (1,), scale=1.0)
  for key, d in _all_divergences(s + shift, s, w).items():
    np.testing.assert_allclose(d, 0.0, atol=1e-5, err_msg=str(key))
  # different distributions -> > 0 at every position
  for key, d in _all_divergences(s, t, w).items():
    assert np.all(np.asarray(d) > 1e-4), key


def test_cross_entropy_parts_and_matches_forward_kl():
  s, t = _logits(3), _logits(4)
  w = np.ones(s.shape[:2], np.float32)
  w[0, 1] = 0.0
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
  w = np.random.default_rng(9).uniform(size=s.shape[:2]).astype(np.float32)
  w[1, 2] = 0.0
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
  s, t = np.full((1, 1, v), -1e4, np.float32), np.full((1, 1, v), -1e4, np.float32)
  s[0, 0, 0] = t[0, 0, 1] = 1e4
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
  w = np.zeros(s.shape[:2], np.float32)
  w[0, :3] = 1.0
  full = _loss(s, t, w)
  part = _loss(s[:1, :3], t[:1, :3], jnp.ones((1, 3)))
  np.testing.assert_allclose(full["loss"], part["loss"], rtol=1e-6)
  assert float(full["weight"]) == 3.0
  out = _loss(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), w)
  assert out["loss"].dtype == jnp.float32


def test_chunked_equals_unchunked():
  s, t = _logits(60, (2, 7, 9)), _logits(61, (2, 7, 9))
  w = np.random.default_rng(62).uniform(size=(2, 7)).astype(np.float32)
  cases = [(k, 3) for k in KINDS] + [("forward_kl", c) for c in (1, 8)]

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
  hs, ht = _logits(70, (2, 9, d), 1.0), _logits(71, (2, 9, d), 1.0)
  es, et = _logits(72, (v, d), 1.0), _logits(73, (v, d), 1.0)
  w = np.ones((2, 9), np.float32)
  w[1, 6:] = 0.0
  head = lambda e: (lambda h: 30.0 * jnp.tanh(jnp.einsum("btd,vd->btv", h, e) / 30.0))

  def ref(es_, et_):
    return dl.distillation_loss(head(es_)(hs), head(et_)(ht), w)["loss"]

  def chunked(es_, et_):
    return dl.chunked_distillation_loss(hs, ht, w, chunk_size=4, student_head=head(es_),
                                        teacher_head=head(et_))["loss"]

  both = jax.jit(lambda *e: (jax.value_and_grad(ref, (0, 1))(*e),
                              jax.value_and_grad(chunked, (0, 1))(*e)))
  (va, (ga_s, ga_t)), (vb, (gb_s, gb_t)) = both(es, et)
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


def test_gemma2_head_on_hidden_states_reproduces_model_logits():
  """The head of the module docstring applied to `return_hidden` states gives the logits."""
  from posttrain_jax.models import layers
  from posttrain_jax.models import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top

  cfg = ModelConfig(vocab_size=48, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8, mlp_dim=32, sliding_window_size=4)
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(90).integers(0, cfg.vocab_size, (2, 6)))
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
  rng = np.random.default_rng(0)
  params_s, params_t = (jax.tree.map(
      lambda x: jnp.asarray((0.5 if x.ndim > 1 else 0.1) * rng.standard_normal(x.shape),
                            x.dtype), shapes) for _ in range(2))

  def head_for(params):
    emb = params["embedder"]["embedding"]
    return lambda h: layers.soft_cap(
        jnp.einsum("btd,vd->btv", h, emb.astype(cfg.compute_dtype),
                   preferred_element_type=jnp.float32), cfg.final_logit_soft_cap)

  @jax.jit
  def run(ps, pt):
    ls, hs = model.apply({"params": ps}, tokens, return_hidden=True)
    lt, ht = model.apply({"params": pt}, tokens, return_hidden=True)
    w = jnp.ones(tokens.shape)
    return (ls, head_for(ps)(hs), dl.distillation_loss(ls, lt, w)["loss"],
            dl.chunked_distillation_loss(hs, ht, w, chunk_size=4, student_head=head_for(ps),
                                         teacher_head=head_for(pt))["loss"])

  logits, from_hidden, ref, chunked = run(params_s, params_t)
  np.testing.assert_allclose(from_hidden, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(chunked, ref, rtol=1e-5)
