"""launch/local.py --elastic_slices: the Lighthouse plus N elastic DiLoCo
slices, prefixed logs, nothing left running; SIGTERM / Ctrl-C stop every
process (each slice checkpointing its last sync); a killed Lighthouse is
started again and the slices go on; the gin's LighthouseConfig reaches the
binary's Lighthouse; torchft's log goes to a file, not the console."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from posttrain_jax.diloco.elastic import membership

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "launch", "local.py")
sys.path.insert(0, os.path.join(REPO, "launch"))
import elastic_local  # pylint: disable=g-import-not-at-top,wrong-import-position

needs_torchft = pytest.mark.skipif(not membership.available(), reason="torchft not installed")
TOY = ["--sync_every=4", "--num_fragments=2", "--rows=16", "--width=16", "--layers=4",
       "--heartbeat_every=0.1"]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _records(out_dir, s: int) -> list[dict]:
  path = os.path.join(out_dir, f"slice{s}.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _wait_for(pred, timeout: float, what: str, proc=None) -> None:
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if pred():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}")
    time.sleep(0.05)
  raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _ours(port: int) -> list[int]:
  """Pids of live processes whose command line names 127.0.0.1:port (the
  Lighthouse and the slices of one launch)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if f"127.0.0.1:{port}".encode() in f.read():
          found.append(int(pid))
    except OSError:
      pass
  return found


def _launch(tmp_path, port, args, log):
  return subprocess.Popen(
      [sys.executable, LAUNCHER, "--elastic_slices=2", f"--port={port}", "--timeout=300",
       "--", f"--out_dir={tmp_path}", *TOY, *args],
      env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _cleanup(proc, port):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  for pid in _ours(port):
    try:
      os.killpg(pid, signal.SIGKILL)
    except OSError:
      pass


@needs_torchft
def test_two_slices_and_the_lighthouse(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, LAUNCHER, "--elastic_slices=2", "--timeout=120", "--",
       f"--out_dir={tmp_path}", "--steps=4"],
      env=env, capture_output=True, text=True, timeout=150)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "elastic DiLoCo: Lighthouse on 127.0.0.1:" in proc.stderr
  # torchft's INFO lines (the Lighthouse's, the slices' clients') stay off the
  # console: the Lighthouse's go to OUT_DIR/lighthouse.log, which one line names
  assert "[INFO]" not in proc.stdout + proc.stderr, proc.stdout[-2000:]
  assert f"; its log: {tmp_path / 'lighthouse.log'}" in proc.stdout
  assert "[INFO] [torchft::lighthouse]" in (tmp_path / "lighthouse.log").read_text()
  outer = [dict(np.load(tmp_path / f"slice{s}_outer.npz")) for s in range(2)]
  for k, v in outer[0].items():
    np.testing.assert_array_equal(outer[1][k], v)


@needs_torchft
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_lighthouse_and_every_slice_after_a_checkpoint(tmp_path, sig):
  """SIGTERM or Ctrl-C (SIGINT) to the launcher: it exits 128+N once every
  slice has stopped after a sync, checkpointed there (the round's leader the
  outer state, each slice its own), and the Lighthouse is stopped: nothing of
  the launch is left running."""
  port, ckpt = _free_port(), tmp_path / "ckpt"
  with open(tmp_path / "launch.log", "wb") as log:
    proc = _launch(tmp_path, port, ["--steps=100000", "--step_sleep=0.02",
                                     f"--checkpoint_dir={ckpt}",
                                     "--checkpoint_every=100000"], log)
  try:
    _wait_for(lambda: all(any(x["event"] == "sync" for x in _records(tmp_path, s))
                          for s in range(2)), 150, "both slices to sync", proc)
    assert len(_ours(port)) == 3  # the Lighthouse and two slices
    proc.send_signal(sig)
    code = proc.wait(timeout=90)
    left = _ours(port)
  finally:
    _cleanup(proc, port)
  text = (tmp_path / "launch.log").read_text()
  assert code == 128 + sig, text[-3000:]
  assert not left, text[-3000:]
  assert f"received signal {int(sig)}; stopping the slices" in text
  stopped = [[x["step"] for x in _records(tmp_path, s) if x["event"] == "preempted"]
             for s in range(2)]
  assert all(len(t) == 1 for t in stopped), stopped
  for s in range(2):  # each slice's inner state at the sync it stopped after
    assert (ckpt / f"slice{s}" / str(stopped[s][0])).is_dir()
  # the outer state of the last round (the same for both when they stop together)
  assert (ckpt / "outer" / str(max(t[0] for t in stopped))).is_dir()


