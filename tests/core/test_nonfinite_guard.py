"""NaN/inf guard: non-finite steps are never applied, counted, and halt after K."""

import jax
import numpy as np
import pytest

from posttrain_jax.core.nonfinite_guard import NonFiniteError, NonFiniteGuard
from posttrain_jax.jobs import train as train_lib

from lm_runs import DATA, run  # pylint: disable=g-bad-import-order


def test_guard_policies():
  guard = NonFiniteGuard("skip", max_consecutive=2)
  guard.observe(1, True)
  guard.observe(2, False)
  guard.observe(3, True)
  with pytest.raises(NonFiniteError, match="2 consecutive steps .*steps 3-4, 3 skipped"):
    guard.observe(4, True)
  with pytest.raises(NonFiniteError, match="at step 7"):
    NonFiniteGuard("halt").observe(7, True)
  with pytest.raises(ValueError, match="nonfinite_policy must be one of"):
    NonFiniteGuard("ignore")


def _inject_nan_at(monkeypatch, steps):
  make = train_lib._train_iterator

  class Poisoned:
    def __init__(self, cfg):
      self.inner, self.count = make(cfg), 0

    def __next__(self):
      batch = dict(next(self.inner))
      self.count += 1
      if self.count in steps:
        weights = batch["decoder_loss_weights"].copy()
        weights[0, 0] = np.nan
        batch["decoder_loss_weights"] = weights
      return batch

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, state):
      self.inner.set_state(state)

  monkeypatch.setattr(train_lib, "_train_iterator", Poisoned)


def test_injected_nan_is_skipped_and_counted(tmp_path, monkeypatch):
  clean = run(tmp_path / "clean", 3)
  _inject_nan_at(monkeypatch, {2})
  result = run(tmp_path / "nan", 3)
  assert result.skipped_steps == 1
  assert np.isnan(result.losses[2])
  np.testing.assert_allclose(result.losses[1], clean.losses[1], rtol=1e-6)
  # step 2 was not applied: step 3 sees the parameters after step 1
  assert np.isfinite(result.losses[3]) and result.losses[3] != clean.losses[3]


def test_consecutive_nans_halt(tmp_path, monkeypatch):
  _inject_nan_at(monkeypatch, {2, 3, 4, 5, 6})
  with pytest.raises(NonFiniteError, match="3 consecutive steps .*steps 2-4"):
    run(tmp_path, 8, max_consecutive_nonfinite=3)


def test_skipped_update_keeps_parameters():
  from test_trainer import make_batch, CFG  # pylint: disable=g-import-not-at-top
  from posttrain_jax.core import partitioning
  from posttrain_jax.core.optimizer import OptimizerConfig
  from posttrain_jax.core.trainer import Trainer
  from posttrain_jax.models import Transformer
  mesh = partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1])
  schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
  trainer = Trainer(Transformer(CFG), tx, schedule, mesh)
  state = trainer.init_state(jax.random.key(0))
  before = jax.device_get(state)
  batch = make_batch(0)
  batch["decoder_loss_weights"] = batch["decoder_loss_weights"].copy()
  batch["decoder_loss_weights"][1, 2] = np.inf
  state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
  assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, before.params, jax.device_get(state.params))
  jax.tree.map(np.testing.assert_array_equal, before.opt_state,
               jax.device_get(state.opt_state))
