"""attention_mask and the Attention module (GQA, RoPE, query scale, soft-cap, masks)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.models.attention import Attention, attention_mask
from posttrain_jax.models.config import ModelConfig


def rand(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(
      np.float32)


def tiny_config(**overrides):
  kwargs = dict(vocab_size=32, embed_dim=16, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, mlp_dim=24, sliding_window_size=3)
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def mask_np(q_index, k_index, q_seg=None, k_seg=None, window=None):
  args = [jnp.asarray(q_index), jnp.asarray(k_index)]
  args += [None if q_seg is None else jnp.asarray(q_seg),
           None if k_seg is None else jnp.asarray(k_seg)]
  return np.asarray(attention_mask(*args, sliding_window_size=window))


# ------------------------------------------------------------------ attention_mask


def test_mask_without_window_is_causal():
  idx = np.arange(7)[None]
  m = mask_np(idx, idx)
  assert m.shape == (1, 7, 7) and m.dtype == np.bool_
  np.testing.assert_array_equal(m[0], np.tril(np.ones((7, 7), bool)))


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8])
def test_mask_sliding_window_exact_boundary(window):
  length = 12
  idx = np.arange(length)[None]
  m = mask_np(idx, idx, window=window)[0]
  diff = np.arange(length)[:, None] - np.arange(length)[None, :]
  np.testing.assert_array_equal(m, (diff >= 0) & (diff < window))
  for q in range(window, length):
    assert m[q, q - (window - 1)]  # distance window - 1: allowed
    assert not m[q, q - window]    # distance window: masked
  assert m.sum(axis=1).tolist() == [min(i + 1, window) for i in range(length)]


def test_mask_gemma2_window_4096_boundary_with_absolute_indices():
  # Absolute indices (as with a KV cache): no need for a 4k x 4k mask.
  q = np.array([[4095, 4096, 5000]])
  k = np.array([[0, 1, 904, 905, 4095, 4096, 5000, 5001]])
  m = mask_np(q, k, window=4096)[0]
  expected = [
      [1, 1, 1, 1, 1, 0, 0, 0],  # q 4095: key 0 at distance 4095 -> allowed
      [0, 1, 1, 1, 1, 1, 0, 0],  # q 4096: key 0 at distance 4096 -> masked
      [0, 0, 0, 1, 1, 1, 1, 0],  # q 5000: key 904 at 4096 masked, 905 allowed
  ]
  np.testing.assert_array_equal(m, np.array(expected, bool))
  np.testing.assert_array_equal(mask_np(q, k)[0], q[0][:, None] >= k[0][None, :])


def test_mask_packed_segments_never_cross():
  seg = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0]])
  idx = np.arange(seg.shape[1])[None]
  for window in (None, 2, 100):
    m = mask_np(idx, idx, seg, seg, window=window)[0]
    same = seg[0][:, None] == seg[0][None, :]
    assert not np.any(m & ~same)
    diff = idx[0][:, None] - idx[0][None, :]
    allowed = same & (diff >= 0)
    if window is not None:
      allowed &= diff < window
    np.testing.assert_array_equal(m, allowed)
    assert np.all(np.diag(m))  # every token sees itself (no empty rows)


def test_mask_is_per_example():
  seg = np.array([[1, 1, 2, 2], [1, 1, 1, 1]])
  idx = np.broadcast_to(np.arange(4), (2, 4))
  m = mask_np(idx, idx, seg, seg)
  assert not m[0, 2, 1] and m[1, 2, 1]


# ------------------------------------------------------------------ reference attention


def rope_np(x, positions, base):
  half = x.shape[-1] // 2
  freq = base ** (-np.arange(half) * 2.0 / x.shape[-1])
  ang = positions[..., None, None].astype(np.float64) * freq  # [b, t, 1, half]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def reference_attention(p, x, positions, segment_ids, cfg, attention_type):
  """Straightforward float64 numpy Gemma 2 attention (HF repeat_kv layout)."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  groups = cfg.num_heads // cfg.num_kv_heads
  q = rope_np(np.einsum("btd,dhk->bthk", x, p["q"]), positions, cfg.rope_base)
  k = rope_np(np.einsum("btd,dhk->bthk", x, p["k"]), positions, cfg.rope_base)
  v = np.einsum("btd,dhk->bthk", x, p["v"])
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  s = np.einsum("bthk,bshk->bhts", q * cfg.query_scale, k)
  if cfg.attn_logits_soft_cap is not None:
    s = cfg.attn_logits_soft_cap * np.tanh(s / cfg.attn_logits_soft_cap)
  t = x.shape[1]
  diff = np.arange(t)[:, None] - np.arange(t)[None, :]
  allowed = np.broadcast_to(diff >= 0, (x.shape[0], t, t)).copy()
  if attention_type == "local":
    allowed &= diff < cfg.sliding_window_size
  if segment_ids is not None:
    allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
  s = np.where(allowed[:, None], s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshk->bthk", w, v)
  return np.einsum("bthk,hkd->btd", out, p["o"])


def attn_params(cfg, seed=0, scale=1.0):
  d, h, k, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  return {
      "q": rand(seed, (d, h, hd), scale * d ** -0.5),
      "k": rand(seed + 1, (d, k, hd), scale * d ** -0.5),
      "v": rand(seed + 2, (d, k, hd), d ** -0.5),
      "o": rand(seed + 3, (h, hd, d), (h * hd) ** -0.5),
  }


def run_attention(cfg, attention_type, params, x, positions=None, segment_ids=None):
  b, t = x.shape[:2]
  if positions is None:
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  module = Attention(cfg, attention_type)
  fn = jax.jit(lambda p, x, pos, seg: module.apply({"params": p}, x, pos, seg))
  return np.asarray(fn(params, x, positions, segment_ids))


CASES = [
    # (overrides, attention_type)
    (dict(), "global"),
    (dict(), "local"),
    (dict(num_kv_heads=4), "local"),                           # MHA
    (dict(num_kv_heads=1), "global"),                          # MQA
    (dict(query_scaling="embed_over_heads", head_dim=6), "global"),  # d/h=4
    (dict(query_pre_attn_scalar=7.0, attn_logits_soft_cap=None), "local"),
]


@pytest.mark.parametrize("overrides, attention_type", CASES)
def test_attention_matches_reference(overrides, attention_type):
  cfg = tiny_config(**overrides)
  # Large-ish q/k weights so the logit soft-cap (50) is active for some scores.
  params = attn_params(cfg, seed=10, scale=6.0)
  x = rand(1, (2, 7, cfg.embed_dim))
  seg = np.array([[1, 1, 1, 1, 2, 2, 2], [1] * 7], np.int32)
  pos = np.array([[0, 1, 2, 3, 0, 1, 2], list(range(7))], np.int32)
  out = run_attention(cfg, attention_type, params, x, pos, seg)
  ref = reference_attention(params, x, pos, seg, cfg, attention_type)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  # Unpacked call path too.
  pos = np.broadcast_to(np.arange(7, dtype=np.int32), (2, 7))
  out = run_attention(cfg, attention_type, params, x, pos, None)
  ref = reference_attention(params, x, pos, None, cfg, attention_type)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_soft_cap_is_active_in_reference_case():
  # Guards the test above: the soft-cap must change the result there.
  cfg = tiny_config()
  params = attn_params(cfg, seed=10, scale=6.0)
  x = rand(1, (2, 7, cfg.embed_dim))
  pos = np.broadcast_to(np.arange(7), (2, 7))
  capped = reference_attention(params, x, pos, None, cfg, "global")
  uncapped = reference_attention(params, x, pos, None,
                                 dataclasses.replace(cfg, attn_logits_soft_cap=None),
                                 "global")
  assert np.abs(capped - uncapped).max() > 1e-3


def test_attention_param_shapes_gqa_vs_mha():
  x = jnp.zeros((1, 3, 16))
  pos = jnp.zeros((1, 3), jnp.int32)
  for kv in (4, 2, 1):
    cfg = tiny_config(num_kv_heads=kv, head_dim=12)
    shapes = jax.eval_shape(Attention(cfg, "global").init, jax.random.key(0), x,
                            pos, None)
    p = nn.unbox(shapes)["params"]
    assert p["q"].shape == (16, 4, 12)
    assert p["k"].shape == p["v"].shape == (16, kv, 12)
    assert p["o"].shape == (4, 12, 16)
    out = jax.eval_shape(Attention(cfg, "global").apply, shapes, x, pos, None)
    assert out.shape == (1, 3, 16)


def test_gqa_equals_mha_with_repeated_kv_weights():
  gqa = tiny_config(num_heads=6, num_kv_heads=2)
  mha = dataclasses.replace(gqa, num_kv_heads=6)
  p = attn_params(gqa, seed=3, scale=3.0)
  p_mha = dict(p, k=np.repeat(p["k"], 3, axis=1), v=np.repeat(p["v"], 3, axis=1))
  x = rand(4, (2, 6, gqa.embed_dim))
  for attention_type in ("local", "global"):
    np.testing.assert_allclose(run_attention(gqa, attention_type, p, x),
                               run_attention(mha, attention_type, p_mha, x),
                               rtol=1e-5, atol=1e-6)


def test_query_scaling_modes_differ_only_by_query_scale():
  # d / h = 16 / 4 = 4 while head_dim = 8: the two modes give different scales,
  # and "embed_over_heads" equals "head_dim" with q weights scaled by sqrt(8/4).
  cfg_hd = tiny_config(head_dim=8)
  cfg_eh = dataclasses.replace(cfg_hd, query_scaling="embed_over_heads")
  assert cfg_hd.query_scale != pytest.approx(cfg_eh.query_scale)
  p = attn_params(cfg_hd, seed=5, scale=4.0)
  x = rand(6, (1, 5, 16))
  out_eh = run_attention(cfg_eh, "global", p, x)
  out_hd = run_attention(cfg_hd, "global", p, x)
  out_hd_rescaled = run_attention(cfg_hd, "global", dict(p, q=p["q"] * np.sqrt(2.0)), x)
  np.testing.assert_allclose(out_eh, out_hd_rescaled, rtol=1e-5, atol=1e-6)
  assert np.abs(out_eh - out_hd).max() > 1e-4
  # Explicit query_pre_attn_scalar = 4 reproduces "embed_over_heads" here.
  cfg_override = dataclasses.replace(cfg_hd, query_pre_attn_scalar=4.0)
  np.testing.assert_allclose(run_attention(cfg_override, "global", p, x), out_eh,
                             rtol=1e-6, atol=1e-7)


def test_local_attention_ignores_keys_outside_window():
  cfg = tiny_config(sliding_window_size=3)
  p = attn_params(cfg, seed=7)
  x = rand(8, (1, 8, 16))
  x2 = x.copy()
  x2[0, 2] += 5.0  # token 2: distance 3 from query 5, 2 from query 4
  for attention_type, unchanged in (("local", [0, 1, 5, 6, 7]), ("global", [0, 1])):
    a = run_attention(cfg, attention_type, p, x)
    b = run_attention(cfg, attention_type, p, x2)
    np.testing.assert_allclose(a[0, unchanged], b[0, unchanged], atol=1e-6)
    changed = sorted(set(range(8)) - set(unchanged))
    assert np.all(np.abs(a[0, changed] - b[0, changed]).max(-1) > 1e-5)


def test_attention_bf16_output_dtype():
  cfg = tiny_config(dtype="bfloat16")
  p = attn_params(cfg, seed=9)
  x = rand(1, (1, 4, 16)).astype(jnp.bfloat16)
  out = run_attention(cfg, "local", p, x)
  assert out.dtype == jnp.bfloat16
  ref = run_attention(dataclasses.replace(cfg, dtype="float32"), "local", p,
                      np.asarray(x, np.float32))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------ attention_impl


def _attn_fn(cfg, attention_type, pos, seg):
  module = Attention(cfg, attention_type)
  return lambda p, x: module.apply({"params": p}, x, pos, seg)


def _packed_inputs(cfg, packed, length=9, seed=1):
  x = rand(seed, (2, length, cfg.embed_dim))
  if not packed:
    return x, np.broadcast_to(np.arange(length, dtype=np.int32), (2, length)), None
  seg = np.array([[1] * 4 + [2] * 3 + [3] * 2, [1] * length], np.int32)
  pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 1], list(range(length))], np.int32)
  return x, pos, seg