@needs_torchft
def test_a_killed_lighthouse_is_restarted_and_the_slices_go_on(tmp_path):
  """kill -9 of the Lighthouse while both slices wait after step 8: the
  launcher starts it again on the same port; the slices' next quorum calls
  retry (and say so) until it is back, and every later sync has both slices,
  which end with the same θ̃."""
  port, release = _free_port(), tmp_path / "release"
  with open(tmp_path / "launch.log", "wb") as log:
    proc = _launch(tmp_path, port, ["--steps=16", "--hold_step=8",
                                    f"--hold_file={release}"], log)
  try:
    _wait_for(lambda: all(any(x["event"] == "step" and x["step"] == 8
                              for x in _records(tmp_path, s)) for s in range(2)),
              150, "both slices at step 8", proc)
    pid = int(re.search(r"\[launch\] Lighthouse \(pid (\d+)\)",
                        (tmp_path / "launch.log").read_text()).group(1))
    os.killpg(pid, signal.SIGKILL)
    release.touch()  # the slices now reach their next sync with no Lighthouse
    code = proc.wait(timeout=150)
  finally:
    _cleanup(proc, port)
  text = (tmp_path / "launch.log").read_text()
  assert code == 0, text[-3000:]
  assert f"the Lighthouse exited with -9; restarting it on 127.0.0.1:{port}" in text
  assert "is unreachable" in text and "answers again after" in text
  recs = [_records(tmp_path, s) for s in range(2)]
  for rec in recs:
    later = [x for x in rec if x["event"] == "sync" and x["step"] > 8]
    assert [x["step"] for x in later] == [10, 12, 14, 16]
    assert all(x["members"] == [0, 1] for x in later)
    assert not any(x["event"] == "heal" for x in rec)
  outer = [dict(np.load(tmp_path / f"slice{s}_outer.npz")) for s in range(2)]
  for k, v in outer[0].items():
    np.testing.assert_array_equal(outer[1][k], v)


@needs_torchft
def test_the_gins_lighthouse_config_reaches_the_lighthouse(tmp_path):
  """The binary path's Lighthouse is the binary's elastic_lighthouse job with
  the slices' gin: its LighthouseConfig, with a launcher flag overriding one
  setting."""
  port = _free_port()
  command = elastic_local.binary_lighthouse_command(
      port, ["--gin_file=gin/experiments/elastic_diloco/lm.gin",
             f"--gin.RUN_DIR='{tmp_path}'", "--gin.LighthouseConfig.join_timeout=7.5"],
      heartbeat_timeout=3.0)
  proc = subprocess.run(command + ["--gin.elastic_lighthouse.run_for=0.5"], cwd=REPO,
                        env=dict(_env(), JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("[lighthouse] serving"))
  assert line.endswith(f":{port} (LighthouseConfig(min_replicas=1, join_timeout=7.5, "
                       "heartbeat_timeout=3.0, quorum_tick=0.05)); torchft's log: "
                       f"{tmp_path / 'lighthouse.log'}"), line
  # torchft's own lines went to RUN_DIR/lighthouse.log, not to the console
  assert "[INFO]" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
  assert "Lighthouse listening on" in (tmp_path / "lighthouse.log").read_text()
