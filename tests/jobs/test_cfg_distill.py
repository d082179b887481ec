"""The cfg_distill job: runs, logs the QD metrics, checkpoints and resumes."""

import numpy as np
import pytest

from posttrain_jax import main as main_lib
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.jobs.cfg_distill import cfg_distill
from posttrain_jax.models import params_checkpoint
from policy_runs import CFG, FixedPrompts, save_random_model

OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0, decay_steps=4)


def _run(tmp_path, num_steps, **kw):
  return cfg_distill(model_config=CFG, run_dir=str(tmp_path / "run"),
                     initial_checkpoint=str(tmp_path / "base"), num_steps=num_steps,
                     prompt_source=FixedPrompts(batch_size=4), samples_per_prompt=2,
                     max_new_tokens=4, optimizer=OPT, log_every=1, checkpoint_every=2,
                     async_checkpointing=False, **kw)


def test_runs_checkpoints_and_resumes(tmp_path):
  save_random_model(str(tmp_path / "base"), CFG)
  first = _run(tmp_path, 2, gamma=3.0, beta=5.0)
  assert first.final_step == 2 and first.resumed_from is None
  m = first.metrics[1]
  assert m["kl"] > 0 and 0 <= m["diversity"] <= 2 and np.isfinite(m["loss"])
  assert params_checkpoint.locate(str(tmp_path / "run"))
  again = _run(tmp_path, 3, gamma=3.0, beta=5.0)
  assert again.resumed_from == 2 and again.final_step == 3
  assert "cfg_distill" in main_lib.JOBS


def test_bad_settings_rejected(tmp_path):
  with pytest.raises(FileNotFoundError, match="initial_checkpoint"):
    _run(tmp_path, 1)
  save_random_model(str(tmp_path / "base"), CFG)
  with pytest.raises(ValueError, match="samples_per_prompt >= 3"):
    _run(tmp_path, 1, beta=1.0, diversity_baseline="leave_one_out")
