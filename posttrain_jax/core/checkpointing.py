"""Atomic, asynchronous checkpoints of the train state and the data position.

Wraps orbax's CheckpointManager: each step directory holds the train state
("state", sharded arrays) and the input pipeline position ("data", JSON).
orbax writes into a temporary directory and renames it when complete, so a
crash mid-save never leaves a half-written step behind. Restores check every
array's shape against the model first and name each mismatch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


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


class Checkpointer:
  """Saves every `save_every_steps` steps, keeps the newest `max_to_keep`."""

  def __init__(self, directory: str, *, save_every_steps: int = 1000,
               max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
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
    """Starts an (async) save if `step` is due (or `force`); returns whether it did."""
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 DATA: ocp.args.JsonSave(data_state or {})})
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores onto the shardings in `abstract_state` (ShapeDtypeStructs)."""
    step_dir = os.path.join(self.directory, str(step))
    saved = self._manager.item_metadata(step)[STATE]
    check_compatible(saved, abstract_state, step_dir)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state),
        DATA: ocp.args.JsonRestore()}))
    return restored[STATE], dict(restored[DATA] or {})

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
