"""Local elastic DiLoCo runs for tests: the Lighthouse and slices as child
processes (test helper). Every child is killed in `ElasticRun.close`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from posttrain_jax.diloco.elastic import run_slice

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
LIGHTHOUSE = os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
HEARTBEAT = 1.0  # the Lighthouse's heartbeat timeout of the tests (seconds)
ARGS = ["--sync_every=4", "--num_fragments=2", "--overlap=1", "--rows=16",
        "--width=16", "--layers=4", "--heartbeat_every=0.1"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ElasticRun:
  """A Lighthouse plus slices `python -m ...run_slice` writing to out_dir."""

  def __init__(self, out_dir: str, num_slices: int, args: list[str],
               min_replicas: int = 1, join_timeout: float = 5.0,
               heartbeat_timeout: float = 1.0):
    self.out_dir, self.num_slices, self.args = str(out_dir), num_slices, list(args)
    self.port = free_port()
    self.procs: dict[int, subprocess.Popen] = {}
    self.lighthouse = subprocess.Popen(
        [LIGHTHOUSE, "--min_replicas", str(min_replicas), "--bind",
         f"127.0.0.1:{self.port}", "--join_timeout_ms", str(int(join_timeout * 1000)),
         "--heartbeat_timeout_ms", str(int(heartbeat_timeout * 1000)),
         "--quorum_tick_ms", "50"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.out_dir, "lighthouse.log"), "ab"),
        start_new_session=True)

  def start(self, s: int, extra: tuple[str, ...] = ()) -> None:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", RUST_LOG="warn")
    env.pop("XLA_FLAGS", None)
    err = open(os.path.join(self.out_dir, f"slice{s}.err"), "ab")
    self.procs[s] = subprocess.Popen(
        [sys.executable, "-m", "posttrain_jax.diloco.elastic.run_slice", f"--slice={s}",
         f"--num_slices={self.num_slices}", f"--lighthouse=http://127.0.0.1:{self.port}",
         f"--out_dir={self.out_dir}"] + self.args + list(extra),
        env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

  def records(self, s: int) -> list[dict]:
    path = os.path.join(self.out_dir, f"slice{s}.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(l) for l in f if l.strip()]

  def wait_for(self, pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      if pred():
        return
      time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")

  def hold(self, step: int) -> tuple[str, ...]:
    """Arguments that make a slice wait after inner step `step` until
    `release` (so that it cannot finish before a restarted slice is up)."""
    return (f"--hold_step={step}", f"--hold_file={os.path.join(self.out_dir, 'release')}")

  def release_when_restarted(self, s: int, timeout: float) -> None:
    """Releases the held slices once slice s's second process has compiled
    its programs and asks to join."""
    self.wait_for(lambda: sum(x["event"] == "joining" for x in self.records(s)) >= 2,
                  timeout, f"the restarted slice {s} to ask to join")
    open(os.path.join(self.out_dir, "release"), "w").close()

  def kill(self, s: int) -> None:
    os.killpg(self.procs[s].pid, signal.SIGKILL)
    self.procs[s].wait()

  def wait(self, timeout: float) -> dict[int, int]:
    end = time.monotonic() + timeout
    for p in self.procs.values():
      p.wait(timeout=max(0.1, end - time.monotonic()))
    return {s: p.returncode for s, p in self.procs.items()}

  def outer(self, s: int) -> dict[str, np.ndarray]:
    with np.load(os.path.join(self.out_dir, f"slice{s}_outer.npz")) as f:
      return dict(f)

  def close(self) -> None:
    for p in list(self.procs.values()) + [self.lighthouse]:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
        p.wait()


flat = run_slice.flat_arrays
