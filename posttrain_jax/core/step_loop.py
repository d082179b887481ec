"""The step loop every job shares: preemption, the non-finite guard, checkpoints.

    loop = StepLoop(start=..., num_steps=..., guard=..., reporter=...,
                    checkpointer=..., data_state=lambda: {...})
    try:
      for step in loop:
        state, metrics = ...            # the job's own step
        loop.end_step(step, state, metrics)
        ...                             # the job's own evaluation
      loop.finish(state)
    finally:
      loop.close()

`end_step` reports the metrics, checks the previous step's non-finite flag (one
step behind, so the host never waits on the device) and saves a checkpoint
when due (always at the last step); the Checkpointer's save raises
CheckpointSaveError at the first step that ends after a save failed. A SIGTERM ends the iteration at the next
step boundary; `finish` then saves that step (if not saved yet) and says how
to resume. `final_step` is the step the run stopped at.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from posttrain_jax.core.preemption import PreemptionWatcher


class StepLoop:
  """Steps start + 1 .. num_steps of a training job (see the module docstring)."""

  def __init__(self, *, start: int, num_steps: int, guard, reporter, checkpointer,
               data_state: Callable[[], dict]):
    self.start, self.num_steps = start, num_steps
    self.guard, self.reporter, self.checkpointer = guard, reporter, checkpointer
    self.data_state = data_state
    self.watcher = PreemptionWatcher()
    self.preempted = False
    self.step = start       # the last step taken
    self._last = None       # (step, device non-finite flag) not yet checked

  def __iter__(self) -> Iterator[int]:
    for step in range(self.start + 1, self.num_steps + 1):
      if self.watcher.should_stop(step - 1):
        self.preempted = True
        return
      yield step

  def end_step(self, step: int, state, metrics) -> None:
    self.step = step
    if self._last is not None:
      self.guard.observe(self._last[0], bool(self._last[1]))
    self._last = (step, metrics["nonfinite"])
    self.reporter.update(step, metrics)
    self.checkpointer.save(step, state, self.data_state(), force=step == self.num_steps)

  def finish(self, state) -> None:
    """Checks the last step; after a SIGTERM saves it and says how to resume."""
    if self._last is not None and not self.preempted:
      self.guard.observe(self._last[0], bool(self._last[1]))
    if self.preempted:
      if self.checkpointer.latest_step() != self.step:
        self.checkpointer.save(self.step, state, self.data_state(), force=True)
      self.checkpointer.wait()
      self.reporter.print(f"preempted (SIGTERM): checkpoint saved at step {self.step}; "
                          "run the same command to resume")

  @property
  def final_step(self) -> int:
    return self.step if self.preempted else max(self.start, self.num_steps)

  def close(self) -> None:
    self.watcher.close()
    self.reporter.close()
    self.checkpointer.close()

