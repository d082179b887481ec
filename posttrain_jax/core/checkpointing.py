"""Atomic, asynchronous checkpoints of the train state and the data position.

Wraps orbax's CheckpointManager: each step directory holds the train state
("state", sharded arrays) and the input pipeline position ("data", JSON).
orbax writes into a temporary directory and renames it when complete, so a
crash mid-save never leaves a half-written step behind. Restores check every
array's shape against the model first and name each mismatch.

Damage after the fact (a truncated or overwritten array file, a deleted
metadata file) is detected: every save records a checksum of each array, and a
restore that cannot read a step or whose arrays do not match their checksums
raises CheckpointDamagedError. `Checkpointer.restore_latest` then warns, moves
the damaged step aside (never deletes it) and resumes from the newest intact
step.

Each process has its own data position (its shard of the input): a save
all-gathers every process's `data_state` and the DATA item keeps them all, by
process index; a restore gives each process its own. A checkpoint written by N
processes resumes only with N processes (CheckpointMismatchError otherwise);
one from before per-process positions (a single position) is given to every
process.

A failed save (a full disk, a lost file system) stops the run: the failure of
an asynchronous save is looked for at every step (`check`, which `StepLoop`
calls) and before the next save, and raised as one CheckpointSaveError naming
the step directory and the cause. orbax's own error logs (hundreds of lines of
tracebacks) and tensorstore's reports of the writes orbax stopped waiting for
are held back, unless POSTTRAIN_JAX_TRACEBACK is set. The failed step is never
finalized and the older steps are not pruned: the newest complete checkpoint
stays intact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"
CHECKSUMS = "_state_checksums"  # key of the array checksums in the DATA item
PER_PROCESS = "_per_process"  # key of the processes' data states (a list, by process index)


class CheckpointMismatchError(ValueError):
  """The checkpoint's arrays do not have the shapes the model expects."""


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in key_path)


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path(p): (tuple(x.shape), x.dtype) for p, x in leaves}


def check_compatible(saved_tree, abstract_tree, where: str, *,
                     against: str = "the model", expected_by: str = "model expects",
                     fix: str | None = None) -> None:
  """Raises CheckpointMismatchError listing missing, extra and mis-shaped arrays.

  `against`, `expected_by` and `fix` word the message for other sources of the
  expected shapes (e.g. a Hugging Face config.json).
  """
  saved, wanted = _shapes(saved_tree), _shapes(abstract_tree)
  problems = [f"{k}: checkpoint has {saved[k][0]}, {expected_by} {wanted[k][0]}"
              for k in wanted if k in saved and saved[k][0] != wanted[k][0]]
  problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in saved]
  problems += [f"{k}: in the checkpoint but not in {against.removeprefix('its ')}"
               for k in saved if k not in wanted]
  if problems:
    shown = "\n  ".join(problems[:8])
    more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
    fix = fix or ("Fix: use the ModelConfig the checkpoint was written with, or "
                  "start in a fresh run directory.")
    raise CheckpointMismatchError(
        f"Checkpoint {where} does not match {against} ({len(problems)} "
        f"problem(s)):\n  {shown}{more}\n{fix}")


class CheckpointDamagedError(RuntimeError):
  """A checkpoint's files are missing, unreadable or do not match their checksums."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (e.g. no space left); the run stops."""


def _cause(e: BaseException) -> str:
  """'[Errno 28] No space left on device' where an OS error code is known
  (tensorstore's errors carry it as os_error_code='N'), else the first line."""
  code = e.errno if isinstance(e, OSError) else None
  if not code:
    found = re.search(r"os_error_code='?(\d+)", str(e))
    code = int(found.group(1)) if found else None
  return f"[Errno {code}] {os.strerror(code)}" if code else _first_line(e)


class _OrbaxErrorFilter(logging.Filter):
  """Drops orbax's error records (a failed save logs a traceback per array and
  thread, and asyncio one per write task it left unfinished); the Checkpointer
  raises one CheckpointSaveError instead."""

  LOGGERS = ("absl", "asyncio")

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    orbax = f"{os.sep}orbax{os.sep}"
    files = [record.pathname or "", record.getMessage()]
    tb = record.exc_info[2] if record.exc_info else None
    while tb is not None:
      files.append(tb.tb_frame.f_code.co_filename)
      tb = tb.tb_next
    return not any(orbax in f for f in files)


