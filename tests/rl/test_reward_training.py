"""Reward-model training: LP then FT on 8 CPU devices, WARM members, resume, export."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.data.preferences import pairs_to_batch, write_preferences
from posttrain_jax.jobs.train_reward_model import train_reward_model
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl.reward_model import abstract_params, load_reward_fn, read_reward_info

from preference_pairs import easy_pairs, tiny_model_config  # pylint: disable=g-bad-import-order

CFG = tiny_model_config()
DATA = DatasetConfig(task_name="rm_test_prefs", split="train", sequence_length=12,
                     batch_size=8, seed=0)
EVAL = DatasetConfig(task_name="rm_test_prefs", split="validation", sequence_length=12,
                     batch_size=8, shuffle=False, num_epochs=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("rm")
  files = {"train": str(root / "train.jsonl"), "validation": str(root / "val.jsonl")}
  write_preferences(files["train"], easy_pairs(64, 0))
  write_preferences(files["validation"], easy_pairs(16, 1))
  sft = nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
      "params"])
  params_checkpoint.save(str(root / "sft"), sft, CFG)
  return root, files, str(root / "sft"), sft


def run(setup, name, num_steps=10, lr=3e-3, dropout=0.0, data_seed=0, **kw):
  root, files, sft, _ = setup
  kw.setdefault("initial_checkpoint", sft)
  return train_reward_model(
      model_config=CFG, run_dir=str(root / name), num_steps=num_steps,
      train_data=DatasetConfig(**{**DATA.__dict__, "seed": data_seed}), data_files=files,
      linear_probe_steps=4, linear_probe_learning_rate=3e-2,
      optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=1),
      head_dropout=dropout, checkpoint_every=3, log_every=2,
      ici_parallelism={"data": 2, "fsdp": 4}, **kw)


def test_training_learns_easy_preferences_and_exports(setup):
  root, _, _, sft = setup
  result = run(setup, "single", num_steps=24, lr=1e-2, eval_data=EVAL, eval_every=2,
               keep_checkpoints=None)
  first, last = result.eval_metrics[2], result.eval_metrics[24]
  assert first["accuracy"] < 0.9 and last["accuracy"] >= 0.95
  assert last["margin"] > first["margin"] and last["loss"] < first["loss"]
  # linear probing (steps 1-4) leaves the backbone bit-exact
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract_params(CFG))
  saved = params_checkpoint.restore_params(str(root / "single"), abstract, CFG, step=3)
  jax.tree.map(np.testing.assert_array_equal, saved["backbone"], sft)
  assert np.abs(np.asarray(saved["head"]["kernel"])).sum() > 0
  # the exported reward model scores held-out pairs as training reported
  fn = load_reward_fn(result.export_dir)
  batch = pairs_to_batch(easy_pairs(8, 2), 12)
  score = lambda s: fn(*(jnp.asarray(batch[f"{s}_{k}"])
                         for k in ("tokens", "positions", "segment_ids")))
  assert np.mean(np.asarray(score("chosen")) > np.asarray(score("rejected"))) >= 0.9
  # it records the tokenizer of its pairs (the preference task's vocabulary)
  tokenizer = read_reward_info(result.export_dir)["tokenizer"]
  assert tokenizer["path"].endswith("pydoc_sp2k.model") and len(tokenizer["sha256"]) == 64


def test_vocabulary_is_checked_before_any_step(setup):
  root, files, _, _ = setup
  wide = ModelConfig(**{**CFG.__dict__, "vocab_size": 128})
  params_checkpoint.save(str(root / "sft128"), jax.tree.map(
      lambda x: np.zeros(x.shape, x.dtype), params_checkpoint.abstract_params(wide)), wide)
  with pytest.raises(ValueError) as raised:
    run(setup, "vocab", initial_checkpoint=str(root / "sft128"))
  line = str(raised.value)
  assert "\n" not in line and (f"initial_checkpoint {root / 'sft128'} has vocab_size 128 but "
                                "the reward model's ModelConfig.vocab_size is 256") in line
  # the pairs' ids (rejected: 200-219) against a 200-token reward model, at step 1
  narrow = ModelConfig(**{**CFG.__dict__, "vocab_size": 200})
  with pytest.raises(ValueError, match=r"'rejected_tokens' contains token id 2\d\d, outside "
                                       r"\[0, vocab_size=200\)"):
    train_reward_model(model_config=narrow, run_dir=str(root / "ids"), num_steps=2,
                       train_data=DATA, data_files=files, initial_checkpoint=None,
                       allow_random_init=True, ici_parallelism={"data": 8})
  assert not [n for n in os.listdir(root / "ids" / "checkpoints") if n.isdigit()]


def test_warm_members_share_the_linear_probe_head(setup):
  a = run(setup, "member0", num_steps=6, lr=3e-3, dropout=0.0, data_seed=0, seed=0)
  b = run(setup, "member1", num_steps=6, lr=1e-3, dropout=0.2, data_seed=1, seed=1)
  assert a.linear_probe_head is not None and np.abs(a.linear_probe_head).sum() > 0
  np.testing.assert_array_equal(a.linear_probe_head, b.linear_probe_head)
  assert a.losses[6] != b.losses[6]  # they differ once fine-tuning starts


def test_resumed_run_matches_uninterrupted_run(setup):
  full = run(setup, "full", num_steps=8, dropout=0.1)
  run(setup, "split", num_steps=5, dropout=0.1)   # checkpoint at 3 and 5
  resumed = run(setup, "split", num_steps=8, dropout=0.1)
  assert resumed.resumed_from == 5
  for step in (6, 7, 8):
    np.testing.assert_allclose(resumed.losses[step], full.losses[step], rtol=1e-5)


def test_backbone_initialisation_is_required(setup):
  with pytest.raises(ValueError, match="needs initial_checkpoint"):
    run(setup, "noinit", initial_checkpoint=None)
  with pytest.raises(ValueError, match="linear_probe_steps"):
    run(setup, "bad", num_steps=2)


def test_warm_gin_files_configure_the_job():
  import gin
  from posttrain_jax import cli, main
  main.register_configurables()
  seen = set()
  try:
    for m in range(4):
      gin.clear_config()
      cli.configure(cli.parse_flags([f"--gin_file=experiments/warm/member_{m}.gin"]))
      assert cli.call(gin.get_configurable("posttrain_jax.job")) == "train_reward_model"
      lr = gin.get_configurable("posttrain_jax.OptimizerConfig")().learning_rate
      with gin.config_scope("rm_train"):
        data_seed = gin.get_configurable("posttrain_jax.DatasetConfig")().seed
      assert data_seed == m
      seen.add((lr, data_seed))
      # the linear-probe settings are the same for every member
      assert gin.query_parameter("train_reward_model.linear_probe_seed") == 0
      assert gin.query_parameter("train_reward_model.linear_probe_learning_rate") == 1e-2
    assert len({lr for lr, _ in seen}) == 4
    gin.clear_config()
    with pytest.raises(cli.ConfigError, match="Required macro"):
      cli.configure(cli.parse_flags(["--gin_file=experiments/warm/warm_member.gin"]))
  finally:
    gin.clear_config()
