"""Training progress: clu metric writers (TensorBoard + log) and a console line.

Device metrics are kept as arrays and fetched only every `log_every` steps, so
reporting never stalls the asynchronous dispatch of train steps.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from posttrain_jax.core import operative_config as operative_config_lib
from posttrain_jax.core.quiet_stderr import quiet_stderr

with quiet_stderr():  # clu's writers import TensorFlow when it is installed
  from clu import metric_writers  # pylint: disable=g-import-not-at-top


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressReporter:
  """Averages step metrics over a window and writes them every `log_every` steps.

  Scalars written: every metric of the step (window means; "tokens" becomes
  tokens_per_sec) and steps_per_sec; `history` keeps every step's "loss". The
  progress line shows the `shown` metrics that are present.

  Rates and the ETA leave out the first step of each start: its time is
  mostly compilation (jit compiles on the first call, before update() sees the
  step), which made the first ETA several times too long. The first window's
  rate runs from the first update() to the flush; a window holding only the
  first step has no rate yet (the line says so, steps_per_sec is not written).
  """

  # (metric key, label, format) printed on the progress line when present.
  SHOWN = (("loss", "loss", "{:.4f}"), ("accuracy", "acc", "{:.3f}"),
           ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "gnorm", "{:.3f}"),
           ("tokens_per_sec", "tok/s", "{:,.0f}"))

  def __init__(self, log_dir: str, *, total_steps: int, start_step: int,
               log_every: int = 10, stream=None, shown=None):
    self.writer = metric_writers.create_default_writer(
        log_dir, just_logging=jax.process_index() > 0)
    self.total_steps, self.log_every = total_steps, log_every
    self.stream = stream if stream is not None else sys.stdout  # as redirected now
    self.history: dict[int, float] = {}
    self.shown = self.SHOWN if shown is None else tuple(shown)
    self._pending: list[tuple[int, dict]] = []
    self._last_time, self._last_step = time.perf_counter(), start_step
    self._first_step_done = False  # the rate's window starts after the first step

  def print(self, text: str) -> None:
    if jax.process_index() == 0:
      print(text, file=self.stream, flush=True)

  def write_text(self, step: int, name: str, text: str) -> None:
    self.writer.write_texts(step, {name: text})

  def update(self, step: int, metrics: dict) -> None:
    """Records the metrics of the step that ended at `step` (1-based)."""
    if not self._first_step_done:  # compiled and dispatched: time from here
      self._first_step_done = True
      self._last_time, self._last_step = time.perf_counter(), step
    self._pending.append((step, metrics))
    if step % self.log_every == 0 or step == self.total_steps:
      self.flush()

  def restart(self) -> None:
    """A new start within the run (elastic DiLoCo's heal jumps steps it did not
    train): writes what is pending; the rate restarts as at a start."""
    self.flush()
    self._first_step_done = False

  def flush(self) -> None:
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    steps = [s for s, _ in self._pending]
    for s, m in zip(steps, fetched):
      self.history[s] = float(m["loss"])
    step = steps[-1]
    now = time.perf_counter()
    elapsed = now - self._last_time
    scalars = {k: float(np.mean([m[k] for m in fetched]))
               for k in fetched[0] if k != "tokens"}
    timed = [m for s, m in zip(steps, fetched) if s > self._last_step]  # not the first step
    if timed:
      scalars["steps_per_sec"] = (step - self._last_step) / max(elapsed, 1e-9)
      if "tokens" in fetched[0]:
        tokens = float(sum(m["tokens"] for m in timed))
        scalars["tokens_per_sec"] = tokens / max(elapsed, 1e-9)
    self.writer.write_scalars(step, scalars)
    width = len(str(self.total_steps))
    shown = [f"step {step:>{width}}/{self.total_steps}"]
    shown += [f"{label} {fmt.format(scalars[key])}" for key, label, fmt in self.shown
              if key in scalars]
    if timed:
      eta = (self.total_steps - step) / max(scalars["steps_per_sec"], 1e-9)
      shown.append(f"{scalars['steps_per_sec']:.2f} steps/s | ETA {_duration(eta)}")
    else:
      shown.append("ETA after the first step (compiling)")
    self.print(" | ".join(shown))
    self._pending.clear()
    self._last_time, self._last_step = now, step

  def write_eval(self, step: int, metrics: dict[str, float]) -> None:
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    self.print(f"eval at step {step}: {shown}")

  def close(self) -> None:
    self.flush()
    self.writer.flush()
    self.writer.close()


def job_reporter(run_dir: str, *, total_steps: int, start_step: int, log_every: int,
                 shown=None, operative_config: str | None = None) -> ProgressReporter:
  """A job's ProgressReporter once its start has succeeded: records the
  operative configuration in run_dir (`operative_config.record`) and writes it
  as the TensorBoard text "config" at start_step."""
  reporter = ProgressReporter(run_dir, total_steps=total_steps, start_step=start_step,
                              log_every=log_every, shown=shown)
  operative_config_lib.record(run_dir, operative_config)
  if operative_config:
    reporter.write_text(start_step, "config", operative_config)
  return reporter
