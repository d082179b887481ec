"""Captures a jax.profiler trace of training steps [start, stop) into a folder."""

from __future__ import annotations

import os

import jax


class StepProfiler:
  """Call `before_step(step)` before dispatching each step and `after_step(step,
  outputs)` after it; the trace covers steps start..stop-1 (TensorBoard's
  profile plugin reads it from `directory`)."""

  def __init__(self, directory: str, steps: tuple[int, int] | None):
    if steps is not None:
      start, stop = (int(s) for s in steps)
      if not 0 < start < stop:
        raise ValueError(f"profile_steps must be (start, stop) with 0 < start < stop, "
                         f"got {tuple(steps)}.")
      steps = (start, stop)
    self.directory, self.steps = directory, steps
    self.active = False

  def before_step(self, step: int) -> None:
    if self.steps and step == self.steps[0] and not self.active:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, outputs) -> None:
    if self.active and step == self.steps[1] - 1:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
