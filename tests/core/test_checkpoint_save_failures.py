"""A checkpoint save that fails (no space left) stops the run at the next step
with one CheckpointSaveError naming the step directory and the cause; the
previous checkpoint stays intact and restorable."""

import logging
import os
import re
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from posttrain_jax.core import checkpointing
from posttrain_jax.core.checkpointing import Checkpointer, CheckpointSaveError
from posttrain_jax.core.nonfinite_guard import NonFiniteGuard
from posttrain_jax.core.step_loop import StepLoop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def state_at(step):
  return {"w": jnp.arange(600.0).reshape(20, 30) * step, "b": jnp.full((3,), step, jnp.int32)}


ABSTRACT = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                   sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
    state_at(1))


class DiskFull:
  """Makes the data item's write of chosen steps fail as a full disk does;
  while `gate` is closed those writes wait for it (the save is in flight)."""

  def __init__(self):
    self.steps = set()
    self.gate = threading.Event()
    self.gate.set()

  def __call__(self, step, *, in_flight=False):
    self.steps.add(step)
    if in_flight:
      self.gate.clear()


@pytest.fixture
def disk_full_at(monkeypatch):
  full = DiskFull()
  save_fn = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def write(self, x, directory):
    if x[checkpointing.PER_PROCESS][0]["position"] in full.steps:
      assert full.gate.wait(60)
      raise OSError(28, "No space left on device", str(directory / "metadata"))
    return await save_fn(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", write)
  yield full
  full.gate.set()


class Reporter:
  def update(self, step, metrics):
    pass

  def print(self, text):
    pass

  def close(self):
    pass


def settle(ckpt, timeout=60.0):
  """Waits (bounded) until the save in flight has ended, failed or not."""
  deadline = time.monotonic() + timeout
  while ckpt._manager.is_saving_in_progress() and time.monotonic() < deadline:  # pylint: disable=protected-access
    time.sleep(0.01)


def test_failed_async_save_stops_the_loop_at_the_next_step(tmp_path, disk_full_at, caplog):
  directory = str(tmp_path / "checkpoints")
  disk_full_at(4, in_flight=True)
  # max_to_keep=1: a successful step 4 would have deleted step 2
  ckpt = Checkpointer(directory, save_every_steps=2, max_to_keep=1, async_save=True)
  position = {"n": 0}
  loop = StepLoop(start=0, num_steps=10, guard=NonFiniteGuard(), reporter=Reporter(),
                  checkpointer=ckpt, data_state=lambda: {"position": position["n"]})
  ended = []
  with caplog.at_level(logging.INFO):
    with pytest.raises(CheckpointSaveError) as raised:
      for step in loop:
        if step == 5:  # step 4's save fails now, while step 5 runs (no save due)
          disk_full_at.gate.set()
          settle(ckpt)
        position["n"] = step
        loop.end_step(step, state_at(step), {"nonfinite": False})
        ended.append(step)
    loop.close()  # does not raise the same failure again
  assert ended == [1, 2, 3, 4]  # step 5 did not end
  message = str(raised.value)
  assert f"Saving checkpoint {os.path.join(directory, '4')} failed: [Errno 28] No space " \
         "left on device" in message
  assert "the newest complete checkpoint, step 2, is intact" in message
  assert "\n" not in message
  # orbax's tracebacks are held back (the error above replaces them)
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]

  again = Checkpointer(directory, save_every_steps=1)
  assert again.all_steps() == [2]
  step, state, data = again.restore_latest(ABSTRACT)
  assert (step, data) == (2, {"position": 2})
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state, state_at(2))
  assert again.save(3, state_at(3), {"position": 3})  # the run goes on from step 2
  again.close()
  final = Checkpointer(directory)
  assert final.all_steps() == [2, 3]
  final.close()


