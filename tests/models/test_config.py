"""ModelConfig: published Gemma 2 parameter counts, query scale, validation, FLOPs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.gemma2 import Transformer

VOCAB = 256_128

# name: (d_model, layers, heads, kv_heads, head_dim, mlp_dim, query_scaling,
#        non-embedding params, embedding params) -- the Gemma 2 paper's
#        architecture and parameter-count tables (Gemma Team 2024, arXiv 2408.00118).
PUBLISHED = {
    "2b": (2304, 26, 8, 4, 256, 9216, "head_dim", 2_024_517_888, 590_118_912),
    "9b": (3584, 42, 16, 8, 256, 14336, "head_dim", 8_324_201_984, 917_962_752),
    "27b": (4608, 46, 32, 16, 128, 36864, "embed_over_heads", 26_047_480_320,
            1_180_237_824),
}


def published_config(name, **overrides):
  d, layers, h, k, hd, ff, scaling, _, _ = PUBLISHED[name]
  kwargs = dict(vocab_size=VOCAB, embed_dim=d, num_layers=layers, num_heads=h,
                num_kv_heads=k, head_dim=hd, mlp_dim=ff, query_scaling=scaling)
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def tiny_config(**overrides):
  kwargs = dict(vocab_size=32, embed_dim=16, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, mlp_dim=24, sliding_window_size=4)
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


# ------------------------------------------------------------------ param counts


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_closed_form_param_counts_match_published_table(name):
  *_, non_emb, emb = PUBLISHED[name]
  cfg = published_config(name)
  assert cfg.non_embedding_params() == non_emb
  assert cfg.embedding_params() == emb


def _count_leaves(cfg):
  """Counts (non-embedding, embedding) parameters of the real module tree."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)
  params = shapes["params"]
  non_emb = emb = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(p, "key", None) for p in path]
    n = math.prod(leaf.shape)
    if keys[0] == "embedder":
      emb += n
    else:
      non_emb += n
  return non_emb, emb


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_module_tree_param_counts_match_published_table(name, scan_layers):
  *_, non_emb, emb = PUBLISHED[name]
  cfg = published_config(name, scan_layers=scan_layers)
  assert _count_leaves(cfg) == (non_emb, emb)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_tiny_tree_count_matches_closed_form(scan_layers):
  # Includes an MHA config and head_dim != embed_dim / num_heads.
  for cfg in (tiny_config(scan_layers=scan_layers),
              tiny_config(num_kv_heads=4, head_dim=12, num_layers=4,
                          scan_layers=scan_layers)):
    assert _count_leaves(cfg) == (cfg.non_embedding_params(),
                                  cfg.embedding_params())


# ------------------------------------------------------------------ query scale


def test_query_scale_published_models():
  assert published_config("2b").query_scale == pytest.approx(256 ** -0.5)
  assert published_config("9b").query_scale == pytest.approx(256 ** -0.5)
  # 27B: d_model / heads = 4608 / 32 = 144, not head_dim = 128.
  assert published_config("27b").query_scale == pytest.approx(144 ** -0.5)


def test_query_scaling_modes_and_override():
  cfg = tiny_config(embed_dim=24, num_heads=4, head_dim=8)  # d / h = 6 != 8
  assert cfg.query_scale == pytest.approx(8 ** -0.5)
  cfg = dataclasses.replace(cfg, query_scaling="embed_over_heads")
  assert cfg.query_scale == pytest.approx(6 ** -0.5)
  for scaling in ("head_dim", "embed_over_heads"):
    cfg = tiny_config(query_scaling=scaling, query_pre_attn_scalar=224)
    assert cfg.query_scale == pytest.approx(224 ** -0.5)


# ------------------------------------------------------------------ layer types


def test_default_pattern_alternates_starting_with_local():
  cfg = published_config("2b")
  assert cfg.attention_pattern == ("local", "global")
  assert cfg.attention_type(0) == "local"
  types = [cfg.attention_type(i) for i in range(cfg.num_layers)]
  assert types[0::2] == ["local"] * 13
  assert types[1::2] == ["global"] * 13


