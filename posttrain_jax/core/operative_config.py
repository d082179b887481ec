"""The operative gin configuration of each start of a run, kept in its run directory.

`record(run_dir, text)` is called by a job once its start has succeeded (its
checkpoint restored or its state initialised), so a start that fails -- a
ModelConfig that does not match the run's checkpoints, a missing teacher --
leaves the run directory as it was. RUN/config.gin is the configuration of the
run's first successful start (the tools read the run's ModelConfig from it); a
later start whose configuration differs is kept beside it as
RUN/config.<UTC time>.gin. Files are written atomically (temporary file, then
rename), by process 0 only.
"""

from __future__ import annotations

import os
import time

import jax

RUN_CONFIG = "config.gin"


def record(run_dir: str, text: str | None, *, now: float | None = None) -> str | None:
  """Writes this start's configuration; returns the path it is kept at (None
  when there is nothing to write or on processes other than 0)."""
  if not text or jax.process_index() != 0:
    return None
  path = os.path.join(run_dir, RUN_CONFIG)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    path, n = os.path.join(run_dir, f"config.{stamp}.gin"), 1
    while os.path.exists(path):
      n += 1
      path = os.path.join(run_dir, f"config.{stamp}.{n}.gin")
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
  return path
