"""Small RL runs (random SFT model, fixed prompts, a toy reward) shared by the
tests of the train_policy job and of its Streaming DiLoCo form."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.jobs.train_policy import train_policy
from posttrain_jax.models import ModelConfig, Transformer, params_checkpoint
from posttrain_jax.rl import rewards

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=8)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0,
                      decay_steps=4)  # same schedule whatever num_steps (resume test)


def low_ids_reward(tokens, mask):
  """Fraction of response tokens with id < 32 (varies between samples)."""
  m = mask.astype(jnp.float32)
  return jnp.sum(m * (tokens < 32), -1) / jnp.maximum(jnp.sum(m, -1), 1.0)


rewards.register("test_low_ids", low_ids_reward)


class FixedPrompts:
  """Deterministic resumable prompts: batch i holds ids derived from i."""

  def __init__(self, batch_size=4, length=5):
    self.batch_size, self.length, self.position = batch_size, length, 0

  def __next__(self):
    i = self.position
    self.position += 1
    lengths = 1 + (np.arange(self.batch_size) + i) % self.length
    prompts = np.zeros((self.batch_size, self.length), np.int32)
    for r, n in enumerate(lengths):
      prompts[r, self.length - n:] = 3 + (7 * i + 5 * r + np.arange(n)) % 60
    return {"prompts": prompts, "prompt_lengths": lengths.astype(np.int32)}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def save_random_model(path, cfg):
  params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params_checkpoint.save(path, nn.unbox(params), cfg)
  return path


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  return save_random_model(str(tmp_path_factory.mktemp("sft") / "model"), CFG)


def run(run_dir, sft_dir, num_steps, **kw):
  kw = {"reward": "test_low_ids", "samples_per_prompt": 2,
        "max_new_tokens": 6, "temperature": 1.0, "beta": 0.1, "ema_rate": 0.5,
        "optimizer": OPT, "log_every": 1, "checkpoint_every": 2,
        "async_checkpointing": False, "prompt_source": FixedPrompts(), **kw}
  return train_policy(model_config=CFG, run_dir=str(run_dir), initial_checkpoint=sft_dir,
                      num_steps=num_steps, **kw)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@functools.lru_cache(maxsize=None)
def sft_leaves(path):
  return leaves(params_checkpoint.load_numpy_params(path, CFG))