def test_attention_pattern_list_is_normalised_to_tuple():
  cfg = tiny_config(attention_pattern=["global"])
  assert cfg.attention_pattern == ("global",)
  assert hash(cfg)  # frozen + hashable (usable as a static argument)


def test_defaults_follow_gemma2():
  cfg = published_config("9b")
  assert cfg.sliding_window_size == 4096
  assert cfg.attn_logits_soft_cap == 50.0
  assert cfg.final_logit_soft_cap == 30.0
  assert cfg.rope_base == 10_000.0
  assert cfg.rms_norm_eps == 1e-6


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be a multiple of "
                                        r"num_kv_heads \(4\)"),
    (dict(remat_policy="everything"), "remat_policy must be one of"),
    (dict(num_layers=3, scan_layers=True), r"scan_layers needs num_layers \(3\)"),
    (dict(attention_pattern=("local", "sliding")), "attention_pattern entries"),
    (dict(attention_pattern=()), "attention_pattern entries"),
    (dict(sliding_window_size=None), "positive sliding_window_size"),
    (dict(sliding_window_size=0), "positive sliding_window_size"),
    # A negative window would mask every key of every query in local layers,
    # and the softmax over a fully masked row is uniform over all keys,
    # including future ones (a silent causality leak).
    (dict(sliding_window_size=-1), "positive sliding_window_size"),
    (dict(query_scaling="sqrt_d"), "query_scaling must be one of"),
    (dict(embed_dim=0), "embed_dim must be positive"),
    (dict(dtype="floaty"), "dtype 'floaty' is not a dtype name"),
])
def test_invalid_configs_raise_value_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    tiny_config(**overrides)


def test_valid_edge_configs_do_not_raise():
  tiny_config(num_layers=3)  # odd layer count is fine unscanned
  tiny_config(attention_pattern=("global",), sliding_window_size=None)
  tiny_config(num_layers=3, attention_pattern=("global",), scan_layers=True)
  for policy in ("none", "full", "dots", "dots_with_no_batch_dims"):
    tiny_config(remat_policy=policy)


# ------------------------------------------------------------------ FLOPs


def _brute_force_span(seq_len, window):
  return sum(min(i + 1, window) for i in range(seq_len)) / seq_len


@pytest.mark.parametrize("seq_len, window", [(10, 4), (7, 7), (5, 9), (13, 1)])
def test_flops_per_token_matches_brute_force_span(seq_len, window):
  cfg = tiny_config(num_layers=5, sliding_window_size=window)
  n = cfg.non_embedding_params() + cfg.embedding_params()
  per_head = 12 * cfg.num_heads * cfg.head_dim
  local_span = _brute_force_span(seq_len, window)
  global_span = _brute_force_span(seq_len, seq_len)
  assert global_span == pytest.approx((seq_len + 1) / 2)
  # Layers 0, 2, 4 local; 1, 3 global.
  expected = 6 * n + per_head * (3 * local_span + 2 * global_span)
  assert cfg.flops_per_token(seq_len) == pytest.approx(expected, rel=1e-12)


def test_flops_per_token_all_global_and_published_scale():
  cfg = tiny_config(attention_pattern=("global",), sliding_window_size=None,
                    num_layers=3)
  n = cfg.non_embedding_params() + cfg.embedding_params()
  expected = 6 * n + 3 * 12 * cfg.num_heads * cfg.head_dim * (8 + 1) / 2
  assert cfg.flops_per_token(8) == pytest.approx(expected, rel=1e-12)
  # Sanity on a real shape: 6N dominates at 8k context for 9B.
  cfg = published_config("9b")
  six_n = 6 * (cfg.non_embedding_params() + cfg.embedding_params())
  flops = cfg.flops_per_token(8192)
  assert six_n < flops < 1.2 * six_n
  np.testing.assert_allclose(
      flops - six_n,
      12 * 16 * 256 * 21 * (_brute_force_span(8192, 4096) + 8193 / 2), rtol=1e-12)
