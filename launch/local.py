"""Runs N local processes under jax.distributed on 127.0.0.1 (CPU).

Each process plays one host (or one slice): it gets D virtual CPU devices and
is told its rank through environment variables, so a run with
`--gin.train.dcn_parallelism="{'replica': N}"` exercises the same multi-slice
code path (a hybrid mesh over processes) as a multi-slice TPU job.

  # the training binary (default command), two "slices" of four devices each
  python launch/local.py --num_processes=2 --devices_per_process=4 \\
      --gin_file=gin/experiments/lm_quickstart.gin \\
      --gin.RUN_DIR="'runs/local2'" --gin.train.dcn_parallelism="{'replica': 2}"

  # any command after `--`
  python launch/local.py --num_processes=2 -- python my_worker.py --flag=x

Every output line is prefixed with its process ("[p0] ...", "[p1] ...").
When a process exits non-zero the others are stopped (SIGTERM to their process
group, SIGKILL after --grace seconds) and the launcher returns that exit code;
--timeout stops everything and returns 124.

Environment of process i (the contract the binary implements, see
docs/launch.md):
  POSTTRAIN_JAX_COORDINATOR=127.0.0.1:PORT  POSTTRAIN_JAX_NUM_PROCESSES=N
  POSTTRAIN_JAX_PROCESS_ID=i  (only when N > 1)
  JAX_PLATFORMS=cpu  XLA_FLAGS=... --xla_force_host_platform_device_count=D
  PYTHONUNBUFFERED=1  PYTHONPATH=<repository root>:$PYTHONPATH
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from binary_args import (BINARY_MODULE, ENV_COORDINATOR, ENV_NUM_PROCESSES,  # pylint: disable=g-import-not-at-top,wrong-import-position
                         ENV_PROCESS_ID, REPO, LaunchError, split_binary_args)

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
EXIT_TIMEOUT = 124


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that was free a moment ago (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(base: Mapping[str, str], process_id: int, num_processes: int,
                port: int, devices_per_process: int,
                platforms: str = "cpu") -> dict[str, str]:
  """The environment of one local process."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith(_DEVICE_COUNT_FLAG)]
  flags.append(f"{_DEVICE_COUNT_FLAG}={devices_per_process}")
  env["XLA_FLAGS"] = " ".join(flags)
  if platforms:
    env["JAX_PLATFORMS"] = platforms
  for key in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID):
    env.pop(key, None)
  if num_processes > 1:
    env[ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[ENV_NUM_PROCESSES] = str(num_processes)
    env[ENV_PROCESS_ID] = str(process_id)
  env["PYTHONUNBUFFERED"] = "1"
  path = env.get("PYTHONPATH", "")
  env["PYTHONPATH"] = REPO + (os.pathsep + path if path else "")
  return env


def default_command(binary_args: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", BINARY_MODULE, *binary_args]


@dataclasses.dataclass
class _Proc:
  index: int
  popen: subprocess.Popen
  reader: threading.Thread


def _stream(index: int, pipe, out: TextIO, lock: threading.Lock) -> None:
  prefix = f"[p{index}] "
  for raw in iter(pipe.readline, b""):
    line = raw.decode("utf-8", errors="replace")
    if not line.endswith("\n"):
      line += "\n"
    with lock:
      out.write(prefix + line)
      out.flush()
  pipe.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  """Signals the process group led by one child we started."""
  if proc.poll() is not None:
    return
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


class _Interrupted(Exception):

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def run_processes(commands: Sequence[Sequence[str]],
                  envs: Sequence[Mapping[str, str]], *,
                  timeout: float | None = None, grace: float = 30.0,
                  cwd: str | None = None, out: TextIO | None = None,
                  log: TextIO | None = None, poll_interval: float = 0.05) -> int:
  """Starts one process per command, streams prefixed output, waits.

  Returns 0 if all exit 0; otherwise the exit status of the first process to
  fail (128+N for a signal), after stopping the others; EXIT_TIMEOUT (124) when
  `timeout` seconds pass first.
  """
  out = out or sys.stdout
  log = log or sys.stderr
  lock = threading.Lock()

  def say(message: str) -> None:
    with lock:
      log.write(f"[launch] {message}\n")
      log.flush()

  procs: list[_Proc] = []
  interrupted: list[int] = []
  previous = {}
  if threading.current_thread() is threading.main_thread():
    def on_signal(signum, frame):  # pylint: disable=unused-argument
      interrupted.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, on_signal)
  try:
    for i, (command, env) in enumerate(zip(commands, envs)):
      try:
        popen = subprocess.Popen(list(command), env=dict(env), cwd=cwd,
                                 stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT,
                                 start_new_session=True)
      except OSError as e:
        say(f"p{i}: cannot start {command[0]!r}: {e}")
        _stop([p.popen for p in procs], grace, say)
        return 127
      reader = threading.Thread(target=_stream, args=(i, popen.stdout, out, lock),
                                daemon=True)
      reader.start()
      procs.append(_Proc(i, popen, reader))
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    while True:
      if interrupted:
        raise _Interrupted(interrupted[0])
      codes = [p.popen.poll() for p in procs]
      failed = [(p, c) for p, c in zip(procs, codes) if c not in (None, 0)]
      if failed:
        first, code = failed[0]
        status = _exit_status(code)
        running = [p for p, c in zip(procs, codes) if c is None]
        say(f"p{first.index} exited with status {status}"
            + (f"; stopping {', '.join(f'p{p.index}' for p in running)}"
               if running else ""))
        _stop([p.popen for p in running], grace, say)
        break
      if all(c == 0 for c in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        running = [p for p, c in zip(procs, codes) if c is None]
        say(f"timeout after {timeout:g}s; stopping "
            f"{', '.join(f'p{p.index}' for p in running)}")
        _stop([p.popen for p in running], grace, say)
        status = EXIT_TIMEOUT
        break
      time.sleep(poll_interval)
  except _Interrupted as e:
    say(f"received signal {e.signum}; stopping all processes")
    _stop([p.popen for p in procs], grace, say)
    status = 128 + e.signum
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for p in procs:
    p.reader.join(timeout=5)
  return status


def _stop(popens: Sequence[subprocess.Popen], grace: float, say) -> None:
  """SIGTERM to each child's process group; SIGKILL after `grace` seconds."""
  for p in popens:
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in popens:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  for p in popens:
    if p.poll() is None:
      say(f"pid {p.pid} still running after {grace:g}s; killing it")
      _signal_group(p, signal.SIGKILL)
      p.wait()


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Returns (options, command)."""
  argv = list(argv)
  command: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, command = argv[:cut], argv[cut + 1:]
    if not command:
      raise LaunchError("nothing after `--`: give a command to run.")
  own, binary = split_binary_args(argv)
  parser = argparse.ArgumentParser(
      prog="launch/local.py",
      description="Run N local jax.distributed processes (CPU) on 127.0.0.1.",
      epilog="Other arguments (--gin_file, --gin.NAME=VALUE, --gin_bindings, "
             "--module_import) go to the training binary. Or give any command "
             "after `--`.")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=0,
                      help="coordinator port (default: a free one)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="seconds before all processes are stopped (exit 124)")
  parser.add_argument("--grace", type=float, default=30.0,
                      help="seconds between SIGTERM and SIGKILL when stopping")
  parser.add_argument("--platforms", default="cpu",
                      help="JAX_PLATFORMS of each process ('' keeps the caller's)")
  parser.add_argument("--elastic_slices", type=int, default=0,
                      help="elastic DiLoCo: start torchft's Lighthouse and this many "
                           "slices (launch/elastic_local.py): the binary's "
                           "elastic_diloco job with the gin arguments given, or the "
                           "toy task with the arguments after `--`")
  parser.add_argument("--elastic_restarts", type=int, default=0,
                      help="times a failed slice is started again (it heals)")
  parser.add_argument("--elastic_lighthouse_restarts", type=int, default=10,
                      help="times a dead Lighthouse is started again (same port)")
  for name, kind, toy in (("min_replicas", int, "1"), ("join_timeout", float, "5 s"),
                          ("heartbeat_timeout", float, "1 s")):
    parser.add_argument(f"--elastic_{name}", type=kind, default=None,
                        help=f"the Lighthouse's {name} (default: the gin's "
                             f"LighthouseConfig; toy task: {toy})")
  opts = parser.parse_args(own)
  if opts.num_processes < 1:
    raise LaunchError("--num_processes must be >= 1.")
  if opts.devices_per_process < 1:
    raise LaunchError("--devices_per_process must be >= 1.")
  if command and binary:
    raise LaunchError(f"{binary[0]}: training-binary arguments and a command "
                      "after `--` cannot be mixed; put them in the command.")
  return opts, command or default_command(binary)


def main(argv: Sequence[str] | None = None) -> int:
  try:
    opts, command = parse_args(sys.argv[1:] if argv is None else argv)
  except LaunchError as e:
    print(f"launch/local.py: error: {e}", file=sys.stderr)
    return 2
  port = opts.port or free_port()
  if opts.elastic_slices:
    from elastic_local import run_elastic  # pylint: disable=g-import-not-at-top
    env = process_env(os.environ, 0, 1, port, opts.devices_per_process, opts.platforms)
    print(f"[launch] elastic DiLoCo: Lighthouse on 127.0.0.1:{port} + "
          f"{opts.elastic_slices} slice(s)", file=sys.stderr, flush=True)
    binary = command[:3] == default_command([])
    slice_args = command[3:] if binary else command  # gin arguments, or after `--`
    if binary and not slice_args:
      print("launch/local.py: error: --elastic_slices needs the slices' gin (e.g. "
            "--gin_file=gin/experiments/elastic_diloco/lm.gin) or the toy task's "
            "arguments after `--`.", file=sys.stderr)
      return 2
    return run_elastic(opts.elastic_slices, slice_args, env, port, binary=binary,
                       restarts=opts.elastic_restarts,
                       min_replicas=opts.elastic_min_replicas,
                       join_timeout=opts.elastic_join_timeout,
                       heartbeat_timeout=opts.elastic_heartbeat_timeout,
                       timeout=opts.timeout, grace=opts.grace,
                       lighthouse_restarts=opts.elastic_lighthouse_restarts)
  n = opts.num_processes
  envs = [process_env(os.environ, i, n, port, opts.devices_per_process,
                      opts.platforms) for i in range(n)]
  print(f"[launch] {n} process(es) x {opts.devices_per_process} device(s)"
        + (f", coordinator 127.0.0.1:{port}" if n > 1 else "")
        + f": {shlex.join(command)}", file=sys.stderr, flush=True)
  return run_processes([command] * n, envs, timeout=opts.timeout,
                       grace=opts.grace)


if __name__ == "__main__":
  sys.exit(main())