DPA_CASES = [
    # (overrides, attention_type, dpa_implementation)
    (dict(), "global", None),                 # GQA 4 heads / 2 kv heads, causal
    (dict(), "local", None),                  # sliding window 3
    (dict(num_kv_heads=4), "local", "xla"),   # MHA
    (dict(num_kv_heads=1), "global", "xla"),  # MQA
    (dict(sliding_window_size=1), "local", None),  # window 1: only itself
]


@pytest.mark.parametrize("overrides, attention_type, impl", DPA_CASES)
def test_dot_product_attention_matches_reference_forward_and_grad(overrides,
                                                                  attention_type,
                                                                  impl):
  ref_cfg = tiny_config(attn_logits_soft_cap=None, **overrides)
  dpa_cfg = dataclasses.replace(ref_cfg, attention_impl="dot_product_attention",
                                dpa_implementation=impl)
  params = jax.tree.map(jnp.asarray, attn_params(ref_cfg, seed=11, scale=3.0))
  for packed in (False, True):
    x, pos, seg = _packed_inputs(ref_cfg, packed)
    ref_fn, dpa_fn = (_attn_fn(c, attention_type, pos, seg) for c in (ref_cfg, dpa_cfg))
    out_ref = np.asarray(jax.jit(ref_fn)(params, x))
    out_dpa = np.asarray(jax.jit(dpa_fn)(params, x))
    np.testing.assert_allclose(out_dpa, out_ref, rtol=1e-5, atol=1e-6)
    # The reference path is itself checked against float64 numpy above.
    np.testing.assert_allclose(
        out_dpa, reference_attention(params, x, pos, seg, ref_cfg, attention_type),
        rtol=1e-4, atol=1e-5)
    cot = rand(99, out_ref.shape)
    grad = lambda fn: jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * cot),
                                       argnums=(0, 1)))(params, x)
    (gp_ref, gx_ref), (gp_dpa, gx_dpa) = grad(ref_fn), grad(dpa_fn)
    np.testing.assert_allclose(gx_dpa, gx_ref, rtol=1e-4, atol=1e-6)
    for name in gp_ref:
      # Parameter gradients sum over batch and positions (values up to ~4): an
      # element near 0.02 may differ by a few 1e-6 between the two programs'
      # float32 reduction orders, so the absolute tolerance follows the scale.
      scale = float(np.max(np.abs(gp_ref[name])))
      np.testing.assert_allclose(gp_dpa[name], gp_ref[name], rtol=1e-4, atol=2e-6 * scale,
                                 err_msg=name)