def test_failed_save_found_by_the_next_save_and_by_close(tmp_path, disk_full_at):
  disk_full_at(2, in_flight=True)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every_steps=1, async_save=True)
  ckpt.save(1, state_at(1), {"position": 1})
  assert ckpt.save(2, state_at(2), {"position": 2})  # returns while the write waits
  disk_full_at.gate.set()
  with pytest.raises(CheckpointSaveError, match=r"checkpoints/2 failed: \[Errno 28\]"):
    ckpt.save(3, state_at(3), {"position": 3})  # waits for step 2 first
  with pytest.raises(CheckpointSaveError, match="checkpoints/2 failed"):
    ckpt.check()  # stays failed
  ckpt.close()
  again = Checkpointer(str(tmp_path / "checkpoints"))
  assert again.all_steps() == [1]
  again.close()

  disk_full_at(1, in_flight=True)
  ckpt = Checkpointer(str(tmp_path / "other"), save_every_steps=1, async_save=True)
  assert ckpt.save(1, state_at(1), {"position": 1})
  disk_full_at.gate.set()
  with pytest.raises(CheckpointSaveError, match="there is no earlier checkpoint"):
    ckpt.close()  # the last save of a run fails: close says so


def test_failed_synchronous_save_raises_at_once(tmp_path, disk_full_at):
  disk_full_at(2)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every_steps=1, async_save=False)
  ckpt.save(1, state_at(1), {"position": 1})
  with pytest.raises(CheckpointSaveError, match=r"\[Errno 28\] No space left on device"):
    ckpt.save(2, state_at(2), {"position": 2})
  ckpt.close()


def test_tensorstore_errors_name_the_os_error():
  error = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local '
                     'file "/x/": Failed to write 229888 bytes to file 4: No space left on '
                     "device [os_error_code='28']")
  assert checkpointing._cause(error) == "[Errno 28] No space left on device"  # pylint: disable=protected-access
  assert checkpointing._cause(RuntimeError("lost")) == "lost"  # pylint: disable=protected-access


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  try:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired) as e:
    pytest.skip(f"cannot mount a tmpfs: {e}")
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")


def _fill(path):
  """Writes a file until the file system at `path` is full."""
  block = b"\0" * (1 << 20)
  with open(os.path.join(path, "filler"), "wb", buffering=0) as f:
    try:
      while True:
        f.write(block)
    except OSError as e:
      assert e.errno == 28, e


def _binary(run_dir, num_steps):
  return [sys.executable, "-m", "posttrain_jax.main",
          "--gin_file=gin/experiments/lm_quickstart.gin", f"--gin.RUN_DIR='{run_dir}'",
          f"--gin.NUM_STEPS={num_steps}", "--gin.SEQUENCE_LENGTH=16", "--gin.BATCH_SIZE=4",
          "--gin.train.log_every=1", "--gin.train.eval_data=None",
          "--gin.train.checkpoint_every=4", "--gin.ModelConfig.num_layers=1",
          "--gin.ModelConfig.embed_dim=32"]


def test_full_disk_stops_the_binary_with_one_error_line(tmp_path):
  """The checkpoints on a small tmpfs, filled once step 4 is saved."""
  run_dir, every = tmp_path / "run", 4
  checkpoints = run_dir / "checkpoints"
  _mount_tmpfs(checkpoints, "32m")
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", PYTHONUNBUFFERED="1")
  try:
    proc = subprocess.Popen(_binary(run_dir, 100000), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
      steps = []
      for line in proc.stdout:
        found = re.match(r"step +(\d+)/", line)
        if found:
          steps.append(int(found.group(1)))
          if os.path.isdir(checkpoints / str(every)) and not os.path.exists(
              checkpoints / "filler"):
            _fill(checkpoints)
      err = proc.communicate(timeout=120)[1]
    finally:
      if proc.poll() is None:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) <= 3, err[-3000:]  # not ~2,500 lines
    [line] = [l for l in lines if l.startswith("posttrain_jax: error:")]
    found = re.match(r"posttrain_jax: error: Saving checkpoint (.*)/(\d+) failed: "
                     r"\[Errno 28\] No space left on device\. Training stopped; the newest "
                     r"complete checkpoint, step (\d+), is intact\.", line)
    assert found and found.group(1) == str(checkpoints), line
    failed, intact = int(found.group(2)), int(found.group(3))
    assert failed > intact >= every and failed % every == 0
    # never past the next due save (how soon depends on how long the failing
    # write takes; test_failed_async_save_stops_the_loop_at_the_next_step pins it)
    assert max(steps) <= failed + every
    os.remove(checkpoints / "filler")
    resumed = subprocess.run(_binary(run_dir, intact + 1), cwd=REPO, env=env, text=True,
                             capture_output=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {intact}" in resumed.stdout
  finally:
    subprocess.run(["umount", "-l", str(checkpoints)], capture_output=True, timeout=30)
