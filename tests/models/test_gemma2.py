"""End-to-end tests of the Gemma-2-like Transformer (tiny float32 shapes)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.gemma2 import Transformer

VOCAB = 32


def tiny_config(**overrides):
  kwargs = dict(vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, mlp_dim=24, sliding_window_size=3)
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def param_shapes(cfg, length=4):
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens))


def _key_names(path):
  return tuple(getattr(p, "key", None) for p in path)


def random_params(cfg, seed=0, weight_scale=1.0):
  """Unscanned-layout (or any-layout) params from numpy noise, fan-in scaled.

  Avoids jax.random (each new shape compiles a PRNG kernel on CPU). Norm scales
  get small noise so that the (1 + w) factors are exercised.
  """
  rng = np.random.default_rng(seed)
  leading = 1 if cfg.scan_layers else 0

  def fill(path, leaf):
    names = _key_names(path)
    shape = leaf.shape
    if names[-1] == "scale":
      return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if names[-1] == "embedding":
      std = cfg.embed_dim ** -0.5
    elif names[-1] == "o":
      std = weight_scale * (shape[leading] * shape[leading + 1]) ** -0.5
    else:
      std = weight_scale * shape[leading] ** -0.5
    return (std * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, param_shapes(cfg))


@functools.lru_cache(maxsize=None)
def _apply_fn(cfg, return_hidden=False):
  model = Transformer(cfg)
  return jax.jit(lambda v, t, pos, seg: model.apply(
      v, t, pos, seg, return_hidden=return_hidden))


def forward(cfg, params, tokens, positions=None, segment_ids=None,
            return_hidden=False):
  out = _apply_fn(cfg, return_hidden)(params, jnp.asarray(tokens), positions,
                                      segment_ids)
  return jax.tree_util.tree_map(np.asarray, out)


def random_tokens(seed, shape):
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def to_scanned(unscanned_params, cfg):
  """Maps layer_{j*P+i} -> layers/{pattern[i]}_{i}[j] (P = len(pattern))."""
  p = unscanned_params["params"]
  period = len(cfg.attention_pattern)
  groups = cfg.num_layers // period
  layers = {}
  for i, attention_type in enumerate(cfg.attention_pattern):
    members = [p[f"layer_{j * period + i}"] for j in range(groups)]
    layers[f"{attention_type}_{i}"] = jax.tree_util.tree_map(
        lambda *xs: np.stack(xs), *members)
  out = {k: v for k, v in p.items() if not k.startswith("layer_")}
  out["layers"] = layers
  return {"params": out}


def perturb_rows(tokens, position_per_row):
  """Row r of the result is `tokens` with the token at position_per_row[r] changed."""
  rows = np.repeat(tokens[None], len(position_per_row), axis=0)
  for r, pos in enumerate(position_per_row):
    rows[r, pos] = (rows[r, pos] + 7) % VOCAB
  return rows


# ------------------------------------------------------------------ basics


@pytest.mark.parametrize("scan_layers", [False, True])
def test_real_init_forward_shapes_and_dtypes(scan_layers):
  cfg = tiny_config(scan_layers=scan_layers)
  tokens = random_tokens(0, (2, 5))
  model = Transformer(cfg)
  # rbg keys: the default threefry PRNG is slow to compile on CPU.
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), tokens)
  for leaf in jax.tree_util.tree_leaves(nn.unbox(variables)):
    assert leaf.dtype == jnp.float32
  # Logical axis names survive (scanned layers gain a leading "layers" axis).
  specs = nn.get_partition_spec(variables)["params"]
  q_spec = (specs["layers"]["local_0"]["attn"]["q"] if scan_layers
            else specs["layer_0"]["attn"]["q"])
  assert tuple(q_spec) == (("layers",) if scan_layers else ()) + (
      "embed", "heads", "kv")
  assert tuple(specs["embedder"]["embedding"]) == ("vocab", "embed")
  logits, hidden = forward(cfg, variables, tokens, return_hidden=True)
  assert logits.shape == (2, 5, VOCAB) and logits.dtype == np.float32
  assert hidden.shape == (2, 5, 16)
  assert np.all(np.isfinite(logits))
  # Tied output projection followed by the final soft-cap.
  table = nn.unbox(variables)["params"]["embedder"]["embedding"]
  np.testing.assert_allclose(logits, 30.0 * np.tanh(hidden @ np.asarray(table).T / 30.0),
                             rtol=1e-5, atol=1e-5)


def test_model_embedding_lookup_scaled_by_sqrt_d():
  cfg = tiny_config()
  params = random_params(cfg)
  tokens = random_tokens(1, (1, 6))
  out = Transformer(cfg).apply(params, jnp.asarray(tokens),
                               method=lambda m, t: m.embedder.encode(t))
  table = params["params"]["embedder"]["embedding"]
  np.testing.assert_allclose(out, table[tokens] * np.sqrt(16.0), rtol=1e-6)


# ------------------------------------------------------------------ final soft-cap


def test_final_logit_soft_cap_bounds_logits_with_huge_weights():
  cfg = tiny_config()
  params = random_params(cfg, seed=3, weight_scale=50.0)
  params["params"]["embedder"]["embedding"] *= 1e3
  params["params"]["final_norm"]["scale"] += 100.0
  tokens = random_tokens(3, (2, 8))
  logits = forward(cfg, params, tokens)
  assert np.all(np.isfinite(logits))
  assert np.abs(logits).max() <= 30.0
  assert np.abs(logits).max() > 29.0  # the cap is actually active
  uncapped = forward(dataclasses.replace(cfg, final_logit_soft_cap=None), params,
                     tokens)
  assert np.abs(uncapped).max() > 1e3


# ------------------------------------------------------------------ sliding window


@pytest.mark.parametrize("window, scan_layers",
                         [(2, False), (3, False), (5, False), (3, True)])
def test_local_only_model_receptive_field_is_window(window, scan_layers):
  length, src = 10, 2
  cfg = tiny_config(num_layers=1, attention_pattern=("local",),
                    sliding_window_size=window, scan_layers=scan_layers)
  params = random_params(cfg, seed=4)
  base = random_tokens(4, (length,))
  rows = np.concatenate([base[None], perturb_rows(base, [src])])
  logits = forward(cfg, params, rows)
  delta = np.abs(logits[1] - logits[0]).max(-1)  # [length]
  # Positions src .. src + window - 1 see the perturbed token, nothing else does.
  for t in range(length):
    if src <= t <= src + window - 1:
      assert delta[t] > 1e-5, (t, delta)
    else:
      assert delta[t] == 0.0, (t, delta)

  global_cfg = dataclasses.replace(cfg, attention_pattern=("global",))
  if scan_layers:  # same weights; the scanned slot is named after its type
    layers = params["params"]["layers"]
    params["params"]["layers"] = {"global_0": layers["local_0"]}
  g = forward(global_cfg, params, rows)
  g_delta = np.abs(g[1] - g[0]).max(-1)
  assert np.all(g_delta[src:] > 1e-5)
  assert np.all(g_delta[:src] == 0.0)


def test_stacked_local_layers_grow_receptive_field():
  # Two local layers of window 3: receptive field 2 * (3 - 1) + 1 = 5.
  cfg = tiny_config(num_layers=2, attention_pattern=("local",),
                    sliding_window_size=3)
  params = random_params(cfg, seed=5)
  base = random_tokens(5, (9,))
  rows = np.concatenate([base[None], perturb_rows(base, [1])])
  logits = forward(cfg, params, rows)
  delta = np.abs(logits[1] - logits[0]).max(-1)
  assert np.all(delta[1:6] > 1e-6)
  np.testing.assert_array_equal(delta[6:], 0.0)
  np.testing.assert_array_equal(delta[:1], 0.0)


# ------------------------------------------------------------------ layer 0 is local


def test_layer_types_and_param_names():
  cfg = tiny_config(num_layers=4)
  assert [cfg.attention_type(i) for i in range(4)] == [
      "local", "global", "local", "global"]
  p = param_shapes(cfg)["params"]
  assert sorted(p) == ["embedder", "final_norm", "layer_0", "layer_1", "layer_2",
                       "layer_3"]
  assert sorted(p["layer_0"]) == ["attn", "mlp", "post_attention_norm",
                                  "post_ffw_norm", "pre_attention_norm",
                                  "pre_ffw_norm"]
  ps = param_shapes(dataclasses.replace(cfg, scan_layers=True))["params"]
  assert sorted(ps) == ["embedder", "final_norm", "layers"]
  assert sorted(ps["layers"]) == ["global_1", "local_0"]  # slot i: pattern[i]_i
  assert ps["layers"]["local_0"]["attn"]["q"].shape == (2, 16, 4, 8)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_first_layer_is_local_and_second_global_by_behaviour(scan_layers):
  """Silence one layer's attention (o = 0) and probe the other's receptive field.

  With layer 1's attention silenced, only layer 0 mixes positions: a token
  `window` or more positions back must not matter (layer 0 is local). With
  layer 0 silenced instead, it must matter (layer 1 is global).
  """
  window, length, src = 2, 8, 1
  unscanned = tiny_config(num_layers=2, sliding_window_size=window)
  params = random_params(unscanned, seed=6)
  cfg = dataclasses.replace(unscanned, scan_layers=scan_layers)
  base = random_tokens(6, (length,))
  rows = np.concatenate([base[None], perturb_rows(base, [src])])
  far = slice(src + window, length)

  def silenced(layer):
    p = jax.tree_util.tree_map(np.array, params)  # copy
    p["params"][f"layer_{layer}"]["attn"]["o"][...] = 0.0
    return to_scanned(p, cfg) if scan_layers else p

  logits = forward(cfg, silenced(1), rows)
  delta = np.abs(logits[1] - logits[0]).max(-1)
  np.testing.assert_array_equal(delta[far], 0.0)
  assert np.all(delta[src:src + window] > 1e-6)

  logits = forward(cfg, silenced(0), rows)
  delta = np.abs(logits[1] - logits[0]).max(-1)
  assert np.all(delta[far] > 1e-6)


# ------------------------------------------------------------------ packing


@pytest.mark.parametrize("scan_layers", [False, True])
def test_packed_segments_match_separate_runs(scan_layers):
  cfg = tiny_config(scan_layers=scan_layers, num_layers=4, sliding_window_size=3)
  params = random_params(dataclasses.replace(cfg, scan_layers=False), seed=7)
  if scan_layers:
    params = to_scanned(params, cfg)
  a, b = random_tokens(70, (5,)), random_tokens(71, (4,))
  pad = np.zeros((2,), np.int32)
  tokens = np.concatenate([a, b, pad])[None]
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 2], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0, 1]], np.int32)
  packed = forward(cfg, params, tokens, pos, seg)

  alone_a = forward(cfg, params, a[None])
  alone_b = forward(cfg, params, b[None])
  np.testing.assert_allclose(packed[0, 5:9], alone_b[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)

  # Changing the second segment (and the padding) leaves the first untouched.
  tokens2 = tokens.copy()
  tokens2[0, 5:] = (tokens2[0, 5:] + 3) % VOCAB
  packed2 = forward(cfg, params, tokens2, pos, seg)
  np.testing.assert_array_equal(packed2[0, :5], packed[0, :5])
  assert np.abs(packed2[0, 5:9] - packed[0, 5:9]).max() > 1e-4


# ------------------------------------------------------------------ GQA


@pytest.mark.parametrize("scan_layers", [False, True])
def test_gqa_model_equals_mha_model_with_repeated_kv(scan_layers):
  gqa = tiny_config(num_heads=4, num_kv_heads=2, scan_layers=scan_layers)
  mha = dataclasses.replace(gqa, num_kv_heads=4)
  params = random_params(gqa, seed=8)
  groups = gqa.num_heads // gqa.num_kv_heads

  def repeat_kv(path, x):
    if _key_names(path)[-1] in ("k", "v"):
      return np.repeat(x, groups, axis=-2)  # [..., embed, kv_heads, head_dim]
    return x

  mha_params = jax.tree_util.tree_map_with_path(repeat_kv, params)
  # The repeated tree has exactly the MHA model's shapes.
  assert jax.tree_util.tree_map(np.shape, mha_params) == jax.tree_util.tree_map(
      lambda s: s.shape, param_shapes(mha))
  tokens = random_tokens(8, (2, 7))
  np.testing.assert_allclose(forward(gqa, params, tokens),
                             forward(mha, mha_params, tokens), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ head_dim free


def test_head_dim_not_equal_embed_over_heads_runs_both_scalings():
  tokens = random_tokens(9, (1, 6))
  outs = []
  for scaling in ("head_dim", "embed_over_heads"):
    cfg = tiny_config(embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=12,
                      query_scaling=scaling)
    params = random_params(cfg, seed=9, weight_scale=3.0)
    assert params["params"]["layer_0"]["attn"]["q"].shape == (16, 2, 12)
    outs.append(forward(cfg, params, tokens))
    assert np.all(np.isfinite(outs[-1]))
  assert np.abs(outs[0] - outs[1]).max() > 1e-5


# ------------------------------------------------------------------ scan vs unscanned


@pytest.mark.parametrize("pattern, num_layers", [
    (("local", "global"), 4),
    (("local", "local", "global"), 3),
])
def test_scanned_equals_unscanned(pattern, num_layers):
  cfg = tiny_config(attention_pattern=pattern, num_layers=num_layers)
  scfg = dataclasses.replace(cfg, scan_layers=True)
  params = random_params(cfg, seed=10)
  sparams = to_scanned(params, scfg)
  # The mapped tree has exactly the scanned model's structure and shapes.
  assert jax.tree_util.tree_map(np.shape, sparams) == jax.tree_util.tree_map(
      lambda s: s.shape, param_shapes(scfg))
  tokens = random_tokens(10, (2, 8))
  np.testing.assert_allclose(forward(scfg, sparams, tokens),
                             forward(cfg, params, tokens), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ remat


def _loss_and_grads(cfg, params, tokens):
  model = Transformer(cfg)

  def loss_fn(p):
    logits = model.apply(p, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return nll.mean(), logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, logits, grads


# Remat is independent of the attention type: small graphs keep compiles cheap
# (scanned: a one-block body scanned twice).
@pytest.mark.parametrize("scan_layers, num_layers, pattern", [
    (False, 1, ("local", "global")),
    (True, 2, ("global",)),
])
def test_remat_policies_match_no_remat(scan_layers, num_layers, pattern):
  cfg = tiny_config(scan_layers=scan_layers, num_layers=num_layers,
                    attention_pattern=pattern)
  params = random_params(dataclasses.replace(cfg, scan_layers=False), seed=11)
  if scan_layers:
    params = to_scanned(params, cfg)
  tokens = jnp.asarray(random_tokens(11, (2, 7)))
  ref_loss, ref_logits, ref_grads = _loss_and_grads(cfg, params, tokens)
  assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grads)) > 0
  for policy in ("full", "dots"):
    loss, logits, grads = _loss_and_grads(
        dataclasses.replace(cfg, remat_policy=policy), params, tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        grads, ref_grads)


# ------------------------------------------------------------------ bfloat16


@pytest.mark.parametrize("scan_layers", [True])
def test_bfloat16_compute_close_to_float32(scan_layers):
  cfg32 = tiny_config(scan_layers=scan_layers)
  cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
  for leaf in jax.tree_util.tree_leaves(param_shapes(cfg16)):
    assert leaf.dtype == jnp.float32  # param_dtype stays float32
  params = random_params(cfg32, seed=12)
  tokens = random_tokens(12, (2, 8))
  l32 = forward(cfg32, params, tokens)
  l16, h16 = forward(cfg16, params, tokens, return_hidden=True)
  assert l16.dtype == np.float32 and h16.dtype == jnp.bfloat16
  assert np.all(np.isfinite(l16))
  err = np.abs(l16 - l32).max()
  assert err < 0.05 * np.abs(l32).max() + 0.05, err
  # Greedy predictions mostly agree.
  assert (l16.argmax(-1) == l32.argmax(-1)).mean() >= 0.75

  cfg_bf16_params = dataclasses.replace(cfg16, param_dtype="bfloat16")
  for leaf in jax.tree_util.tree_leaves(param_shapes(cfg_bf16_params)):
    assert leaf.dtype == jnp.bfloat16


@pytest.mark.parametrize("scan", [False, True])
def test_local_layers_get_a_ring_buffer_cache_of_the_window(scan):
  from posttrain_jax.models.attention import CacheInfo  # pylint: disable=import-outside-toplevel
  from posttrain_jax.models.gemma2 import init_cache  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8, mlp_dim=32, sliding_window_size=3, scan_layers=scan)
  cache = init_cache(cfg, 1, 10)
  local, global_ = (("local_0", "global_1") if scan else ("layer_0", "layer_1"))
  assert cache[local]["k"].shape[-1] == cache[local]["v"].shape[-2] == 3
  assert cache[global_]["k"].shape[-1] == 10
  assert init_cache(cfg, 1, 2)[local]["k"].shape[-1] == 2  # shorter than the window
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  tokens = jnp.ones((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="ring-buffer cache"):
    model.apply({"params": params}, tokens, positions=jnp.asarray([[4, 5]]),
                segment_ids=jnp.ones((1, 2), jnp.int32), cache=cache,
                cache_info=CacheInfo(jnp.int32(4), jnp.ones((1, 10), jnp.int32)))
