"""Elastic Streaming DiLoCo on one machine: torchft's Lighthouse plus N slices.

  python launch/local.py --elastic_slices=2 --elastic_restarts=2 \\
      --gin_file=gin/experiments/elastic_diloco/lm.gin      # the LM (binary)
  python launch/local.py --elastic_slices=3 --elastic_restarts=2 \\
      -- --out_dir=runs/elastic --steps=200                 # the toy task

With training-binary arguments (--gin_file, --gin.NAME=VALUE) each slice runs
the binary's `elastic_diloco` job with its slice_index, num_slices (also
DiLoCoConfig.num_replicas) and the Lighthouse's address bound; with arguments
after `--`, the toy task's slices (posttrain_jax.diloco.elastic.run_slice).

Starts the quorum service on 127.0.0.1:PORT -- the binary's
`elastic_lighthouse` job with the same gin (its LighthouseConfig; the
--elastic_min_replicas / --elastic_join_timeout / --elastic_heartbeat_timeout
given override it), or `torchft_lighthouse` for the toy task -- and N slice
processes (toy: `python -m posttrain_jax.diloco.elastic.run_slice --slice=i
--num_slices=N --lighthouse=http://127.0.0.1:PORT ARGS`, ARGS what follows
`--`). Each slice is its own JAX job (one process per slice here). Unlike the
SPMD launcher, a slice that fails does not stop the others: it is started again
with the same command (it heals from a live slice) up to --elastic_restarts
times. A Lighthouse that dies is started again on the same port (the slices'
quorum calls retry meanwhile, see diloco/elastic/membership.py). SIGTERM or
Ctrl-C stops the slices with SIGTERM (each checkpoints its next sync, see
diloco/elastic/slice.py; SIGKILL after --grace seconds), then the Lighthouse.
Output lines are prefixed "[s<i>] " and "[lighthouse] ". Returns 0 when every
slice finished, 1 when one failed for good, 124 on --timeout, 128+N on signal
N; the Lighthouse and every slice are stopped on the way out.
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

from binary_args import binds  # pylint: disable=g-import-not-at-top

SLICE_MODULE = "posttrain_jax.diloco.elastic.run_slice"
BINARY_MODULE = "posttrain_jax.main"
LIGHTHOUSE_LOG = "lighthouse.log"  # as posttrain_jax/jobs/elastic_diloco.py


def lighthouse_command(port: int, min_replicas: int | None = None,
                       join_timeout: float | None = None,
                       heartbeat_timeout: float | None = None) -> list[str]:
  """torchft's `torchft_lighthouse` on 127.0.0.1:port (the toy task's), with
  the given settings (default 1 slice, 5 s, 1 s)."""
  exe = shutil.which("torchft_lighthouse") or os.path.join(
      os.path.dirname(sys.executable), "torchft_lighthouse")
  return [exe, "--min_replicas", str(1 if min_replicas is None else min_replicas),
          "--bind", f"127.0.0.1:{port}",
          "--join_timeout_ms", str(int((5.0 if join_timeout is None else join_timeout) * 1000)),
          "--heartbeat_timeout_ms",
          str(int((1.0 if heartbeat_timeout is None else heartbeat_timeout) * 1000)),
          "--quorum_tick_ms", "50"]


def binary_lighthouse_command(port: int, binary_args: Sequence[str],
                              min_replicas: int | None = None,
                              join_timeout: float | None = None,
                              heartbeat_timeout: float | None = None) -> list[str]:
  """The binary's `elastic_lighthouse` job on 127.0.0.1:port with the gin of
  binary_args, so that the gin's LighthouseConfig is the Lighthouse's; each
  setting given here overrides the gin's. Its torchft log goes to
  RUN_DIR/lighthouse.log (unless binary_args bind elastic_lighthouse.log_dir)."""
  overrides = [f"--gin.LighthouseConfig.{name}={value!r}" for name, value in (
      ("min_replicas", min_replicas), ("join_timeout", join_timeout),
      ("heartbeat_timeout", heartbeat_timeout)) if value is not None]
  if overrides:
    overrides.insert(0, "--gin.elastic_lighthouse.quorum=@LighthouseConfig()")
  if not binds(binary_args, "elastic_lighthouse.log_dir"):
    overrides.append("--gin.elastic_lighthouse.log_dir=%RUN_DIR")
  return [sys.executable, "-m", BINARY_MODULE, *binary_args,
          "--gin.job.name='elastic_lighthouse'",
          f"--gin.elastic_lighthouse.bind='127.0.0.1:{port}'", *overrides]


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


def toy_log_path(args: Sequence[str]) -> str | None:
  """OUT_DIR/lighthouse.log of the toy task's arguments (None without --out_dir)."""
  dirs = [a.partition("=")[2] for a in args if a.startswith("--out_dir=")]
  return os.path.join(dirs[-1], LIGHTHOUSE_LOG) if dirs else None