def test_dot_product_attention_window_really_applied():
  # Guards the cases above: with window 3 a key 3 positions back is ignored.
  cfg = tiny_config(attn_logits_soft_cap=None, attention_impl="dot_product_attention")
  p = attn_params(cfg, seed=7)
  x = rand(8, (1, 8, 16))
  x2 = x.copy()
  x2[0, 2] += 5.0
  a = run_attention(cfg, "local", p, x)
  b = run_attention(cfg, "local", p, x2)
  np.testing.assert_allclose(a[0, [0, 1, 5, 6, 7]], b[0, [0, 1, 5, 6, 7]], atol=1e-6)
  assert np.all(np.abs(a[0, [2, 3, 4]] - b[0, [2, 3, 4]]).max(-1) > 1e-5)


def test_dot_product_attention_bf16_close_to_reference_bf16():
  ref_cfg = tiny_config(attn_logits_soft_cap=None, dtype="bfloat16")
  dpa_cfg = dataclasses.replace(ref_cfg, attention_impl="dot_product_attention")
  p = attn_params(ref_cfg, seed=9)
  x = rand(1, (2, 9, 16)).astype(jnp.bfloat16)
  out_ref = run_attention(ref_cfg, "local", p, x)
  out_dpa = run_attention(dpa_cfg, "local", p, x)
  assert out_dpa.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_dpa, np.float32),
                             np.asarray(out_ref, np.float32), rtol=2e-2, atol=2e-2)


