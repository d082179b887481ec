"""Streaming DiLoCo in the LM loop, configured from the shipped gin files:
it trains, writes traffic scalars, and resumes exactly mid-window."""

import os

import gin
import jax
import numpy as np
import pytest

from posttrain_jax import cli, main
from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco.loop import DiLoCoLoop
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--gin.ModelConfig.embed_dim=32", "--gin.ModelConfig.num_heads=2",
        "--gin.ModelConfig.num_kv_heads=1", "--gin.ModelConfig.head_dim=16",
        "--gin.ModelConfig.mlp_dim=64", "--gin.ModelConfig.sliding_window_size=8",
        "--gin.SEQUENCE_LENGTH=32", "--gin.BATCH_SIZE=16",
        "--gin.OptimizerConfig.learning_rate=1e-2",
        "--gin.OptimizerConfig.warmup_steps=2",
        "--gin.OptimizerConfig.decay_steps=8",  # the same schedule for 6 and 8 steps
        "--gin.train.checkpoint_every=3", "--gin.train.log_every=2",
        "--gin.train.eval_every=0", "--gin.train.eval_batches=2",
        # both replicas' groups on the mesh's replica axis (M = 2 = replica degree)
        "--gin.train.ici_parallelism={'replica': 2, 'data': -1}",
        "--gin.DiLoCoConfig.sync_every=4"]


def gin_train(run_dir, num_steps, experiment="streaming_fp4", extra=()):
  main.register_configurables()
  import posttrain_jax.data.tasks  # pylint: disable=unused-import,import-outside-toplevel
  gin.clear_config()
  try:
    cli.configure(cli.parse_flags(
        [f"--gin_file={REPO}/gin/experiments/streaming_diloco/{experiment}.gin",
         f"--gin.RUN_DIR='{run_dir}'", f"--gin.NUM_STEPS={num_steps}", *TINY, *extra]))
    return gin.get_configurable("posttrain_jax.train")(
        operative_config=gin.config_str())
  finally:
    gin.clear_config()


def test_gin_streaming_diloco_trains_reports_traffic_and_resumes_exactly(tmp_path):
  full = gin_train(tmp_path / "full", 8)
  assert sorted(full.losses) == list(range(1, 9))
  assert full.losses[8] < full.losses[1]
  assert np.isfinite(full.eval_metrics[8]["loss"])
  # 2 fragments, H = 4, offsets 0 and 2: fragment 1 syncs at steps 2, 6
  # (applied at 3, 7), fragment 0 at 4, 8 (applied at 5): every fragment synced
  # twice in 8 steps, except fragment 0's second exchange, which is counted but
  # never run (τ = 1: it would run in step 9's program)
  t = full.traffic
  assert t["replica_bytes"] > 0 and t["sent_bytes"] == 2 * t["replica_bytes"]
  assert t["dp_replica_bytes"] == 8 * t["dp_peak_step_bytes"]
  assert t["dp_ratio"] > 4 * 4 * 0.9  # fp4 vs bf16 (4x) and H = 4
  assert t["dp_fp32_ratio"] == pytest.approx(2 * t["dp_ratio"])
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tmp_path / "full"))
  acc.Reload()
  tags = set(acc.Tags()["tensors"])
  assert {"traffic/sent_bytes", "traffic/peak_step_bytes", "traffic/dp_sent_bytes",
          "traffic/dp_ratio", "eval/loss", "loss"} <= tags
  steps = [e.step for e in acc.Tensors("traffic/sent_bytes")]
  assert steps == [2, 4, 6, 8]

  # "preempted" after step 6: fragment 1's exchange of step 6 is deferred to
  # step 7's program, which the resumed run computes from the checkpoint
  first = gin_train(tmp_path / "split", 6)
  for step in range(1, 7):
    np.testing.assert_allclose(first.losses[step], full.losses[step], rtol=1e-6)
  second = gin_train(tmp_path / "split", 8)
  assert second.resumed_from == 6 and sorted(second.losses) == [7, 8]
  for step in (7, 8):
    np.testing.assert_allclose(second.losses[step], full.losses[step], rtol=1e-6)
  np.testing.assert_allclose(second.eval_metrics[8]["loss"], full.eval_metrics[8]["loss"],
                             rtol=1e-6)
  assert second.traffic == full.traffic  # totals rebuilt from the checkpoint step

  # exports / samplers reading the run directory get the outer parameters
  location = params_checkpoint.locate(str(tmp_path / "split"))
  assert location.subtree == "outer_params" and location.step == 8
  cfg = params_checkpoint.model_config_of(location)
  params = params_checkpoint.load_numpy_params(str(tmp_path / "split"), cfg)
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  saved = ocp.PyTreeCheckpointer().restore(location.path)
  jax.tree.map(np.testing.assert_array_equal, params, saved["outer_params"])

  # a fresh DiLoCo run can start from them (initial_checkpoint)
  warm = gin_train(tmp_path / "warm", 1, extra=[
      f"--gin.train.initial_checkpoint='{tmp_path / 'split'}'"])
  assert warm.initialised_from == str(tmp_path / "split")
  assert warm.losses[1] < full.losses[2]


def test_replica_axis_must_fit_num_replicas():
  mesh = partitioning.create_mesh({"replica": 4, "data": -1})
  model = Transformer(ModelConfig(vocab_size=64, embed_dim=16, num_layers=2,
                                  num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32))
  schedule, tx = OptimizerConfig().build(10)
  with pytest.raises(ValueError, match=r"num_replicas=2 needs the mesh's replica "
                                       r"axis to be 2"):
    DiLoCoLoop(model, tx, schedule, mesh, sd.DiLoCoConfig(num_replicas=2),
               batch_size=16)
  mesh = partitioning.create_mesh({"data": -1})
  with pytest.raises(ValueError, match=r"batch size a multiple of 16"):
    DiLoCoLoop(model, tx, schedule, mesh, sd.DiLoCoConfig(num_replicas=2),
               batch_size=8)


@pytest.mark.parametrize("experiment,replicas,fragments,sync_every,steps,block", [
    ("data_parallel", None, None, None, 1200, None),
    ("diloco_h30", 2, 1, 30, 1200, None),
    ("streaming_fp4", 2, 2, 30, 1200, None),
    ("streaming_fp4_h15", 2, 2, 15, 1200, None),
    ("data_parallel_1800", None, None, None, 1800, None),
    ("streaming_fp4_h15_b128_1800", 2, 2, 15, 1800, 128)])
def test_experiment_gins_configure(experiment, replicas, fragments, sync_every, steps,
                                   block):
  main.register_configurables()
  gin.clear_config()
  try:
    cli.configure(cli.parse_flags(
        [f"--gin_file={REPO}/gin/experiments/streaming_diloco/{experiment}.gin",
         "--gin.RUN_DIR='/tmp/unused'"]))
    diloco = gin.query_parameter("train.diloco")
    if replicas is None:
      assert diloco is None
    else:
      config = gin.get_configurable(sd.DiLoCoConfig)()
      assert (config.num_replicas, config.num_fragments, config.sync_every,
              config.quant_block, config.quantization) == (
                  replicas, fragments, sync_every, block,
                  "none" if fragments == 1 else "fp4_e3m0")
    assert gin.query_parameter("%BATCH_SIZE") == 16  # equal tokens in all of them
    assert gin.query_parameter("%NUM_STEPS") == steps
  finally:
    gin.clear_config()
