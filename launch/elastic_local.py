"""Elastic Streaming DiLoCo on one machine: torchft's Lighthouse plus N slices.

  python launch/local.py --elastic_slices=2 --elastic_restarts=2 \\
      --gin_file=gin/experiments/elastic_diloco/lm.gin      # the LM (binary)
  python launch/local.py --elastic_slices=3 --elastic_restarts=2 \\
      -- --out_dir=runs/elastic --steps=200                 # the toy task

With training-binary arguments (--gin_file, --gin.NAME=VALUE) each slice runs
the binary's `elastic_diloco` job with its slice_index, num_slices (also
DiLoCoConfig.num_replicas) and the Lighthouse's address bound; with arguments
after `--`, the toy task's slices (posttrain_jax.diloco.elastic.run_slice).

Starts the quorum service (`torchft_lighthouse`, on a free port) and N slice
processes `python -m posttrain_jax.diloco.elastic.run_slice --slice=i
--num_slices=N --lighthouse=http://127.0.0.1:PORT ARGS` (ARGS: what follows
`--`). Each slice is its own JAX job (one process per slice here). Unlike the
SPMD launcher, a slice that fails does not stop the others: it is started again
with the same command (it heals from a live slice) up to --elastic_restarts
times. Output lines are prefixed "[s<i>] " and "[lighthouse] ". Returns 0 when
every slice finished, 1 when one failed for good, 124 on --timeout; the
Lighthouse and every slice are stopped on the way out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

SLICE_MODULE = "posttrain_jax.diloco.elastic.run_slice"
BINARY_MODULE = "posttrain_jax.main"


def lighthouse_command(port: int, min_replicas: int, join_timeout: float,
                       heartbeat_timeout: float) -> list[str]:
  exe = shutil.which("torchft_lighthouse") or os.path.join(
      os.path.dirname(sys.executable), "torchft_lighthouse")
  return [exe, "--min_replicas", str(min_replicas), "--bind", f"127.0.0.1:{port}",
          "--join_timeout_ms", str(int(join_timeout * 1000)),
          "--heartbeat_timeout_ms", str(int(heartbeat_timeout * 1000)),
          "--quorum_tick_ms", "50"]


def slice_command(i: int, n: int, port: int, args: Sequence[str]) -> list[str]:
  """The toy task's slice (posttrain_jax.diloco.elastic.run_slice) with args."""
  return [sys.executable, "-m", SLICE_MODULE, f"--slice={i}", f"--num_slices={n}",
          f"--lighthouse=http://127.0.0.1:{port}", *args]


def binary_slice_command(i: int, n: int, port: int, binary_args: Sequence[str]) -> list[str]:
  """The binary's `elastic_diloco` job (the LM) as slice i of n: the gin of
  binary_args plus this slice's index, the slice count (= the DiLoCo replicas)
  and the Lighthouse's address."""
  return [sys.executable, "-m", BINARY_MODULE, *binary_args,
          "--gin.job.name='elastic_diloco'", f"--gin.elastic_diloco.slice_index={i}",
          f"--gin.elastic_diloco.num_slices={n}", f"--gin.DiLoCoConfig.num_replicas={n}",
          f"--gin.elastic_diloco.lighthouse='http://127.0.0.1:{port}'"]


def _start(command, env, name, out, lock):
  popen = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)

  def stream():
    for raw in iter(popen.stdout.readline, b""):
      with lock:
        out.write(f"[{name}] " + raw.decode("utf-8", errors="replace").rstrip("\n") + "\n")
        out.flush()
  threading.Thread(target=stream, daemon=True).start()
  return popen


def _kill(popen) -> None:
  if popen.poll() is None:
    try:
      os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    popen.wait()


def run_elastic(num_slices: int, args: Sequence[str], env: dict[str, str], port: int,
                *, binary: bool = False, restarts: int = 0, min_replicas: int = 1, join_timeout: float = 5.0,
                heartbeat_timeout: float = 1.0, timeout: float | None = None,
                out=None) -> int:
  out = out or sys.stdout
  lock = threading.Lock()
  command = binary_slice_command if binary else slice_command
  lighthouse = _start(lighthouse_command(port, min_replicas, join_timeout,
                                         heartbeat_timeout), env, "lighthouse", out, lock)
  procs, left, done = {}, {i: restarts for i in range(num_slices)}, {}
  deadline = None if timeout is None else time.monotonic() + timeout
  status = 0
  try:
    for i in range(num_slices):
      procs[i] = _start(command(i, num_slices, port, args), env, f"s{i}", out, lock)
    while len(done) < num_slices:
      for i, p in procs.items():
        code = p.poll()
        if i in done or code is None:
          continue
        if code == 0 or left[i] == 0:
          done[i] = code
          if code:
            status = 1
          continue
        left[i] -= 1
        with lock:
          out.write(f"[launch] s{i} exited with {code}; restarting it "
                    f"({left[i]} restart(s) left)\n")
        procs[i] = _start(command(i, num_slices, port, args), env, f"s{i}", out, lock)
      if deadline is not None and time.monotonic() > deadline:
        status = 124
        break
      time.sleep(0.05)
  finally:
    for p in procs.values():
      _kill(p)
    _kill(lighthouse)
  return status