def test_transformer_logits_and_grads_equal_across_attention_impls():
  from posttrain_jax.models import Transformer  # pylint: disable=import-outside-toplevel
  ref_cfg = tiny_config(attn_logits_soft_cap=None, num_layers=2, vocab_size=40)
  dpa_cfg = dataclasses.replace(ref_cfg, attention_impl="dot_product_attention")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 9)), jnp.int32)
  _, pos, seg = _packed_inputs(ref_cfg, True)
  params = nn.unbox(Transformer(ref_cfg).init(jax.random.key(0), tokens)["params"])
  loss = lambda cfg: jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.square(
      Transformer(cfg).apply({"params": p}, tokens, pos, seg)))))
  (l_ref, g_ref), (l_dpa, g_dpa) = loss(ref_cfg)(params), loss(dpa_cfg)(params)
  np.testing.assert_allclose(l_dpa, l_ref, rtol=1e-5)
  # float32 summation-order noise only (gradients here are O(10)).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4),
               g_dpa, g_ref)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_transformer_logits_and_grads_equal_across_gradient_layouts(scan_layers):
  # gradient_layout="row_major" (row_major_matmul for every projection and the
  # tied logits, softcap_attention in the blocked local and causal kernels)
  # gives autodiff's loss and gradients, packed segments included.
  from posttrain_jax.models import Transformer  # pylint: disable=import-outside-toplevel
  xla_cfg = tiny_config(num_layers=2, vocab_size=40, sliding_window_size=2,
                        causal_block_size=4, attn_logits_soft_cap=5.0,
                        gradient_layout="xla", scan_layers=scan_layers)
  row_cfg = dataclasses.replace(xla_cfg, gradient_layout="row_major")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 9)), jnp.int32)
  _, pos, seg = _packed_inputs(xla_cfg, True)
  params = nn.unbox(Transformer(xla_cfg).init(jax.random.key(0), tokens)["params"])
  params = jax.tree.map(lambda p: p * 3.0, params)  # scores well into the soft-cap
  loss = lambda cfg: jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.square(
      Transformer(cfg).apply({"params": p}, tokens, pos, seg)))))
  (l_xla, g_xla), (l_row, g_row) = loss(xla_cfg)(params), loss(row_cfg)(params)
  np.testing.assert_allclose(l_row, l_xla, rtol=1e-5)
  # float32 summation-order noise, relative to each gradient's largest entry
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())), g_row, g_xla)


