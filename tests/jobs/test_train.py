"""End-to-end training loop: resume exactness, checkpoints, metrics, bad input."""

import glob
import os

import numpy as np
import pytest

from posttrain_jax.core.checkpointing import CheckpointMismatchError
from posttrain_jax.models import ModelConfig

from lm_runs import EVAL, MODEL, run  # pylint: disable=g-bad-import-order


def test_resumed_run_matches_uninterrupted_run(tmp_path):
  full = run(tmp_path / "full", 8)
  assert full.resumed_from is None and sorted(full.losses) == list(range(1, 9))
  first = run(tmp_path / "split", 5)         # "preempted" after step 5 ...
  assert first.resumed_from is None
  second = run(tmp_path / "split", 8)        # ... restarts from the step-3 checkpoint
  assert second.resumed_from == 5 and sorted(second.losses) == [6, 7, 8]
  for step in (6, 7, 8):
    np.testing.assert_allclose(second.losses[step], full.losses[step], rtol=1e-6)
  # losses also agree on the steps both invocations ran
  for step in range(1, 6):
    np.testing.assert_allclose(first.losses[step], full.losses[step], rtol=1e-6)


def test_resume_from_a_periodic_checkpoint_continues_the_data(tmp_path):
  # kill the run right after step 4: only the step-3 checkpoint exists
  full = run(tmp_path / "full", 8)
  run(tmp_path / "cut", 3)
  resumed = run(tmp_path / "cut", 8)
  assert resumed.resumed_from == 3
  for step in range(4, 9):
    np.testing.assert_allclose(resumed.losses[step], full.losses[step], rtol=1e-6)


def test_checkpoints_metrics_and_eval_are_written(tmp_path):
  result = run(tmp_path, 6, eval_data=EVAL, eval_every=3, eval_batches=2,
               keep_checkpoints=1, operative_config="# config text\n")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6"]  # keep 1
  assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))  # atomic saves
  assert set(result.eval_metrics) == {3, 6}
  assert result.eval_metrics[6]["loss"] < result.eval_metrics[3]["loss"] + 1.0
  assert (tmp_path / "config.gin").read_text() == "# config text\n"
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  tags = set(acc.Tags()["tensors"])  # clu writes TF2 summaries (tensor events)
  assert {"loss", "grad_norm", "learning_rate", "tokens_per_sec", "steps_per_sec",
          "eval/loss"} <= tags
  assert [e.step for e in acc.Tensors("loss")] == [2, 4, 6]


def test_data_parallel_and_fsdp_tensor_runs_agree(tmp_path):
  dp = run(tmp_path / "dp", 3)
  fsdp_tp = run(tmp_path / "fsdp_tp", 3, ici_parallelism={"fsdp": 4, "tensor": 2})
  for step in (1, 2, 3):
    np.testing.assert_allclose(dp.losses[step], fsdp_tp.losses[step], rtol=2e-5)


def test_batch_not_divisible_by_mesh_is_rejected():
  from posttrain_jax.core import partitioning
  mesh = partitioning.create_mesh({"data": -1})
  with pytest.raises(ValueError, match="Global batch size 4 .* not divisible by the 8 "
                                       "batch shards"):
    partitioning.global_batch({"x": np.zeros((4, 2))}, mesh)


def test_token_id_beyond_vocab_is_rejected(tmp_path):
  small = ModelConfig(**{**MODEL.__dict__, "vocab_size": 100})
  with pytest.raises(ValueError, match=r"token id \d+, outside \[0, vocab_size=100\)"):
    run(tmp_path, 2, model=small)


def test_checkpoint_of_the_wrong_shape_is_rejected(tmp_path):
  run(tmp_path, 3, operative_config="# first start\n")
  wider = ModelConfig(**{**MODEL.__dict__, "mlp_dim": 96})
  with pytest.raises(CheckpointMismatchError,
                     match=r"layer_0/mlp/gate: checkpoint has \(32, 64\), model expects "
                           r"\(32, 96\)"):
    run(tmp_path, 6, model=wider, operative_config="# wider model\n")
  # The failed start leaves the run's configuration as it was (the tools read
  # the ModelConfig from it) and records nothing of its own.
  assert (tmp_path / "config.gin").read_text() == "# first start\n"
  assert glob.glob(str(tmp_path / "config.*.gin")) == []


def test_a_later_start_keeps_the_first_config_and_records_its_own(tmp_path):
  run(tmp_path, 3, operative_config="# first start\n")
  run(tmp_path, 3, operative_config="# first start\n")    # same config: nothing new
  assert glob.glob(str(tmp_path / "config.*.gin")) == []
  run(tmp_path, 4, operative_config="# NUM_STEPS = 4\n")
  assert (tmp_path / "config.gin").read_text() == "# first start\n"
  [later] = glob.glob(str(tmp_path / "config.*.gin"))
  assert open(later).read() == "# NUM_STEPS = 4\n"


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, capfd):
  full = run(tmp_path / "full", 8)
  run(tmp_path / "cut", 6)                   # checkpoints at steps 3 and 6
  files = [f for f in glob.glob(str(tmp_path / "cut" / "checkpoints" / "6" / "state" / "**"),
                                recursive=True) if os.path.isfile(f) and "/d/" in f]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:            # a disk error in the newest step
    f.truncate(os.path.getsize(biggest) // 2)
  resumed = run(tmp_path / "cut", 8)
  assert resumed.resumed_from == 3
  err = capfd.readouterr().err
  assert "checkpoint 6" in err and "is damaged" in err and "resuming from step 3" in err
  assert os.path.isdir(tmp_path / "cut" / "checkpoints_damaged" / "6")  # kept
  for step in range(4, 9):                   # and the run continues exactly
    np.testing.assert_allclose(resumed.losses[step], full.losses[step], rtol=1e-6)
