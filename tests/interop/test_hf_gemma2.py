"""HF Gemma2ForCausalLM <-> posttrain_jax: logits parity, bit-exact round trips,
config mapping, layouts and bad-input errors (tiny random transformers models)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from posttrain_jax.core import partitioning
from posttrain_jax.core.checkpointing import CheckpointMismatchError
from posttrain_jax.interop import hf_checkpoint, hf_gemma2
from posttrain_jax.models import ModelConfig, Transformer, layout
from posttrain_jax.models import params_checkpoint

# GQA ratios 1, 2, 4; head_dim != hidden / heads everywhere; query scaling by
# head_dim, by hidden / heads and by an explicit scalar; sequences (13) longer
# than the sliding windows; active and disabled soft-caps; a period-3 pattern.
SHAPES = {
    "gqa1_scale_head_dim": dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=24,
        query_pre_attn_scalar=24, sliding_window=4),
    "gqa2_scale_embed_over_heads_caps": dict(
        vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        query_pre_attn_scalar=12, sliding_window=5, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0),
    "gqa4_explicit_scalar_no_caps": dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=20, sliding_window=3, attn_logit_softcapping=None,
        final_logit_softcapping=None,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}
LENGTH = 13


def hf_model(path, seed=0, dtype=None, max_shard_size=None, **config):
  """A randomised tiny Gemma2ForCausalLM saved to `path` (weights large enough
  that soft-caps, norms and every projection matter)."""
  torch.manual_seed(seed)
  model = transformers.Gemma2ForCausalLM(
      transformers.Gemma2Config(attn_implementation="eager", **config)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3 if p.ndim == 1 else p.shape[-1] ** -0.5)
  if dtype is not None:
    model = model.to(dtype)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(str(path), **kwargs)
  return model


def hf_logits(model, tokens, attention_mask=None):
  with torch.no_grad():
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    return model.float()(torch.tensor(tokens).long(), attention_mask=mask).logits.numpy()


def import_dir(path, **kw):
  config = hf_checkpoint.read_config(str(path))
  reader = hf_checkpoint.SafetensorsReader(str(path))
  cfg = hf_gemma2.model_config_from_hf(config, **kw)
  return cfg, hf_gemma2.params_from_hf(reader, cfg, config["vocab_size"]), reader


def our_logits(cfg, params, tokens):
  return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params},
                                                    jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_match_transformers(tmp_path, name, scan):
  shape = SHAPES[name]
  model = hf_model(tmp_path, seed=len(name), **shape)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, shape["vocab_size"], (2, LENGTH))
  mask = np.ones_like(tokens)
  mask[1, -4:] = 0  # row 1 right-padded: compare its valid positions only
  tokens[1, -4:] = 0
  ref = hf_logits(model, tokens, mask)
  full = hf_logits(model, tokens[:1])  # a padding-free batch
  cfg, params, reader = import_dir(tmp_path, scan_layers=scan)
  assert layout.is_scanned(params) == scan
  ours = our_logits(cfg, params, tokens)
  valid = mask.astype(bool)
  scale = np.abs(ref[valid]).max()
  diff = np.abs(ours[valid] - ref[valid]).max()
  print(f"{name} {'scanned' if scan else 'unscanned'}: max |diff| {diff:.3g}, "
        f"logit scale {scale:.3g}, relative {diff / scale:.3g}")
  assert diff <= 1e-4 * scale
  np.testing.assert_allclose(ours[:1], full, atol=1e-4 * scale, rtol=0)
  # and back: every HF tensor bit for bit
  back = hf_gemma2.params_to_hf(params, cfg, dtype="float32")
  assert set(back) == set(reader)
  for key, value in back.items():
    assert value.dtype == reader[key].dtype and np.array_equal(value, reader[key]), key


def test_bf16_sharded_checkpoint_round_trips_bit_exactly(tmp_path):
  shape = SHAPES["gqa2_scale_embed_over_heads_caps"]
  hf_model(tmp_path, dtype=torch.bfloat16, max_shard_size="20KB", **shape)
  assert os.path.isfile(tmp_path / hf_checkpoint.INDEX)
  cfg, params, reader = import_dir(tmp_path, param_dtype="float32", dtype="bfloat16")
  assert reader.stored_dtype() == "bfloat16" and len(set(reader.dtypes.values())) == 1
  assert params["embedder"]["embedding"].dtype == np.float32
  back = hf_gemma2.params_to_hf(params, cfg, dtype="bfloat16")
  for key, value in back.items():
    assert value.dtype == ml_dtypes.bfloat16
    assert np.array_equal(value.view(np.uint16), reader[key].view(np.uint16)), key
  out = tmp_path / "out"
  hf_checkpoint.write_checkpoint(str(out), {"x": 1}, back, max_shard_bytes=10_000)
  again = hf_checkpoint.SafetensorsReader(str(out))
  assert os.path.isfile(out / hf_checkpoint.INDEX) and set(again) == set(back)
  assert all(np.array_equal(again[k].view(np.uint16), back[k].view(np.uint16)) for k in back)


def test_padded_vocab_rows_are_zero_and_export_drops_them(tmp_path):
  shape = SHAPES["gqa1_scale_head_dim"]
  model = hf_model(tmp_path, **shape)
  cfg, params, reader = import_dir(tmp_path, vocab_size=128)
  assert cfg.vocab_size == 128
  assert not params["embedder"]["embedding"][96:].any()
  tokens = np.arange(2 * LENGTH).reshape(2, LENGTH) % 96
  ours = our_logits(cfg, params, tokens)
  np.testing.assert_allclose(ours[..., :96], hf_logits(model, tokens), atol=1e-4, rtol=0)
  assert not ours[..., 96:].any()  # padded ids: logit 0 (not -inf)
  back = hf_gemma2.params_to_hf(params, cfg, vocab_size=96)
  assert np.array_equal(back[hf_gemma2.EMBED], reader[hf_gemma2.EMBED])
  with pytest.raises(hf_gemma2.HFConversionError, match="smaller than the checkpoint"):
    hf_gemma2.model_config_from_hf(hf_checkpoint.read_config(str(tmp_path)), vocab_size=64)


def test_config_mapping_round_trips():
  hf = transformers.Gemma2Config(**SHAPES["gqa4_explicit_scalar_no_caps"]).to_dict()
  cfg = hf_gemma2.model_config_from_hf(hf)
  assert cfg.attention_pattern == ("local", "local", "global")
  assert (cfg.query_scaling, cfg.query_pre_attn_scalar) == ("head_dim", 20.0)
  assert cfg.attn_logits_soft_cap is None and cfg.final_logit_soft_cap is None
  out = hf_gemma2.hf_config_from_model(cfg, base=hf)
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "layer_types",
              "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
              "final_logit_softcapping", "rms_norm_eps", "bos_token_id", "eos_token_id"):
    assert out[key] == hf[key], key
  transformers.Gemma2Config(**out)  # valid for transformers' strict config
  # 9B-style: the scalar equals head_dim; 27B-style: hidden / heads.
  nine = dict(hf, hidden_size=3584, num_attention_heads=16, head_dim=256,
              query_pre_attn_scalar=256)
  assert hf_gemma2.model_config_from_hf(nine).query_scaling == "head_dim"
  big = dict(nine, hidden_size=4608, num_attention_heads=32, head_dim=128,
             query_pre_attn_scalar=144)
  assert hf_gemma2.model_config_from_hf(big).query_scaling == "embed_over_heads"
  # fields a config.json omits mean transformers' Gemma2Config defaults
  minimal = {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
             "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8}
  two_b = hf_gemma2.model_config_from_hf(minimal)
  assert (two_b.num_kv_heads, two_b.head_dim, two_b.sliding_window_size,
          two_b.attn_logits_soft_cap, two_b.final_logit_soft_cap, two_b.query_scale) == (
              4, 256, 4096, 50.0, 30.0, 256 ** -0.5)
  assert two_b.non_embedding_params() == 2_024_517_888  # Gemma 2 2B
  globals_only = dict(hf, layer_types=["full_attention"] * 3)
  assert hf_gemma2.model_config_from_hf(globals_only).attention_pattern == ("global",)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "RoPE type 'linear'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
     "chunked_attention"),
])
def test_unsupported_configs_are_named(change, message):
  hf = transformers.Gemma2Config(**SHAPES["gqa4_explicit_scalar_no_caps"]).to_dict()
  with pytest.raises(hf_gemma2.HFConversionError, match=message):
    hf_gemma2.model_config_from_hf({**hf, **change})


def _tensors_and_config(tmp_path):
  hf_model(tmp_path, **SHAPES["gqa2_scale_embed_over_heads_caps"])
  return load_file(str(tmp_path / "model.safetensors")), hf_checkpoint.read_config(str(tmp_path))


def _convert(tensors, hf):
  cfg = hf_gemma2.model_config_from_hf(hf)
  return hf_gemma2.params_from_hf(tensors, cfg, hf["vocab_size"], where="HF_DIR",
                                  tied=hf_gemma2.tie_word_embeddings(hf))


def test_missing_tensor_is_named(tmp_path):
  tensors, hf = _tensors_and_config(tmp_path)
  del tensors["model.layers.2.mlp.up_proj.weight"]
  with pytest.raises(CheckpointMismatchError,
                     match=r"model\.layers\.2\.mlp\.up_proj\.weight: missing"):
    _convert(tensors, hf)


def test_wrong_shape_names_tensor_expected_and_found(tmp_path):
  tensors, hf = _tensors_and_config(tmp_path)
  tensors["model.layers.1.self_attn.o_proj.weight"] = np.zeros((48, 31), np.float32)
  with pytest.raises(CheckpointMismatchError) as err:
    _convert(tensors, hf)
  text = str(err.value)
  assert ("model.layers.1.self_attn.o_proj.weight: checkpoint has (48, 31), "
          "config.json expects (48, 32)") in text
  assert "1 problem(s)" in text


def test_config_that_does_not_match_the_weights(tmp_path):
  tensors, hf = _tensors_and_config(tmp_path)
  with pytest.raises(CheckpointMismatchError) as err:
    _convert(tensors, {**hf, "num_key_value_heads": 4})
  text = str(err.value)
  assert "does not match its config.json" in text
  assert ("model.layers.0.self_attn.k_proj.weight: checkpoint has (16, 48), "
          "config.json expects (32, 48)") in text
  with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.3\..*: in the "
                     r"checkpoint but not in config\.json"):
    _convert(tensors, {**hf, "num_hidden_layers": 3, "layer_types": None})


def test_untied_head_must_equal_the_embedding(tmp_path):
  tensors, hf = _tensors_and_config(tmp_path)
  tensors[hf_gemma2.LM_HEAD] = tensors[hf_gemma2.EMBED].copy()
  _convert(tensors, {**hf, "tie_word_embeddings": False})  # equal: fine
  tensors[hf_gemma2.LM_HEAD][0, 0] += 1
  with pytest.raises(hf_gemma2.HFConversionError, match="untied heads are not supported"):
    _convert(tensors, hf)
  del tensors[hf_gemma2.LM_HEAD]
  with pytest.raises(hf_gemma2.HFConversionError, match="no lm_head.weight"):
    _convert(tensors, {**hf, "tie_word_embeddings": False})


def test_reader_errors_name_files(tmp_path):
  with pytest.raises(hf_checkpoint.HFCheckpointError, match="config.json not found"):
    hf_checkpoint.read_config(str(tmp_path))
  with pytest.raises(hf_checkpoint.HFCheckpointError, match="No \\*.safetensors"):
    hf_checkpoint.SafetensorsReader(str(tmp_path))
  (tmp_path / hf_checkpoint.INDEX).write_text(json.dumps(
      {"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(hf_checkpoint.HFCheckpointError, match="model-00001-of-00002"):
    hf_checkpoint.SafetensorsReader(str(tmp_path))
  assert hf_checkpoint.parse_size("10KB") == 10_000
  assert hf_checkpoint.parse_size("2GiB") == 2 * 2**30


def test_restore_converts_layouts_onto_shardings(tmp_path):
  cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=64, sliding_window_size=4)
  rng = np.random.default_rng(0)
  shapes = params_checkpoint.abstract_params(cfg)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)
  params_checkpoint.save(str(tmp_path), params, cfg)
  assert params_checkpoint.read_model_gin(str(tmp_path / "model.gin")) == cfg
  mesh = partitioning.create_mesh({"fsdp": 4, "tensor": 2})
  scanned = dataclasses.replace(cfg, scan_layers=True)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for target in (cfg, scanned):
    abstract = params_checkpoint.abstract_params(target, sharding)
    restored = params_checkpoint.restore_params(str(tmp_path), abstract, target)
    assert layout.is_scanned(restored) == target.scan_layers
    restored = layout.unscan_params(jax.tree.map(np.asarray, restored), cfg)
    jax.tree.map(np.testing.assert_array_equal, restored, params)
  wrong = dataclasses.replace(cfg, mlp_dim=48)
  with pytest.raises(CheckpointMismatchError, match=r"layer_0/mlp/gate: checkpoint has "
                     r"\(32, 64\), model expects \(32, 48\)[\s\S]*model\.gin"):
    params_checkpoint.restore_params(
        str(tmp_path), params_checkpoint.abstract_params(wrong, sharding), wrong)


def test_read_model_gin_ignores_other_bindings(tmp_path):
  (tmp_path / "base.gin").write_text("ModelConfig.num_layers = 2\n")
  (tmp_path / "config.gin").write_text(
      "include 'base.gin'\nD = 32\nRUN_DIR = 'runs/x'\ntrain.run_dir = %RUN_DIR\n"
      "train.model_config = @ModelConfig()\nModelConfig.vocab_size = 64\n"
      "posttrain_jax.ModelConfig.embed_dim = %D\nModelConfig.num_heads = 4\n"
      "ModelConfig.num_kv_heads = 2\nModelConfig.head_dim = 8\n"
      "ModelConfig.mlp_dim = 64\nModelConfig.attention_pattern = (\n"
      "    'local', 'global')\neval/ModelConfig.num_layers = 9\n")
  cfg = params_checkpoint.read_model_gin(str(tmp_path / "config.gin"))
  assert (cfg.embed_dim, cfg.num_layers, cfg.vocab_size) == (32, 2, 64)
  (tmp_path / "bad.gin").write_text("ModelConfig.vocab_size = 64\n")
  with pytest.raises(ValueError, match="does not set ModelConfig.embed_dim"):
    params_checkpoint.read_model_gin(str(tmp_path / "bad.gin"))


def test_layout_functions_invert_each_other():
  cfg = ModelConfig(vocab_size=8, embed_dim=4, num_layers=6, num_heads=1,
                    num_kv_heads=1, head_dim=4, mlp_dim=8,
                    attention_pattern=("local", "local", "global"),
                    sliding_window_size=2, scan_layers=True)
  flat = {"embedder": {"embedding": np.zeros((8, 4))},
          **{f"layer_{i}": {"x": np.full((2,), i)} for i in range(6)}}
  scanned = layout.scan_params(flat, cfg)
  assert sorted(scanned["layers"]) == ["global_2", "local_0", "local_1"]
  np.testing.assert_array_equal(scanned["layers"]["local_1"]["x"][:, 0], [1, 4])
  jax.tree.map(np.testing.assert_array_equal, layout.unscan_params(scanned, cfg), flat)
