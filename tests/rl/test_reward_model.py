"""RewardModel: last non-pad token, padding invariance, param tree, model dirs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl.reward_model import (RewardModel, abstract_params, is_reward_model,
                                        load_reward_fn, restore_reward_params,
                                        save_reward_model)

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)


def random_params(seed=0, dropout=0.0):
  model = RewardModel(CFG, dropout)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])
  head = jax.random.normal(jax.random.key(seed + 1), params["head"]["kernel"].shape)
  return dict(params, head={"kernel": head})


def test_score_is_the_head_on_the_last_real_token():
  params = random_params()
  tokens = jnp.array([[5, 6, 7, 0, 0], [9, 8, 7, 6, 5]], jnp.int32)
  segments = (tokens > 0).astype(jnp.int32).at[1].set(1)
  scores = RewardModel(CFG).apply({"params": params}, tokens, None, segments)
  _, hidden = Transformer(CFG).apply({"params": params["backbone"]}, tokens,
                                     segment_ids=segments, return_hidden=True)
  kernel = params["head"]["kernel"][:, 0]
  np.testing.assert_allclose(scores, [hidden[0, 2] @ kernel, hidden[1, 4] @ kernel],
                             rtol=1e-5)
  # trailing padding does not change the score
  padded = jnp.pad(tokens, ((0, 0), (0, 3)))
  again = RewardModel(CFG).apply({"params": params}, padded, None,
                                 jnp.pad(segments, ((0, 0), (0, 3))))
  np.testing.assert_allclose(again, scores, rtol=1e-5)


def test_param_tree_and_logical_axes():
  boxed = RewardModel(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  assert set(boxed) == {"backbone", "head"}
  assert nn.get_partition_spec(boxed)["head"]["kernel"] == jax.sharding.PartitionSpec(
      "embed", None)
  backbone = Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  assert (jax.tree.structure(nn.unbox(boxed["backbone"]))
          == jax.tree.structure(nn.unbox(backbone)))
  assert float(jnp.abs(nn.unbox(boxed)["head"]["kernel"]).sum()) == 0.0  # zero init


def test_dropout_only_when_not_deterministic():
  params = random_params(dropout=0.5)
  model = RewardModel(CFG, head_dropout=0.5)
  tokens = jnp.arange(1, 9, dtype=jnp.int32).reshape(2, 4)
  a = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(a, RewardModel(CFG).apply({"params": params}, tokens))
  b = model.apply({"params": params}, tokens, deterministic=False,
                  rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, b)


def test_save_and_load_reward_fn_on_a_sharded_mesh(tmp_path):
  params = random_params()
  save_reward_model(str(tmp_path / "rm"), params, CFG, head_dropout=0.1)
  assert is_reward_model(str(tmp_path / "rm"))
  mesh = partitioning.create_mesh({"fsdp": 4, "data": 2})
  fn = load_reward_fn(str(tmp_path / "rm"), mesh)
  tokens = jnp.tile(jnp.arange(1, 9, dtype=jnp.int32), (8, 1))
  positions = jnp.broadcast_to(jnp.arange(8), (8, 8))
  segments = jnp.ones((8, 8), jnp.int32)
  expected = RewardModel(CFG).apply({"params": params}, tokens, positions, segments)
  np.testing.assert_allclose(fn(tokens, positions, segments), expected, rtol=1e-5)
  # the pure apply works inside another jit
  np.testing.assert_allclose(jax.jit(fn.apply)(fn.params, tokens, positions, segments),
                             expected, rtol=1e-5)


def test_a_policy_directory_is_not_a_reward_model(tmp_path):
  backbone = random_params()["backbone"]
  params_checkpoint.save(str(tmp_path / "policy"), backbone, CFG)
  with pytest.raises(ValueError, match="not a reward model directory"):
    restore_reward_params(str(tmp_path / "policy"), abstract_params(CFG), CFG)


def test_a_reward_model_fits_a_policy_of_its_vocabulary_and_tokenizer(tmp_path):
  import os  # pylint: disable=g-import-not-at-top
  from posttrain_jax import data  # pylint: disable=g-import-not-at-top  # (no TF: not data.vocab)
  from posttrain_jax.rl import reward_model  # pylint: disable=g-import-not-at-top
  DEFAULT_VOCAB_PATH = os.path.join(os.path.dirname(data.__file__), "vocab", "pydoc_sp2k.model")
  shipped = reward_model.tokenizer_record(DEFAULT_VOCAB_PATH)
  assert len(shipped["sha256"]) == 64 and shipped["path"] == DEFAULT_VOCAB_PATH
  rm = str(tmp_path / "rm")
  save_reward_model(rm, random_params(), CFG, info={"tokenizer": shipped})
  assert reward_model.recorded_tokenizer(rm) == shipped
  reward_model.check_fits_policy(rm, 64, shipped)     # same vocabulary and tokenizer
  reward_model.check_fits_policy(rm, 64, None)        # the policy records none
  with pytest.raises(ValueError, match="has vocab_size 64 but the policy has vocab_size "
                                       "2048: it cannot score"):
    reward_model.check_fits_policy(rm, 2048, shipped)
  other = {"path": "/x/gemma.model", "sha256": "cd" * 32}
  with pytest.raises(ValueError, match=r"but the policy uses /x/gemma.model \(sha256 "
                                       r"cdcdcdcdcdcd\): the same ids are different text"):
    reward_model.check_fits_policy(rm, 64, other)
  # an imported (HF) model directory records its tokenizer.model
  policy = tmp_path / "policy"
  params_checkpoint.save(str(policy), random_params()["backbone"], CFG)
  (policy / "hf_files").mkdir()
  (policy / "hf_files" / "tokenizer.model").write_bytes(open(DEFAULT_VOCAB_PATH, "rb").read())
  assert reward_model.recorded_tokenizer(str(policy))["sha256"] == shipped["sha256"]
