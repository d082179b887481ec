"""Checkpointer: damaged steps are detected, reported and skipped, never deleted."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core.checkpointing import (CheckpointDamagedError, CheckpointMismatchError,
                                              Checkpointer, checksums)


def state_at(step):
  return {"w": jnp.arange(4000.0).reshape(40, 100) * step, "b": jnp.full((3,), step, jnp.int32),
          "h": jnp.ones((7,), jnp.bfloat16) * step}


ABSTRACT = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                   sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
    state_at(1))


def saved_run(tmp_path, steps=(1, 2)):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  for step in steps:
    ckpt.save(step, state_at(step), {"position": step})
  ckpt.close()
  return directory


def _array_files(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  return sorted(files, key=os.path.getsize)


def truncate(step_dir):
  f = _array_files(step_dir)[-1]  # the largest: holds "w"
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 3)


def flip_bytes(step_dir):
  f = _array_files(step_dir)[-1]
  data = bytearray(open(f, "rb").read())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
  open(f, "wb").write(bytes(data))


def delete_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def delete_data_item(step_dir):
  for f in glob.glob(os.path.join(step_dir, "data", "*")):
    os.remove(f)
  os.rmdir(os.path.join(step_dir, "data"))


@pytest.mark.parametrize("damage", [truncate, flip_bytes, delete_metadata, delete_data_item])
def test_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, damage):
  directory = saved_run(tmp_path)
  damage(os.path.join(directory, "2"))
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  warnings = []
  step, state, data = ckpt.restore_latest(ABSTRACT, warn=warnings.append)
  assert step == 1 and data == {"position": 1}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state, state_at(1))
  assert "checkpoint 2" in warnings[0] and "is damaged (" in warnings[0]
  assert "resuming from step 1" in warnings[-1]
  # kept, not deleted, and out of the way of the step this run will save again
  assert os.path.isdir(os.path.join(f"{directory}_damaged", "2"))
  assert ckpt.all_steps() == [1]
  assert ckpt.save(2, state_at(2), {"position": 2}, force=True)
  ckpt.wait()
  assert ckpt.restore_latest(ABSTRACT, warn=warnings.append)[0] == 2
  ckpt.close()


def test_every_step_damaged_is_one_clear_error(tmp_path):
  directory = saved_run(tmp_path)
  for step in ("1", "2"):
    truncate(os.path.join(directory, step))
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  with pytest.raises(CheckpointDamagedError, match=r"No intact checkpoint .* step 2 \(.*; step 1"):
    ckpt.restore_latest(ABSTRACT, warn=lambda _: None)
  assert sorted(os.listdir(f"{directory}_damaged")) == ["1", "2"]  # both kept
  ckpt.close()


def test_a_shape_mismatch_is_not_damage(tmp_path):
  directory = saved_run(tmp_path)
  ckpt = Checkpointer(directory, save_every_steps=1, async_save=False)
  wrong = dict(ABSTRACT, w=jax.ShapeDtypeStruct((40, 99), jnp.float32,
                                                 sharding=ABSTRACT["w"].sharding))
  with pytest.raises(CheckpointMismatchError, match="w: checkpoint has"):
    ckpt.restore_latest(wrong, warn=lambda _: None)
  assert ckpt.all_steps() == [1, 2] and not os.path.exists(f"{directory}_damaged")
  ckpt.close()


def test_no_checkpoint_restores_nothing(tmp_path):
  ckpt = Checkpointer(str(tmp_path / "empty"), save_every_steps=1, async_save=False)
  assert ckpt.restore_latest(ABSTRACT) == (None, None, None)
  ckpt.close()


def test_checksums_see_one_changed_element_and_not_the_sharding():
  base = checksums(state_at(1))
  changed = state_at(1)
  changed["w"] = changed["w"].at[17, 3].add(1.0)
  assert checksums(changed)["w"] != base["w"] and checksums(changed)["b"] == base["b"]
  swapped = state_at(1)
  swapped["w"] = swapped["w"].at[0, 0].set(1.0).at[0, 1].set(0.0)  # two values exchanged
  assert checksums(swapped)["w"] != base["w"]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
  sharded = jax.device_put(state_at(1)["w"], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("a", "b")))
  assert checksums({"w": sharded})["w"] == base["w"]