def test_gradient_layout_auto_is_row_major_on_cpu_only():
  assert tiny_config().gradient_layout == "auto"
  assert tiny_config().row_major_gradients == (jax.default_backend() == "cpu")
  assert tiny_config(gradient_layout="row_major").row_major_gradients
  assert not tiny_config(gradient_layout="xla").row_major_gradients


@pytest.mark.parametrize("overrides, needle", [
    (dict(gradient_layout="transposed"), "gradient_layout must be one of"),
    (dict(attention_impl="dot_product_attention"), "attn_logits_soft_cap=None"),
    (dict(attention_impl="flash"), "attention_impl must be one of"),
    (dict(attn_logits_soft_cap=None, dpa_implementation="cudnn"),
     "needs attention_impl='dot_product_attention'"),
    (dict(attn_logits_soft_cap=None, attention_impl="dot_product_attention",
          dpa_implementation="pallas"), "dpa_implementation must be one of"),
])
def test_attention_impl_config_errors(overrides, needle):
  with pytest.raises(ValueError, match="Invalid ModelConfig") as err:
    tiny_config(**overrides)
  assert needle in str(err.value)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("attention_type", ["local", "global"])
def test_cudnn_matches_reference_on_gpu(attention_type):
  ref_cfg = tiny_config(attn_logits_soft_cap=None, dtype="bfloat16", head_dim=64,
                        sliding_window_size=5)
  dpa_cfg = dataclasses.replace(ref_cfg, attention_impl="dot_product_attention",
                                dpa_implementation="cudnn")
  p = jax.tree.map(jnp.asarray, attn_params(ref_cfg, seed=2))
  for packed in (False, True):
    x, pos, seg = _packed_inputs(ref_cfg, packed)
    x = jnp.asarray(x, jnp.bfloat16)
    ref_fn, dpa_fn = (_attn_fn(c, attention_type, pos, seg) for c in (ref_cfg, dpa_cfg))
    np.testing.assert_allclose(np.asarray(jax.jit(dpa_fn)(p, x), np.float32),
                               np.asarray(jax.jit(ref_fn)(p, x), np.float32),
                               rtol=2e-2, atol=2e-2)
    grad = lambda fn: jax.jit(jax.grad(lambda p: jnp.sum(fn(p, x).astype(jnp.float32))))(p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=5e-2, atol=5e-2),
                 grad(dpa_fn), grad(ref_fn))


# ------------------------------------------------------------------ blocked local attention