def _quiet_orphaned_writes() -> None:
  """Installs (once) a sys.unraisablehook that drops 'Event loop is closed'.

  When one array write of an asynchronous save fails, orbax stops awaiting the
  others and closes its event loop; as each of them then fails too (the disk
  is still full), tensorstore reports that its callback found the loop closed,
  a traceback apiece. Nothing waits for those writes any more.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_orphaned_writes", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_orphaned_writes = True
  sys.unraisablehook = hook


def _gather_data_states(data_state: dict) -> list[dict]:
  """Every process's `data_state` (a collective when there are several), by index."""
  if jax.process_count() == 1:
    return [data_state]
  blob = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size]))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(blobs[i, :int(n)])) for i, n in enumerate(sizes)]


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """sum_i bits(x_i) * (2 i + 1) mod 2^32, i the flat (row-major) index.

  Integer wrap-around sums are exact and order-free, so the value does not
  depend on the sharding or on how XLA splits the reduction; the index is built
  from per-dimension iotas (no reshape of a sharded array). Any single
  damaged word changes it; other damage goes unnoticed with probability ~2^-32.
  """
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:  # two 32-bit words per element (trailing axis)
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    u = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
  index = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(u.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, dim) * jnp.uint32(stride)
    stride = (stride * u.shape[dim]) % 2**32
  return jnp.sum(u * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksums_on_device(tree):
  return jax.tree.map(_leaf_checksum, tree)


def _scalar(x: jax.Array) -> int:
  # A 0-d result is replicated on every device; in a multi-process run it is
  # not fully addressable, so read this process's copy.
  return int(x.addressable_data(0) if not x.is_fully_addressable else jax.device_get(x))


def checksums(tree) -> dict[str, int]:
  """{array path: checksum} of a pytree of (possibly sharded, multi-process) arrays."""
  sums = _checksums_on_device(tree)
  return {_path(p): _scalar(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


class Checkpointer:
  """Saves every `save_every_steps` steps, keeps the newest `max_to_keep`.

  Each save also records a checksum of every array (`checksums`) in the step's
  JSON item; `restore` verifies them, so a damaged file is reported as damage
  rather than restored as garbage. `restore_latest` falls back from damaged
  steps to the newest intact one. `save` (a collective in a multi-process run)
  keeps every process's data state; `check`, `save`, `wait` and `close` raise
  CheckpointSaveError once a save has failed.
  """

  def __init__(self, directory: str, *, save_every_steps: int = 1000,
               max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._pending = None  # step of the save in flight (not yet seen to succeed)
    self._failed: CheckpointSaveError | None = None
    self._filter = None
    if not os.environ.get("POSTTRAIN_JAX_TRACEBACK"):
      self._filter = _OrbaxErrorFilter()
      for name in _OrbaxErrorFilter.LOGGERS:
        logging.getLogger(name).addFilter(self._filter)
      _quiet_orphaned_writes()
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every_steps, max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict | None = None,
           force: bool = False) -> bool:
    """Starts an (async) save if `step` is due (or `force`); returns whether it did.

    Raises CheckpointSaveError if this save or an earlier one failed.
    """
    self.check()
    if not force and not self._manager.should_save(step):
      return False
    if self._pending is not None:  # orbax would wait for it, and raise its error
      self._finish_pending()
    data = {PER_PROCESS: _gather_data_states(data_state or {}), CHECKSUMS: checksums(state)}
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 DATA: ocp.args.JsonSave(data)})
    try:
      saved = self._manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore/orbax raise many kinds
      raise self._save_failed(step, e) from e
    if saved:
      self._pending = step
      if not self._manager.is_saving_in_progress():  # a synchronous save: done
        self._finish_pending()
    return saved

  def check(self) -> None:
    """Raises CheckpointSaveError if a save has failed; returns at once while
    one is still being written."""
    if self._failed is not None:
      raise self._failed
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e
    if not os.path.isdir(os.path.join(self.directory, str(step))):
      raise self._save_failed(step, None)

  def _save_failed(self, step: int, error: Exception | None) -> CheckpointSaveError:
    cause = _cause(error) if error is not None else "it was not finalized (see orbax's log)"
    intact = [s for s in self._finalized_steps() if s != step]
    kept = (f"the newest complete checkpoint, step {max(intact)}, is intact" if intact
            else "there is no earlier checkpoint")
    self._failed = CheckpointSaveError(
        f"Saving checkpoint {os.path.join(self.directory, str(step))} failed: {cause}. "
        f"Training stopped; {kept}. Fix: free space (or fix the cause) on that file "
        "system and run the same command to resume.")
    return self._failed

  def _finalized_steps(self) -> list[int]:
    try:
      return [int(n) for n in os.listdir(self.directory) if n.isdigit()]
    except OSError:
      return []

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs).

    Raises CheckpointMismatchError if the arrays' shapes differ from the
    model's, CheckpointDamagedError if the step's files are missing, unreadable
    or fail their checksums.
    """
    step_dir = os.path.join(self.directory, str(step))
    try:
      saved = self._manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore/orbax raise many kinds
      raise CheckpointDamagedError(f"its metadata cannot be read: {_first_line(e)}") from e
    if saved is None or saved.get(STATE) is None:
      raise CheckpointDamagedError(f"{STATE}/_METADATA is missing or unreadable")
    check_compatible(saved[STATE], abstract_state, step_dir)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state),
          DATA: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointDamagedError(f"reading it failed: {_first_line(e)}") from e
    data = dict(restored[DATA] or {})
    expected = data.pop(CHECKSUMS, None)
    data = self._own_data_state(step_dir, data)
    if expected is not None:  # checkpoints written before checksums have none
      actual = checksums(restored[STATE])
      bad = sorted(k for k in expected if actual.get(k) != expected[k])
      if bad:
        raise CheckpointDamagedError(
            f"checksum mismatch in {len(bad)} array(s): {', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}")
    return restored[STATE], data

  def restore_latest(self, abstract_state, warn=None):
    """(step, state, data_state) of the newest intact step; (None, None, None)
    without checkpoints.

    A damaged step is reported through `warn` (default: stderr on process 0),
    moved aside to `<directory>_damaged/<step>` (kept, never deleted, and out of
    the way of the steps this run will save again) and the next older step is
    tried. Raises CheckpointDamagedError if every step is damaged.
    """
    warn = warn or _warn
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data = self.restore(step, abstract_state)
      except CheckpointDamagedError as e:
        kept = self._set_aside(step)
        damaged.append(f"step {step} ({e})")
        warn(f"WARNING: checkpoint {step} in {self.directory} is damaged ({e}); "
             f"kept at {kept}; trying the previous step.")
        continue
      if damaged:
        warn(f"WARNING: resuming from step {step}, the newest intact checkpoint.")
      return step, state, data
    if damaged:
      raise CheckpointDamagedError(
          f"No intact checkpoint in {self.directory}: {'; '.join(damaged)}. The "
          f"damaged steps are kept under {self.directory}_damaged. Fix: restore the "
          "checkpoints from a copy, or start in a fresh run directory.")
    return None, None, None

  def _set_aside(self, step: int) -> str:
    """Moves step's directory to <directory>_damaged/<step>[.N]; returns where."""
    target = os.path.join(f"{self.directory}_damaged", str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      n, final = 1, target
      while os.path.exists(final):
        n, final = n + 1, f"{target}.{n}"
      os.rename(os.path.join(self.directory, str(step)), final)
      target = final
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()
    return target

  @staticmethod
  def _own_data_state(step_dir: str, data: dict) -> dict:
    """This process's entry of the saved data states (see the module docstring)."""
    if PER_PROCESS not in data:  # a checkpoint from before per-process positions
      return data
    states, count = data[PER_PROCESS], jax.process_count()
    if len(states) != count:
      raise CheckpointMismatchError(
          f"Checkpoint {step_dir} was written by {len(states)} process(es), this run "
          f"has {count}: each process's data position is saved, and they cannot be "
          f"split or merged. Fix: resume with {len(states)} process(es) (the same "
          "launch shape), or start in a fresh run directory.")
    return dict(states[jax.process_index()])

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    self.check()
    if self._pending is not None:
      self._finish_pending()

  def close(self) -> None:
    """Waits for the save in flight (raising CheckpointSaveError if it failed)
    and closes. After a failure already raised, closes without raising again
    (and keeps orbax's errors held back: its abandoned writes report at exit)."""
    try:
      if self._failed is None:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if self._failed is None:
          raise
      finally:
        if self._filter is not None and self._failed is None:
          for name in _OrbaxErrorFilter.LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)
          self._filter = None


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text if len(text) <= 200 else text[:200] + " ..."


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
