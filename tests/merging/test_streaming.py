"""Leaf-by-leaf merges from orbax checkpoints equal the in-memory merges; bad input."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax import merging
from posttrain_jax.merging import leafwise, streaming
from posttrain_jax.models import ModelConfig, params_checkpoint
from posttrain_jax.rl.reward_model import RewardModel, is_reward_model, save_reward_model

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)


@functools.cache
def _base():
  init = jax.jit(lambda k: RewardModel(CFG).init(k, jnp.zeros((1, 1), jnp.int32))["params"])
  return jax.tree.map(np.asarray, nn.unbox(init(jax.random.key(0))))


def rm(seed, scale=0.05):
  """A fine-tuning of the seed-0 reward model: init + small seeded noise."""
  p = _base()
  if seed == 0:
    return p
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (x + scale * rng.normal(size=x.shape)).astype(x.dtype), p)


RULES = {
    "average": lambda: (leafwise.weighted_mean_rule([0.2, 0.3, 0.5]), False),
    "ties": lambda: (merging.ties_rule(0.3, 0.8), True),
    "dare": lambda: (merging.dare_rule(0.5, np.array([1.0, 1.0, 1.0]), 7), True),
}  # task arithmetic and model stock: the same machinery, see the next test


def test_streaming_equals_in_memory_for_every_method(tmp_path, monkeypatch):
  init, models = rm(0), [rm(i) for i in (1, 2, 3)]
  save_reward_model(str(tmp_path / "init"), init, CFG)
  dirs = [str(tmp_path / f"rm{i}") for i in range(3)]
  for d, p in zip(dirs, models):
    save_reward_model(d, p, CFG)
  reads = []
  real_read = streaming.read_tensor
  monkeypatch.setattr(streaming, "read_tensor",
                      lambda *a: reads.append(a[1]) or real_read(*a))
  n_leaves = len(jax.tree.leaves(init))
  for name, make in RULES.items():
    rule, uses_init = make()
    reads.clear()
    streamed = merging.stream_merge(rule, dirs, str(tmp_path / "init") if uses_init else None)
    in_memory = merging.merge_leaves(rule, models, init if uses_init else None)
    jax.tree.map(np.testing.assert_array_equal, streamed, in_memory)
    # one tensor at a time: every tensor of every checkpoint read exactly once
    assert len(reads) == n_leaves * (3 + uses_init), name
  # the public tree merges are these rules
  jax.tree.map(np.testing.assert_array_equal,
               merging.merge_leaves(merging.ties_rule(0.3, 0.8), models, init),
               merging.ties(init, models, density=0.3, lam=0.8))
  jax.tree.map(np.testing.assert_array_equal,
               merging.merge_leaves(merging.dare_rule(0.5, np.ones(3), 7), models, init),
               merging.dare(init, models, drop=0.5, lambdas=1.0, seed=7))


def test_stream_merge_dirs_writes_reward_models_and_policies(tmp_path):
  init, models = rm(0), [rm(i) for i in (1, 2)]
  save_reward_model(str(tmp_path / "init"), init, CFG)
  dirs = [str(tmp_path / f"rm{i}") for i in range(2)]
  for d, p in zip(dirs, models):
    save_reward_model(d, p, CFG)
  out = merging.stream_merge_dirs(merging.model_stock_rule(), dirs, str(tmp_path / "ms"),
                                  {"merge": "model_stock"}, init=str(tmp_path / "init"))
  assert out.is_reward_model and is_reward_model(str(tmp_path / "ms"))
  written = merging.load_models([str(tmp_path / "ms")])[0].params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               written, merging.model_stock(init, models))
  # policies: a policy directory out; a training run's params would work alike
  pol = [rm(s)["backbone"] for s in range(3)]  # a policy's tree is an RM's backbone
  for i, p in enumerate(pol):
    params_checkpoint.save(str(tmp_path / f"p{i}"), p, CFG)
  merging.stream_merge_dirs(merging.task_arithmetic_rule(np.array([0.5, 0.5])),
                            [str(tmp_path / "p1"), str(tmp_path / "p2")],
                            str(tmp_path / "pm"), {"merge": "task_arithmetic"},
                            init=str(tmp_path / "p0"))
  assert not is_reward_model(str(tmp_path / "pm"))
  got = params_checkpoint.load_numpy_params(str(tmp_path / "pm"), CFG)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, merging.task_arithmetic(pol[0], pol[1:], 0.5))


def test_mismatched_architectures_kinds_and_shapes_are_rejected(tmp_path):
  save_reward_model(str(tmp_path / "a"), rm(0), CFG)
  other = ModelConfig(**{**CFG.__dict__, "mlp_dim": 48})
  big = nn.unbox(jax.jit(lambda k: RewardModel(other).init(k, jnp.zeros((1, 1), jnp.int32))[
      "params"])(jax.random.key(0)))
  save_reward_model(str(tmp_path / "big"), big, other)
  rule = merging.task_arithmetic_rule(np.array([1.0]))
  with pytest.raises(ValueError, match="different architectures.*mlp_dim: 32 vs 48"):
    merging.stream_merge_dirs(rule, [str(tmp_path / "big")], str(tmp_path / "o"), {},
                              init=str(tmp_path / "a"))
  params_checkpoint.save(str(tmp_path / "pol"), rm(0)["backbone"], CFG)
  with pytest.raises(ValueError, match="reward models with policies"):
    merging.stream_merge_dirs(rule, [str(tmp_path / "a")], str(tmp_path / "o"), {},
                              init=str(tmp_path / "pol"))
  # the checkpoints' tensors themselves (e.g. scanned vs unscanned layouts)
  with pytest.raises(ValueError, match=r"Cannot merge: .*big.*differ.*mlp.*\(16, 48\)"):
    merging.stream_merge(rule, [str(tmp_path / "big")], init=str(tmp_path / "a"))
  assert not (tmp_path / "o").exists()
