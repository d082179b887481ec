"""Runs a worker script as N local jax.distributed processes (test helper).

Each worker is called as `python SCRIPT PROCESS_ID NUM_PROCESSES PORT DEVICES`
and prints its result as a JSON line (gloo also logs on stdout).
"""

import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(script: str, pid: int, nproc: int, port: int, ndev: int) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen(
      [sys.executable, os.path.join(HERE, script), str(pid), str(nproc), str(port),
       str(ndev)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen, timeout: float = 300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  lines = [l for l in out.splitlines() if l.startswith("{")]
  return json.loads(lines[-1]) if lines else None


def run_two_and_one(script: str, devices: int = 8):
  """(result of process 0 of a 2-process run, result of a 1-process run)."""
  port = free_port()
  procs = [start(script, i, 2, port, devices // 2) for i in range(2)]
  try:
    multi = result(procs[0])
    result(procs[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return multi, result(start(script, 0, 1, 0, devices))
