"""Linearly separable preference pairs shared by the reward-model and DPO tests."""

import numpy as np


def easy_pairs(n, seed):
  """Chosen responses use tokens 100-119, rejected ones 200-219: linearly separable."""
  rng = np.random.default_rng(seed)
  return [{"prompt": rng.integers(3, 50, size=4).tolist(),
           "chosen": rng.integers(100, 120, size=rng.integers(2, 6)).tolist(),
           "rejected": rng.integers(200, 220, size=rng.integers(2, 6)).tolist()}
          for _ in range(n)]


def tiny_model_config():
  """The tiny Transformer of the preference tests (ids of easy_pairs < 256)."""
  from posttrain_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  return ModelConfig(vocab_size=256, embed_dim=16, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=8, mlp_dim=32, sliding_window_size=8)
