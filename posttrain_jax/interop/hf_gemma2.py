"""Hugging Face `Gemma2ForCausalLM` <-> posttrain_jax Gemma 2: configs and weights.

Pure functions over plain dicts and numpy arrays (no torch, no files):

  model_config_from_hf(config.json dict)   -> ModelConfig
  hf_config_from_model(ModelConfig, ...)   -> config.json dict
  params_from_hf(tensors, ModelConfig, V)  -> our parameter tree (numpy)
  params_to_hf(params, ModelConfig, V)     -> {HF tensor name: numpy array}

Weight mapping (HF `nn.Linear` weights are [out, in]; H heads, K kv heads):

  model.embed_tokens.weight [V, d]                -> embedder/embedding [V', d]
  model.layers.i.input_layernorm.weight           -> layer_i/pre_attention_norm/scale
  model.layers.i.post_attention_layernorm.weight  -> layer_i/post_attention_norm/scale
  model.layers.i.pre_feedforward_layernorm.weight -> layer_i/pre_ffw_norm/scale
  model.layers.i.post_feedforward_layernorm.weight-> layer_i/post_ffw_norm/scale
  model.layers.i.self_attn.q_proj.weight [H*hd, d]-> layer_i/attn/q [d, H, hd]
  model.layers.i.self_attn.k_proj.weight [K*hd, d]-> layer_i/attn/k [d, K, hd] (v alike)
  model.layers.i.self_attn.o_proj.weight [d, H*hd]-> layer_i/attn/o [H, hd, d]
  model.layers.i.mlp.{gate,up}_proj.weight [f, d] -> layer_i/mlp/{gate,up} [d, f]
  model.layers.i.mlp.down_proj.weight [d, f]      -> layer_i/mlp/down [f, d]
  model.norm.weight                               -> final_norm/scale

Both sides use RMSNorm with a (1 + w) scale, rotate-half RoPE, query head j
reading kv head j // (H / K), and the tied embedding as output projection, so
every tensor maps by a transpose and a reshape: no permutation, bit-exact.
With scan_layers the layers are stacked (see models/layout.py).

Vocabulary: HF Gemma 2 checkpoints hold V = 256,000 rows; `vocab_size` may pad
the table with zero rows (e.g. to 256,128). A padded id's logit is then 0 before
the final soft-cap, not -inf: it keeps a small probability until training
pushes it down. Export drops the padding rows again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.core.checkpointing import check_compatible
from posttrain_jax.models import layout
from posttrain_jax.models.config import ModelConfig

HF_MODEL_TYPE = "gemma2"
HF_ARCHITECTURE = "Gemma2ForCausalLM"
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}
_HF_LAYER_TYPES = {v: k for k, v in _LAYER_TYPES.items()}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # both the tanh approximation
_NORMS = (("input_layernorm", "pre_attention_norm"),
          ("post_attention_layernorm", "post_attention_norm"),
          ("pre_feedforward_layernorm", "pre_ffw_norm"),
          ("post_feedforward_layernorm", "post_ffw_norm"))
# transformers' Gemma2Config defaults: what a config.json that omits a field means.
_GEMMA2_DEFAULTS = {
    "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
    "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
# Defaults for config.json fields ModelConfig does not carry (HF Gemma 2 values).
_HF_DEFAULTS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
                "max_position_embeddings": 8192, "initializer_range": 0.02,
                "use_cache": True, "attention_dropout": 0.0}


class HFConversionError(ValueError):
  """A Hugging Face config or checkpoint that cannot be converted."""


def _period(types: list[str]) -> int:
  """Smallest p with types[i] == types[i % p] for all i."""
  for p in range(1, len(types) + 1):
    if all(t == types[i % p] for i, t in enumerate(types)):
      return p
  return len(types)


def model_config_from_hf(hf: Mapping[str, Any], *, vocab_size: int | None = None,
                         dtype: str = "float32", param_dtype: str = "float32",
                         scan_layers: bool = False,
                         remat_policy: str = "none") -> ModelConfig:
  """ModelConfig equivalent to a Gemma2ForCausalLM config.json.

  Args:
    hf: the parsed config.json.
    vocab_size: rows of our embedding table; None keeps HF's vocab_size,
      a larger value pads with zero rows (see the module docstring).
    dtype / param_dtype / scan_layers / remat_policy: our numerics and layout.
  Raises HFConversionError naming every unsupported or missing field.
  """
  if hf.get("model_type") != HF_MODEL_TYPE:
    raise HFConversionError(
        f"config.json has model_type {hf.get('model_type')!r}; only "
        f"{HF_MODEL_TYPE!r} ({HF_ARCHITECTURE}) checkpoints are supported.")
  required = ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads")
  missing = [k for k in required if hf.get(k) is None]
  if missing:
    raise HFConversionError(f"config.json lacks {', '.join(missing)}.")
  hf = {**_GEMMA2_DEFAULTS, **hf}  # an explicit null (e.g. no soft-cap) stays None
  problems = []
  layers, heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
  act = hf["hidden_activation"]  # transformers' Gemma 2 ignores the older hidden_act
  if act not in _GELU_TANH:
    problems.append(f"hidden_activation {act!r} (supported: {', '.join(_GELU_TANH)})")
  if hf.get("attention_bias"):
    problems.append("attention_bias=true (Gemma 2 has no attention biases)")
  if hf.get("use_bidirectional_attention"):
    problems.append("use_bidirectional_attention=true (the decoder is causal)")
  rope = dict(hf.get("rope_parameters") or {})
  rope_type = rope.get("rope_type") or (hf.get("rope_scaling") or {}).get(
      "rope_type", "default")
  if rope_type != "default":
    problems.append(f"RoPE type {rope_type!r} (only 'default' is supported)")
  types = list(hf.get("layer_types") or [
      "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
  unknown = sorted({t for t in types if t not in _LAYER_TYPES})
  if unknown:
    problems.append(f"layer_types {unknown} (supported: {sorted(_LAYER_TYPES)})")
  elif len(types) != layers:
    problems.append(f"{len(types)} layer_types for num_hidden_layers={layers}")
  hf_vocab = int(hf["vocab_size"])
  if vocab_size is not None and vocab_size < hf_vocab:
    problems.append(f"vocab_size {vocab_size} is smaller than the checkpoint's "
                    f"{hf_vocab} rows (only padding is supported)")
  if problems:
    raise HFConversionError("Unsupported Gemma 2 config.json: " + "; ".join(problems) + ".")
  hidden = int(hf["hidden_size"])
  head_dim = int(hf["head_dim"])
  pattern = tuple(_LAYER_TYPES[t] for t in types[:_period(types)])
  scalar = float(hf["query_pre_attn_scalar"])
  if scalar == head_dim:
    scaling, override = "head_dim", None
  elif scalar == hidden / heads:
    scaling, override = "embed_over_heads", None
  else:
    scaling, override = "head_dim", scalar
  window = hf.get("sliding_window")
  caps = [hf.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")]
  try:
    return ModelConfig(
        vocab_size=int(vocab_size or hf_vocab), embed_dim=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=int(hf["num_key_value_heads"]),
        head_dim=head_dim, mlp_dim=int(hf["intermediate_size"]),
        attention_pattern=pattern,
        sliding_window_size=int(window) if window else None,
        query_scaling=scaling, query_pre_attn_scalar=override,
        attn_logits_soft_cap=None if caps[0] is None else float(caps[0]),
        final_logit_soft_cap=None if caps[1] is None else float(caps[1]),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        rms_norm_eps=float(hf["rms_norm_eps"]), dtype=dtype,
        param_dtype=param_dtype, scan_layers=scan_layers, remat_policy=remat_policy)
  except ValueError as e:
    raise HFConversionError(f"config.json gives an invalid model: {e}") from e


def tie_word_embeddings(hf: Mapping[str, Any]) -> bool:
  return bool(hf.get("tie_word_embeddings", True))


def _number(x: float) -> float | int:
  """Integral values as int (HF declares query_pre_attn_scalar an int)."""
  return int(x) if float(x).is_integer() else float(x)


def hf_config_from_model(cfg: ModelConfig, *, vocab_size: int | None = None,
                         dtype: str = "float32",
                         base: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """config.json for `cfg`; fields ModelConfig lacks come from `base` (the
  imported checkpoint's config.json) or HF's Gemma 2 defaults."""
  if vocab_size is not None and vocab_size > cfg.vocab_size:
    raise HFConversionError(f"Export vocab_size {vocab_size} exceeds the model's "
                            f"{cfg.vocab_size}.")
  out = dict(_HF_DEFAULTS)
  out.update(base or {})
  scalar = (cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None
            else cfg.query_scale ** -2)
  rope = dict(out.get("rope_parameters") or {})
  rope.update(rope_theta=float(cfg.rope_base), rope_type="default")
  out.update(
      architectures=[HF_ARCHITECTURE], model_type=HF_MODEL_TYPE,
      vocab_size=int(vocab_size or cfg.vocab_size), hidden_size=cfg.embed_dim,
      intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, hidden_activation=_GELU_TANH[0],
      rms_norm_eps=float(cfg.rms_norm_eps), rope_parameters=rope,
      query_pre_attn_scalar=_number(round(scalar, 6)),
      sliding_window=cfg.sliding_window_size,
      layer_types=[_HF_LAYER_TYPES[cfg.attention_type(i)] for i in range(cfg.num_layers)],
      attn_logit_softcapping=(None if cfg.attn_logits_soft_cap is None
                              else float(cfg.attn_logits_soft_cap)),
      final_logit_softcapping=(None if cfg.final_logit_soft_cap is None
                               else float(cfg.final_logit_soft_cap)),
      tie_word_embeddings=True, attention_bias=False, dtype=dtype)
  for key, value in (("rope_theta", float(cfg.rope_base)),
                     ("hidden_act", _GELU_TANH[0]), ("torch_dtype", dtype)):
    if key in out:  # older configs spell these differently; keep them in step
      out[key] = value
  out.pop("rope_scaling", None)
  return out


def hf_shapes(cfg: ModelConfig, hf_vocab_size: int) -> dict[str, tuple[int, ...]]:
  """Shape of every tensor a tied Gemma2ForCausalLM checkpoint holds."""
  d, h, k, hd, f = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                    cfg.mlp_dim)
  shapes = {EMBED: (hf_vocab_size, d), FINAL_NORM: (d,)}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    for hf_name, _ in _NORMS:
      shapes[f"{p}{hf_name}.weight"] = (d,)
    shapes.update({
        f"{p}self_attn.q_proj.weight": (h * hd, d),
        f"{p}self_attn.k_proj.weight": (k * hd, d),
        f"{p}self_attn.v_proj.weight": (k * hd, d),
        f"{p}self_attn.o_proj.weight": (d, h * hd),
        f"{p}mlp.gate_proj.weight": (f, d),
        f"{p}mlp.up_proj.weight": (f, d),
        f"{p}mlp.down_proj.weight": (d, f)})
  return shapes


def _found_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  shapes = getattr(tensors, "shapes", None)  # lazy readers know shapes up front
  if shapes is None:
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
  return {k: tuple(v) for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq")}


def check_hf_tensors(tensors: Mapping[str, Any], cfg: ModelConfig, hf_vocab_size: int,
                     where: str) -> None:
  """Raises CheckpointMismatchError naming each missing, extra or mis-shaped tensor."""
  expected = hf_shapes(cfg, hf_vocab_size)
  found = _found_shapes(tensors)
  if LM_HEAD in found:
    expected[LM_HEAD] = expected[EMBED]
  sds = lambda shapes: {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
  check_compatible(
      sds(found), sds(expected), where, against="its config.json",
      expected_by="config.json expects",
      fix="Fix: use the config.json the weights were saved with (a tensor's "
          "shape follows from hidden_size, intermediate_size, num_attention_heads, "
          "num_key_value_heads, head_dim, vocab_size and num_hidden_layers).")


def params_from_hf(tensors: Mapping[str, Any], cfg: ModelConfig, hf_vocab_size: int,
                   where: str = "the Hugging Face checkpoint",
                   tied: bool = True) -> dict[str, Any]:
  """Our parameter tree (numpy, cfg.param_dtype, cfg's layout) from HF tensors.

  `tensors` maps HF names to arrays; a lazy mapping may expose `.shapes` so
  shapes are checked before any tensor is read. `tied` is config.json's
  tie_word_embeddings: an untied checkpoint converts only when its
  lm_head.weight equals the embedding.
  """
  if cfg.vocab_size < hf_vocab_size:
    raise HFConversionError(f"ModelConfig.vocab_size {cfg.vocab_size} is smaller "
                            f"than the checkpoint's {hf_vocab_size} rows.")
  check_hf_tensors(tensors, cfg, hf_vocab_size, where)
  dt = cfg.weight_dtype
  get = lambda name: np.asarray(tensors[name]).astype(dt)
  d, h, k, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  embed = get(EMBED)
  has_head = LM_HEAD in _found_shapes(tensors)
  if not tied and not has_head:
    raise HFConversionError(f"{where}: config.json sets tie_word_embeddings=false "
                            f"but the checkpoint has no {LM_HEAD}.")
  if has_head and not np.array_equal(
      np.asarray(tensors[LM_HEAD]), np.asarray(tensors[EMBED])):
    raise HFConversionError(
        f"{where}: {LM_HEAD} differs from {EMBED}; posttrain_jax's Gemma 2 ties "
        "the output projection to the embedding, so untied heads are not supported.")
  if cfg.vocab_size > hf_vocab_size:
    embed = np.concatenate(
        [embed, np.zeros((cfg.vocab_size - hf_vocab_size, d), dt)], axis=0)
  params = {"embedder": {"embedding": embed},
            "final_norm": {"scale": get(FINAL_NORM)}}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    w = lambda name: get(f"{p}{name}.weight")
    layer = {ours: {"scale": w(theirs)} for theirs, ours in _NORMS}
    layer["attn"] = {
        "q": w("self_attn.q_proj").T.reshape(d, h, hd),
        "k": w("self_attn.k_proj").T.reshape(d, k, hd),
        "v": w("self_attn.v_proj").T.reshape(d, k, hd),
        "o": w("self_attn.o_proj").T.reshape(h, hd, d)}
    layer["mlp"] = {"gate": w("mlp.gate_proj").T, "up": w("mlp.up_proj").T,
                    "down": w("mlp.down_proj").T}
    params[f"layer_{i}"] = jax.tree.map(np.ascontiguousarray, layer)
  return layout.scan_params(params, cfg) if cfg.scan_layers else params


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig, *,
                 vocab_size: int | None = None,
                 dtype: str | None = None) -> dict[str, np.ndarray]:
  """HF tensors (tied: no lm_head.weight) from our parameters in either layout.

  vocab_size: rows to keep (drops padding rows); dtype: output dtype name
  (default: the parameters' dtype).
  """
  params = layout.unscan_params(jax.tree.map(np.asarray, dict(params)), cfg)
  vocab = int(vocab_size or cfg.vocab_size)
  if vocab > cfg.vocab_size:
    raise HFConversionError(f"Export vocab_size {vocab} exceeds the model's "
                            f"{cfg.vocab_size}.")
  d, h, hd = cfg.embed_dim, cfg.num_heads, cfg.head_dim
  out = {EMBED: params["embedder"]["embedding"][:vocab],
         FINAL_NORM: params["final_norm"]["scale"]}
  for i in range(cfg.num_layers):
    p, layer = f"model.layers.{i}.", params[f"layer_{i}"]
    attn, mlp = layer["attn"], layer["mlp"]
    for theirs, ours in _NORMS:
      out[f"{p}{theirs}.weight"] = layer[ours]["scale"]
    out.update({
        f"{p}self_attn.q_proj.weight": attn["q"].reshape(d, -1).T,
        f"{p}self_attn.k_proj.weight": attn["k"].reshape(d, -1).T,
        f"{p}self_attn.v_proj.weight": attn["v"].reshape(d, -1).T,
        f"{p}self_attn.o_proj.weight": attn["o"].reshape(h * hd, d).T,
        f"{p}mlp.gate_proj.weight": mlp["gate"].T,
        f"{p}mlp.up_proj.weight": mlp["up"].T,
        f"{p}mlp.down_proj.weight": mlp["down"].T})
  dt = None if dtype is None else jnp.dtype(dtype)
  return {k: np.ascontiguousarray(v if dt is None else v.astype(dt))
          for k, v in out.items()}
