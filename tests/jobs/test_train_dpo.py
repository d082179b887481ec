"""The train_dpo job on 8 CPU devices: it learns easy pairs, a resumed run
continues exactly, precomputed reference values survive the resume, the gin files
configure it, bad input gives one clear error."""

import os

import gin
import jax
import numpy as np
import pytest

from posttrain_jax import cli, main
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.data.preferences import write_preferences
from posttrain_jax.jobs.train_dpo import train_dpo
from posttrain_jax.rl.dpo import METRICS
from posttrain_jax.rl.dpo_training import ReferenceCache

from policy_runs import save_random_model  # pylint: disable=g-bad-import-order
from preference_pairs import easy_pairs, tiny_model_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = tiny_model_config()
TRAIN = DatasetConfig(task_name="dpo_test_prefs", split="train", sequence_length=12,
                      batch_size=8, seed=0)
EVAL = DatasetConfig(task_name="dpo_test_prefs", split="train", sequence_length=12,
                     batch_size=8, shuffle=False, num_epochs=1)
# the same schedule whatever num_steps, so a 5-step run resumed to 8 steps can
# match an 8-step run
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0, decay_steps=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("dpo")
  files = {"train": str(root / "train.jsonl")}
  write_preferences(files["train"], easy_pairs(24, 0))
  return root, files, save_random_model(str(root / "sft"), CFG)


def run(setup, name, num_steps=8, **kw):
  root, files, sft = setup
  kw = {"initial_checkpoint": sft, "data_files": files, "optimizer": OPT, "beta": 0.5,
        "log_every": 1, "checkpoint_every": 3, "async_checkpointing": False,
        "ici_parallelism": {"data": 2, "fsdp": 4}, **kw}
  return train_dpo(model_config=CFG, run_dir=str(root / name), train_data=TRAIN,
                   num_steps=num_steps, **kw)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def full(setup):
  return run(setup, "full", eval_data=EVAL, eval_every=4)


def test_dpo_learns_the_training_pairs(full):
  assert full.final_step == 8 and sorted(full.metrics) == list(range(1, 9))
  assert sorted(full.eval_metrics) == [4, 8]
  first = full.metrics[1]
  # step 1: pi = pi_ref, so the implicit rewards are 0 and the loss is log 2
  assert abs(first["reward_margin"]) < 1e-5 and first["loss"] == pytest.approx(np.log(2))
  last = full.metrics[8]
  assert last["reward_margin"] > 0.2 and last["accuracy"] >= 0.75
  assert last["rewards_chosen"] > 0.0 > last["rewards_rejected"]
  assert last["loss"] < first["loss"] - 0.1
  mid, end = full.eval_metrics[4], full.eval_metrics[8]  # all 24 training pairs
  assert set(end) == set(METRICS)
  assert end["reward_margin"] > mid["reward_margin"] > 0.0
  assert end["accuracy"] >= mid["accuracy"] and end["accuracy"] >= 0.9
  assert end["loss"] < mid["loss"] < np.log(2)


def test_resumed_run_continues_exactly(setup, full):
  part = run(setup, "split", num_steps=5)  # checkpoints at 3 and 5
  resumed = run(setup, "split", num_steps=8)
  assert part.final_step == 5 and resumed.resumed_from == 5
  assert sorted(resumed.metrics) == [6, 7, 8]
  for step in (6, 7, 8):
    assert resumed.metrics[step] == full.metrics[step]
  for a, b in zip(leaves(resumed.state.params), leaves(full.state.params)):
    np.testing.assert_array_equal(a, b)


def test_precomputed_reference_survives_resume(setup, full):
  """The precomputed values stay matched to their pairs across a restart: the
  resumed run extends the file and follows the run whose step computes them."""
  path = setup[0] / "pre" / ReferenceCache.FILE
  run(setup, "pre", num_steps=5, reference="precomputed")
  first = np.load(path)["values"]
  assert first.shape == (5, 8, 2)  # batches 0-4, 8 pairs, (chosen, rejected)
  resumed = run(setup, "pre", num_steps=8, reference="precomputed")
  assert resumed.resumed_from == 5
  values = np.load(path)["values"]
  assert values.shape == (8, 8, 2)
  np.testing.assert_array_equal(values[:5], first)
  for step in (6, 7, 8):
    for k in ("loss", "reward_margin", "accuracy", "grad_norm"):
      np.testing.assert_allclose(resumed.metrics[step][k], full.metrics[step][k],
                                 rtol=1e-4, atol=1e-5, err_msg=f"{k} at step {step}")


def test_bad_input(setup, tmp_path):
  root, files, _ = setup
  with pytest.raises(FileNotFoundError, match="No preference file matches"):
    run(setup, "bad", data_files={"train": str(tmp_path / "missing.jsonl")})
  write_preferences(str(tmp_path / "empty.jsonl"), [])
  with pytest.raises(ValueError, match="hold no pairs"):
    run(setup, "bad", data_files={"train": str(tmp_path / "empty.jsonl")})
  big = easy_pairs(8, 2)
  big[5]["chosen"] = [300, 301]
  write_preferences(str(tmp_path / "big.jsonl"), big)
  with pytest.raises(ValueError, match="token id 30[01], outside"):
    run(setup, "bad", data_files={"train": str(tmp_path / "big.jsonl")})
  with pytest.raises(ValueError, match="needs initial_checkpoint"):
    run(setup, "bad", initial_checkpoint=None)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run(setup, "bad", initial_checkpoint=str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="beta must be > 0"):
    run(setup, "bad", beta=0.0)
  with pytest.raises(ValueError, match="Unknown DPO reference"):
    run(setup, "bad", reference="offline")
  assert not (root / "bad" / "checkpoints").exists() or not os.listdir(
      root / "bad" / "checkpoints")


def _configure(flags):
  main.register_configurables()
  gin.clear_config()
  cli.configure(cli.parse_flags(flags))


def test_gin_files_configure_the_job(setup):
  sft = setup[2]
  try:
    with pytest.raises(cli.ConfigError, match="Required macro PREFERENCES_"):
      _configure([f"--gin_file={sft}/model.gin", f"--gin_file={REPO}/gin/experiments/dpo.gin",
                  "--gin.RUN_DIR='/tmp/unused'", "--gin.SFT_CHECKPOINT='/tmp/unused'"])
    _configure([f"--gin_file={REPO}/gin/experiments/dpo_tiny.gin"])
    assert gin.query_parameter("job.name") == "train_dpo"
    assert (gin.query_parameter("train_dpo.beta"), gin.query_parameter(
        "train_dpo.loss_type"), gin.query_parameter("%SFT_CHECKPOINT")) == (
            0.1, "sigmoid", "runs/lm_quickstart")
  finally:
    gin.clear_config()
