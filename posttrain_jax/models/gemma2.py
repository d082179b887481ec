"""Gemma 2 decoder (Gemma Team, 2024, "Gemma 2: Improving Open Language Models
at a Practical Size").

Each block:  x += post_attn_norm(attn(pre_attn_norm(x)));
             x += post_ffw_norm(mlp(pre_ffw_norm(x)))
then a final RMSNorm, the tied embedding as output projection and a final-logit
soft-cap. Layers follow `config.attention_pattern` (local sliding-window /
global), layer 0 first. With `scan_layers` the model scans over groups of
len(attention_pattern) layers (a "local + global" pair for Gemma 2), stacking
their parameters on a leading "layers" axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain_jax.models.attention import Attention, CacheInfo, init_kv_cache
from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.lora import LoraConfig
from posttrain_jax.models.layers import Embedder, FeedForward, RMSNorm, soft_cap

Array = jax.Array

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """One decoder layer with pre- and post-norms around attention and MLP."""

  config: ModelConfig
  attention_type: str
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
               cache=None, cache_info: CacheInfo | None = None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype, name=name)
    h = norm("pre_attention_norm")(x)
    h = Attention(cfg, self.attention_type, self.lora, name="attn")(
        h, positions, segment_ids, cache, cache_info)
    if cache is not None:
      h, cache = h
    x = x + norm("post_attention_norm")(h)
    h = norm("pre_ffw_norm")(x)
    h = FeedForward(cfg.embed_dim, cfg.mlp_dim, cfg.compute_dtype, cfg.weight_dtype,
                    cfg.row_major_gradients, self.lora, name="mlp")(h)
    x = x + norm("post_ffw_norm")(h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x if cache is None else (x, cache)


class BlockGroup(nn.Module):
  """One period of the attention pattern (e.g. a local + global pair); scan body."""

  config: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None, cache_info=None):
    new_cache = None if cache is None else {}
    for i, attention_type in enumerate(self.config.attention_pattern):
      name = f"{attention_type}_{i}"
      block = _block_cls(self.config)(self.config, attention_type, self.lora, name=name)
      if cache is None:
        x = block(x, positions, segment_ids)
      else:
        x, new_cache[name] = block(x, positions, segment_ids, cache[name], cache_info)
    return x, new_cache


def _block_cls(config: ModelConfig):
  if config.remat_policy == "none" or config.scan_layers:
    return Block  # scanned models remat the whole group instead
  return nn.remat(Block, policy=_REMAT_POLICIES[config.remat_policy],
                  prevent_cse=True)


class Transformer(nn.Module):
  """Gemma-2-like decoder returning float32 logits [batch, length, vocab].

  lora: LoRA settings; the low-rank adapters are used wherever they are in
  the applied params (models/lora.py), so without them this is the base model.
  """

  config: ModelConfig
  lora: LoraConfig | None = None

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(cfg.vocab_size, cfg.embed_dim, cfg.compute_dtype,
                             cfg.weight_dtype, cfg.row_major_gradients)
    if cfg.scan_layers:
      group = BlockGroup
      if cfg.remat_policy != "none":
        group = nn.remat(BlockGroup, policy=_REMAT_POLICIES[cfg.remat_policy],
                         prevent_cse=False)
      self.layers = nn.scan(
          group,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
          length=cfg.num_layers // len(cfg.attention_pattern),
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.lora)
    else:
      block = _block_cls(cfg)
      self.blocks = [block(cfg, cfg.attention_type(i), self.lora, name=f"layer_{i}")
                     for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.weight_dtype)

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, return_hidden: bool = False,
               cache=None, cache_info: CacheInfo | None = None,
               last_logits_only: bool = False, hidden_only: bool = False):
    """Forward pass.

    Args:
      tokens: int [batch, length] token ids.
      positions: int [batch, length] RoPE positions (restart at 0 in each packed
        segment); defaults to 0..length-1.
      segment_ids: int [batch, length]; tokens attend only within their segment.
      return_hidden: also return the final-normed hidden states [b, t, d].
      cache: KV cache from `init_cache`; with it (and cache_info) the tokens are
        written at cache_info.index and attend over the cache, and the updated
        cache is returned last.
      last_logits_only: compute logits (and hidden) for the last position only
        (a sampler's prefill needs no more), shape [batch, 1, ...].

    Returns:
      logits, (logits, hidden) with return_hidden, plus the new cache if given.
    """
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = self.embedder.encode(tokens)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    new_cache = None
    if self.config.scan_layers:
      x, new_cache = self.layers(x, positions, segment_ids, cache, cache_info)
    elif cache is None:
      for block in self.blocks:
        x = block(x, positions, segment_ids)
    else:
      new_cache = {}
      for block in self.blocks:
        x, new_cache[block.name] = block(x, positions, segment_ids, cache[block.name],
                                         cache_info)
    if last_logits_only:
      x = x[:, -1:]
    hidden = self.final_norm(x)
    if hidden_only:
      out = (hidden,)
    else:
      logits = self.hidden_to_logits(hidden)
      out = (logits, hidden) if return_hidden else (logits,)
    if cache is not None:
      out += (new_cache,)
    return out if len(out) > 1 else out[0]

  def hidden_to_logits(self, hidden: Array) -> Array:
    """Final-normed hidden states [..., d] -> soft-capped logits [..., vocab]
    (tied unembedding). Use with model.apply(..., method="hidden_to_logits")."""
    logits = soft_cap(self.embedder.decode(hidden), self.config.final_logit_soft_cap)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None):
  """Zero KV cache for every layer, in the layout `Transformer` expects.

  A global layer's cache has `length` slots. A local layer's has
  min(length, sliding_window_size): a ring buffer (attention.write_cache) that
  holds the only keys its next query can see, so a decode step reads window
  instead of length slots there."""
  dtype = dtype or config.compute_dtype

  def one(attention_type):
    slots = length
    if attention_type == "local" and config.sliding_window_size:
      slots = min(length, config.sliding_window_size)
    return init_kv_cache(batch, slots, config.num_kv_heads, config.head_dim, dtype)

  if config.scan_layers:
    groups = config.num_layers // len(config.attention_pattern)
    stack = lambda c: jax.tree.map(lambda a: jnp.broadcast_to(a, (groups,) + a.shape), c)
    return {f"{t}_{i}": stack(one(t)) for i, t in enumerate(config.attention_pattern)}
  return {f"layer_{i}": one(config.attention_type(i)) for i in range(config.num_layers)}