def _start(command, env, name, out, lock, log_path=None):
  """Starts command; its output goes to `out` line by line, prefixed
  "[name] ", or appended to the file log_path."""
  log = None
  if log_path:
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    log = open(log_path, "ab")
  popen = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                           stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
  if log is not None:
    log.close()  # the child holds it
    return popen

  def stream():
    for raw in iter(popen.stdout.readline, b""):
      with lock:
        out.write(f"[{name}] " + raw.decode("utf-8", errors="replace").rstrip("\n") + "\n")
        out.flush()
  threading.Thread(target=stream, daemon=True).start()
  return popen


def _signal(popen, sig) -> None:
  if popen.poll() is None:
    try:
      os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
      pass


def _terminate(popens, grace: float, say) -> None:
  """SIGTERM to each process group; SIGKILL to those still running after
  `grace` seconds."""
  for p in popens:
    _signal(p, signal.SIGTERM)
  end = time.monotonic() + grace
  for p in popens:
    try:
      p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  for p in popens:
    if p.poll() is None:
      say(f"pid {p.pid} still running {grace:g} s after SIGTERM; killing it")
      _signal(p, signal.SIGKILL)
      p.wait()


def run_elastic(num_slices: int, args: Sequence[str], env: dict[str, str], port: int,
                *, binary: bool = False, restarts: int = 0,
                min_replicas: int | None = None, join_timeout: float | None = None,
                heartbeat_timeout: float | None = None, timeout: float | None = None,
                out=None, grace: float = 30.0, lighthouse_restarts: int = 10) -> int:
  """The Lighthouse and num_slices slices (module docstring). The Lighthouse
  settings left None are the gin's LighthouseConfig (binary) or 1 / 5 s / 1 s
  (toy). A Lighthouse that exits is started again on the same port, up to
  lighthouse_restarts times. SIGTERM or SIGINT (in the main thread), and the
  timeout, stop the slices (SIGTERM, SIGKILL after `grace` s: a slice
  checkpoints its next sync and exits), then the Lighthouse. Returns 0, 1
  (a slice failed for good, or the Lighthouse did), 124 (timeout) or 128+N
  (signal N)."""
  out = out or sys.stdout
  lock = threading.Lock()

  def say(message: str) -> None:
    with lock:
      out.write(f"[launch] {message}\n")
      out.flush()

  command = binary_slice_command if binary else slice_command
  settings = (min_replicas, join_timeout, heartbeat_timeout)
  lh_command = (binary_lighthouse_command(port, args, *settings) if binary
                else lighthouse_command(port, *settings))
  lh_log = None if binary else toy_log_path(args)  # the binary's job writes its own
  slice_env = {"RUST_LOG": "warn", **env}  # torchft's client INFO lines: RUST_LOG=info

  def start_lighthouse():
    popen = _start(lh_command, env, "lighthouse", out, lock, lh_log)
    say(f"Lighthouse (pid {popen.pid}) on 127.0.0.1:{port}"
        + (f"; its log: {lh_log}" if lh_log else ""))
    return popen
  interrupted: list[int] = []
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, lambda signum, frame: interrupted.append(signum))
  procs, left, done = {}, {i: restarts for i in range(num_slices)}, {}
  lighthouse = None
  deadline = None if timeout is None else time.monotonic() + timeout
  status = 0
  try:
    lighthouse = start_lighthouse()
    for i in range(num_slices):
      procs[i] = _start(command(i, num_slices, port, args), slice_env, f"s{i}", out, lock)
    while len(done) < num_slices:
      if interrupted:
        status = 128 + interrupted[0]
        say(f"received signal {interrupted[0]}; stopping the slices (SIGTERM, "
            f"SIGKILL after {grace:g} s), then the Lighthouse")
        break
      code = lighthouse.poll()
      if code is not None:
        if lighthouse_restarts <= 0:
          say(f"the Lighthouse exited with {code} and no restart is left; stopping")
          status = 1
          break
        lighthouse_restarts -= 1
        say(f"the Lighthouse exited with {code}; restarting it on 127.0.0.1:{port} "
            f"({lighthouse_restarts} restart(s) left; the slices retry meanwhile)")
        time.sleep(0.2)
        lighthouse = start_lighthouse()
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
        say(f"s{i} exited with {code}; restarting it ({left[i]} restart(s) left)")
        procs[i] = _start(command(i, num_slices, port, args), slice_env, f"s{i}", out,
                          lock)
      if deadline is not None and time.monotonic() > deadline:
        status = 124
        say(f"timeout after {timeout:g} s; stopping the slices, then the Lighthouse")
        break
      time.sleep(0.05)
    _terminate([p for i, p in procs.items() if i not in done], grace, say)
    if lighthouse is not None:
      _terminate([lighthouse], min(grace, 5.0), say)
  finally:
    for p in list(procs.values()) + ([lighthouse] if lighthouse is not None else []):
      _signal(p, signal.SIGKILL)  # anything left, e.g. after an exception
      p.wait()
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return status
