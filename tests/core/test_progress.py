"""ProgressReporter: the rate and ETA leave out the first step (compilation)."""

import io

from posttrain_jax.core import progress


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _reporter(tmp_path, monkeypatch, log_every, total=100):
  clock = Clock()
  monkeypatch.setattr(progress.time, "perf_counter", clock)
  out = io.StringIO()
  reporter = progress.ProgressReporter(str(tmp_path), total_steps=total, start_step=0,
                                       log_every=log_every, stream=out)
  return reporter, clock, out


def test_the_first_eta_leaves_out_the_compiling_step(tmp_path, monkeypatch):
  # Step 1 takes 100 s (compilation), then 1 s a step: after step 10 the ETA
  # for the remaining 90 steps is 90 s, not 90 x 109 / 10 s.
  reporter, clock, out = _reporter(tmp_path, monkeypatch, log_every=10)
  for step in range(1, 11):
    clock.now = 100.0 + (step - 1)
    reporter.update(step, {"loss": 1.0, "tokens": 50})
  line = out.getvalue().strip()
  assert line.endswith("1.00 steps/s | ETA 1m30s"), line
  assert "tok/s 50" in line  # the first step's tokens are left out with its time
  # Later windows are timed from the previous flush as before.
  for step in range(11, 21):
    clock.now = 109.0 + 2 * (step - 10)
    reporter.update(step, {"loss": 1.0})
  assert out.getvalue().strip().splitlines()[-1].endswith("0.50 steps/s | ETA 2m40s")
  reporter.close()


def test_a_window_of_only_the_first_step_has_no_rate_yet(tmp_path, monkeypatch):
  reporter, clock, out = _reporter(tmp_path, monkeypatch, log_every=1, total=3)
  for step in (1, 2, 3):
    clock.now = 100.0 + 2 * (step - 1)
    reporter.update(step, {"loss": 1.0})
  lines = out.getvalue().strip().splitlines()
  assert lines[0] == "step 1/3 | loss 1.0000 | ETA after the first step (compiling)"
  assert lines[1] == "step 2/3 | loss 1.0000 | 0.50 steps/s | ETA 2s"
  reporter.close()


def test_restart_leaves_out_the_steps_a_heal_jumps(tmp_path, monkeypatch):
  # Elastic DiLoCo: 1 s a step to step 10, a heal jumps to step 50 (not
  # trained here), then 1 s a step: the rate after the heal is 1 step/s, not
  # (60 - 10) / 10 s; what was pending before it is written first.
  reporter, clock, out = _reporter(tmp_path, monkeypatch, log_every=10)
  for step in range(1, 8):
    clock.now = float(step)
    reporter.update(step, {"loss": 1.0})
  clock.now = 9.0
  reporter.restart()  # healed to step 50
  assert out.getvalue().strip().splitlines()[-1].startswith("step   7/100 | loss")
  for step in range(51, 61):
    clock.now = 10.0 + (step - 51)
    reporter.update(step, {"loss": 1.0})
  assert out.getvalue().strip().splitlines()[-1].endswith("1.00 steps/s | ETA 40s")
  reporter.close()
