"""Model and run directories: a run's own checkpoints are never shadowed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)


def _params(seed):
  return jax.tree.map(np.asarray, nn.unbox(Transformer(CFG).init(
      jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]))


def _write_run_step(run_dir, step, params):
  """RUN/checkpoints/STEP/state as the Checkpointer lays it out (the TrainState's
  params subtree is all a loader reads)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(run_dir / "checkpoints" / str(step) / "state"),
                    {"params": params, "step": np.int32(step)})
  checkpointer.wait_until_finished()
  checkpointer.close()


def test_a_run_directory_s_own_checkpoints_win_over_a_stray_model_directory(tmp_path):
  run = tmp_path / "run"
  own, stray = _params(0), _params(1)
  _write_run_step(run, 3, own)
  # A model directory written into the run directory (e.g. an old merge's
  # output): checkpoint/ + model.gin beside checkpoints/.
  params_checkpoint.save(str(run), stray, CFG)
  location = params_checkpoint.locate(str(run))
  assert location.step == 3 and location.subtree == "params"
  loaded = params_checkpoint.load_numpy_params(str(run), CFG)
  jax.tree.map(np.testing.assert_array_equal, loaded, own)
  # A plain model directory still loads as one.
  params_checkpoint.save(str(tmp_path / "model"), stray, CFG)
  assert params_checkpoint.locate(str(tmp_path / "model")).subtree is None
  jax.tree.map(np.testing.assert_array_equal,
               params_checkpoint.load_numpy_params(str(tmp_path / "model"), CFG), stray)
