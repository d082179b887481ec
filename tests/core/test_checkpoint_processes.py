"""Each process of a multi-process run gets its own data position back."""

import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax_processes  # pylint: disable=g-bad-import-order,wrong-import-position

from posttrain_jax.core import checkpointing  # pylint: disable=wrong-import-position
from posttrain_jax.core.checkpointing import Checkpointer, CheckpointMismatchError  # pylint: disable=wrong-import-position

WORKER = os.path.join("core", "checkpoint_process_worker.py")


def _abstract(rows):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return {"w": jax.ShapeDtypeStruct((rows, 3), np.float32, sharding=device)}


def test_every_process_restores_its_own_data_state(tmp_path, monkeypatch):
  directory = str(tmp_path / "checkpoints")
  monkeypatch.setenv("CHECKPOINT_DIR", directory)
  port = jax_processes.free_port()
  procs = [jax_processes.start(WORKER, i, 2, port, 1) for i in range(2)]
  try:
    results = [jax_processes.result(p, timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  expected_sum = float(np.arange(8 * 3).sum() * 2)
  for pid, result in enumerate(results):
    assert result == {"step": 2, "data": {"shard": pid, "batches_consumed": 20 + pid},
                      "sum": expected_sum}

  # one process cannot take over two processes' positions: one clear error
  ckpt = Checkpointer(directory)
  with pytest.raises(CheckpointMismatchError,
                     match=r"written by 2 process\(es\), this run has 1.*Fix: resume with 2"):
    ckpt.restore_latest(_abstract(8))
  assert ckpt.all_steps() == [1, 2]  # not mistaken for damage
  ckpt.close()


def test_single_position_checkpoints_still_restore(tmp_path):
  """Checkpoints from before per-process positions hold one data state."""
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  state = {"w": jax.numpy.ones((8, 3), np.float32)}
  ckpt.save(1, state, {"train": {"batches_consumed": 5}})
  ckpt.close()
  metadata = os.path.join(directory, "1", "data", "metadata")
  with open(metadata) as f:
    saved = json.load(f)
  assert saved[checkpointing.PER_PROCESS] == [{"train": {"batches_consumed": 5}}]
  with open(metadata, "w") as f:  # the old layout: the one position at the top
    json.dump({"train": {"batches_consumed": 5},
               checkpointing.CHECKSUMS: saved[checkpointing.CHECKSUMS]}, f)
  ckpt = Checkpointer(directory)
  step, _, data = ckpt.restore_latest(_abstract(8))
  assert (step, data) == (1, {"train": {"batches_consumed": 5}})
  ckpt.close()