def _full_local_attention(q, key, value, seg, window, cap):
  """Masked [t, t] local attention (the reference path's math) in jnp."""
  b, t, h, hd = q.shape
  k = key.shape[2]
  qg = q.reshape(b, t, k, h // k, hd)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, key, preferred_element_type=jnp.float32)
  if cap is not None:
    s = cap * jnp.tanh(s / cap)
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = attention_mask(idx, idx, seg, seg, window)
  s = jnp.where(mask[:, None, None], s, -1e30)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bkgts,bskd->btkgd", p, value).reshape(b, t, h, hd)


def _assert_blocked_equals_full(blocked, length, window, packed, cap):
  """blocked(q, key, value, seg) equals masked full attention (window None:
  causal), forward and gradients."""
  b, h, k, hd = 2, 4, 2, 8
  q = jnp.asarray(rand(1, (b, length, h, hd), 2.0))
  key = jnp.asarray(rand(2, (b, length, k, hd), 2.0))
  value = jnp.asarray(rand(3, (b, length, k, hd)))
  seg = None
  if packed:
    cut = length // 3
    seg = jnp.asarray([[1] * cut + [2] * (length - cut), [1] * length], jnp.int32)
  fast = jax.jit(lambda q, key, value: blocked(q, key, value, seg))
  full = lambda q, key, value: _full_local_attention(q, key, value, seg, window, cap)
  np.testing.assert_allclose(fast(q, key, value), full(q, key, value),
                             rtol=1e-5, atol=1e-6)
  cot = jnp.asarray(rand(4, (b, length, h, hd)))
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2)))(
      q, key, value)
  for a, c in zip(grads(fast), grads(full)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def _block_score_shapes(cfg, attention_type, length):
  """Trailing [rows, keys] shapes of every array in the module's jaxpr."""
  params = attn_params(cfg, seed=0)
  x = rand(5, (2, length, cfg.embed_dim))
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (2, length))
  module = Attention(cfg, attention_type)
  jaxpr = jax.make_jaxpr(lambda p, x: module.apply({"params": p}, x, pos, None))(params, x)
  return {tuple(v.aval.shape)[-2:] for e in jaxpr.jaxpr.eqns for v in e.outvars
          if len(v.aval.shape) >= 2}


@pytest.mark.parametrize("row_major", [False, True])
@pytest.mark.parametrize("length, window, packed, cap", [
    (12, 4, False, 5.0), (13, 4, True, 5.0), (13, 5, True, None), (7, 1, False, None),
    (20, 3, True, 2.0)])
def test_local_block_attention_equals_masked_full(length, window, packed, cap, row_major):
  # row_major: the softcap_attention core where a cap is set (ModelConfig.gradient_layout).
  from posttrain_jax.models.attention import local_block_attention  # pylint: disable=import-outside-toplevel
  _assert_blocked_equals_full(
      lambda q, key, value, seg: local_block_attention(q, key, value, seg, window, cap,
                                                       row_major),
      length, window, packed, cap)


def test_local_layer_uses_blocks_only_when_window_is_short():
  # The module output at window 3 and length 9 (blocked) equals the numpy
  # reference; the blocked jaxpr has no [t, t] score array.
  cfg = tiny_config(sliding_window_size=3)
  params = attn_params(cfg, seed=12, scale=6.0)
  x = rand(5, (2, 9, cfg.embed_dim))
  pos = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))
  np.testing.assert_allclose(run_attention(cfg, "local", params, x),
                             reference_attention(params, x, pos, None, cfg, "local"),
                             rtol=1e-4, atol=1e-5)
  shapes = _block_score_shapes(cfg, "local", 9)
  assert (9, 9) not in shapes
  # rows: 3 positions x 2 query heads per kv head; keys: 2 windows
  assert (6, 6) in shapes


# ------------------------------------------------------------------ causal block attention


@pytest.mark.parametrize("row_major", [False, True])
@pytest.mark.parametrize("length, block, packed, cap", [
    (12, 4, False, 5.0), (13, 4, True, 5.0), (13, 5, True, None), (7, 2, False, None),
    (20, 6, True, 2.0), (9, 20, False, 3.0)])
def test_causal_block_attention_equals_masked_full(length, block, packed, cap, row_major):
  # Forward and gradients equal masked full causal attention (window None),
  # including a last block shorter than `block` and a block longer than t.
  from posttrain_jax.models.attention import causal_block_attention  # pylint: disable=import-outside-toplevel
  _assert_blocked_equals_full(
      lambda q, key, value, seg: causal_block_attention(q, key, value, seg, block, cap,
                                                        row_major),
      length, None, packed, cap)


def test_global_layer_with_causal_block_size():
  # The module output with causal_block_size equals the numpy reference and its
  # jaxpr has no [t, t] score array; a KV cache still takes the reference path.
  cfg = tiny_config(causal_block_size=4)
  params = attn_params(cfg, seed=13, scale=6.0)
  x = rand(6, (2, 10, cfg.embed_dim))
  pos = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))
  np.testing.assert_allclose(run_attention(cfg, "global", params, x),
                             reference_attention(params, x, pos, None, cfg, "global"),
                             rtol=1e-4, atol=1e-5)
  shapes = _block_score_shapes(cfg, "global", 10)
  assert (10, 10) not in shapes
  # rows: block positions x 2 query heads per kv head; keys: the causal prefix
  assert {(8, 4), (8, 8), (4, 10)} <= shapes


def test_causal_block_size_validated():
  with pytest.raises(ValueError, match="causal_block_size"):
    tiny_config(causal_block_size=0)
