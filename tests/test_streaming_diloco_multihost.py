"""Streaming DiLoCo with one jax.distributed process per replica matches one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(pid, nproc, port, ndev):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen(
      [sys.executable, os.path.join(HERE, "diloco_multihost_worker.py"), str(pid),
       str(nproc), str(port), str(ndev)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _result(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  lines = [l for l in out.splitlines() if l.startswith("{")]  # gloo also logs here
  return json.loads(lines[-1]) if lines else None


def test_one_process_per_replica_matches_single_process():
  port = _free_port()
  procs = [_start(i, 2, port, 4) for i in range(2)]
  try:
    multi = _result(procs[0])
    _result(procs[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  single = _result(_start(0, 1, 0, 8))
  assert multi["mesh"] == single["mesh"] == {"replica": 2, "data": 1, "fsdp": 4,
                                             "tensor": 1}
  assert multi["replica_processes"] == [[0], [1]]  # each replica is one process
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=2e-5)
  assert multi["outer_sums"].keys() == single["outer_sums"].keys()
  assert any("inflight0" in k for k in single["outer_sums"])
  for k, v in single["outer_sums"].items():
    np.testing.assert_allclose(multi["outer_sums"][k], v, rtol=1e-4, err_msg=k)
