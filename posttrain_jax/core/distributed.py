"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Launchers (launch/local.py, launch/xm_launch.py) tell each process its role
through environment variables, so binaries need no extra flags:

  POSTTRAIN_JAX_COORDINATOR     host:port of process 0's coordinator service
  POSTTRAIN_JAX_NUM_PROCESSES   total number of processes
  POSTTRAIN_JAX_PROCESS_ID      this process's index, 0-based
  POSTTRAIN_JAX_DISTRIBUTED     "auto": let JAX discover the cluster itself
                                (Cloud TPU pods and multi-slice)

Must run before anything touches a JAX backend (jax.devices(), arrays).
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import sys

import jax

COORDINATOR = "POSTTRAIN_JAX_COORDINATOR"
NUM_PROCESSES = "POSTTRAIN_JAX_NUM_PROCESSES"
PROCESS_ID = "POSTTRAIN_JAX_PROCESS_ID"
AUTO = "POSTTRAIN_JAX_DISTRIBUTED"


_initialized = False


def is_initialized() -> bool:
  """Whether this process joined a multi-process job through initialize_from_env."""
  return _initialized


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
  """Initializes jax.distributed if the environment asks for it; returns whether it did."""
  global _initialized
  env = os.environ if environ is None else environ
  if env.get(AUTO, "").lower() == "auto":
    jax.distributed.initialize()
    _initialized = True
    expected = env.get(NUM_PROCESSES)
    if expected and jax.process_count() != int(expected):
      raise ValueError(
          f"jax.distributed found {jax.process_count()} processes but the launcher "
          f"started {expected} ({NUM_PROCESSES}): the hosts or slices did not all join.")
    return True
  given = {k: env.get(k) for k in (COORDINATOR, NUM_PROCESSES, PROCESS_ID)}
  if not any(given.values()):
    return False
  missing = [k for k, v in given.items() if not v]
  if missing:
    raise ValueError(f"Incomplete multi-process environment: {', '.join(missing)} "
                     f"not set (need {COORDINATOR}, {NUM_PROCESSES} and {PROCESS_ID}).")
  try:
    num, pid = int(given[NUM_PROCESSES]), int(given[PROCESS_ID])
  except ValueError as e:
    raise ValueError(f"{NUM_PROCESSES} and {PROCESS_ID} must be integers, got "
                     f"{given[NUM_PROCESSES]!r} and {given[PROCESS_ID]!r}.") from e
  if not 0 <= pid < num:
    raise ValueError(f"{PROCESS_ID}={pid} is outside [0, {NUM_PROCESSES}={num}).")
  jax.distributed.initialize(coordinator_address=given[COORDINATOR],
                             num_processes=num, process_id=pid)
  _initialized = True
  return True


def exit_now(code: int) -> None:
  """Leaves at once with `code`, flushing output first.

  After jax.distributed.initialize a normal exit waits in the shutdown barrier
  for every other process (minutes when one has failed), hiding the failure
  from the launcher; a failed process must leave immediately.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
