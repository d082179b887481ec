"""Stopping cleanly on SIGTERM: checkpoint at the next step boundary, exit 0.

Single process: a SIGTERM handler sets a flag that the loop polls each step.
Several processes must stop at the same step: with JAX's preemption sync
manager (Cloud TPU, where jax.distributed catches SIGTERM itself) every
process asks `reached_preemption_sync_point(step)`; elsewhere (CPU, gloo) the
processes all-gather their flags each step.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np


class PreemptionWatcher:
  """Answers `should_stop(step)` identically on every process."""

  def __init__(self):
    self._flag = False
    self._previous = None
    self._sync_manager = False
    if jax.process_count() > 1:
      try:
        multihost_utils.reached_preemption_sync_point(0)
        self._sync_manager = True  # JAX handles SIGTERM; keep its handler
      except RuntimeError:
        pass
    if not self._sync_manager and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._flag = True

  def should_stop(self, step: int) -> bool:
    if self._sync_manager:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() > 1:
      flags = multihost_utils.process_allgather(np.array(self._flag))
      return bool(np.any(flags))
    return self._flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
