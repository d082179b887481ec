"""A tiny conditional LM, its params and a CFG batch of its own samples: shared by
the CFG-distillation and quality-diversity tests."""

import functools

import jax
import jax.numpy as jnp

from posttrain_jax.distillation import cfg as cfg_lib
from posttrain_jax.inference.sampling import SamplingConfig, generate
from posttrain_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)
MODEL = Transformer(CFG)
NULL = (1,)
PROMPTS = [[5, 6, 7], [9, 10]]


@functools.lru_cache(maxsize=None)
def params(seed=0):
  p = jax.jit(MODEL.init)(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)


@functools.lru_cache(maxsize=None)
def batch():
  prompts = jnp.asarray([[0] * (3 - len(p)) + p for p in PROMPTS], jnp.int32)
  lengths = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)
  sample = jax.jit(functools.partial(generate, MODEL, config=SamplingConfig(
      max_new_tokens=5, eos_id=None)))(params(), prompts, lengths, jax.random.key(1))
  return cfg_lib.cfg_batch(sample, NULL)
