"""torchft's Lighthouse as elastic DiLoCo's membership: quorums carry each
slice's data, a silent slice leaves the quorum after the heartbeat timeout,
bad settings are refused; quorums go on across a restart of the Lighthouse,
and the errors say the true wait."""

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from posttrain_jax.diloco.elastic import membership as mb

import elastic_procs as ep  # pylint: disable=g-bad-import-order

needs_torchft = pytest.mark.skipif(not mb.available(), reason="torchft not installed")


def test_config_rejects_bad_settings():
  with pytest.raises(ValueError, match="min_replicas"):
    mb.LighthouseConfig(min_replicas=0)
  with pytest.raises(ValueError, match="heartbeat_timeout"):
    mb.LighthouseConfig(heartbeat_timeout=0)


@needs_torchft
def test_quorum_carries_data_and_drops_a_silent_member():
  lighthouse = mb.start_lighthouse(mb.LighthouseConfig(
      min_replicas=1, join_timeout=5.0, heartbeat_timeout=0.5), bind="127.0.0.1:0")
  clients = [mb.Membership(lighthouse.address(), f"s{i}", heartbeat_every=0.05)
             for i in range(3)]
  try:
    out = {}

    def ask(i, step):
      out[i] = clients[i].quorum({"slice": i, "step": step}, timeout=10.0)
    threads = [threading.Thread(target=ask, args=(i, 4)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    ids = {qid for qid, _ in out.values()}
    assert len(ids) == 1  # one quorum, the same for every member
    assert [m.data for m in out[0][1]] == [{"slice": i, "step": 4} for i in range(3)]
    clients[2].close()  # slice 2 goes silent: no heartbeat, no quorum request
    start = time.monotonic()
    threads = [threading.Thread(target=ask, args=(i, 8)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    waited = time.monotonic() - start
    assert [m.replica_id for m in out[0][1]] == ["s0", "s1"]
    assert waited < 0.5 + 1.5  # about the heartbeat timeout, not the join timeout
  finally:
    for c in clients:
      c.close()
    lighthouse.shutdown()


@needs_torchft
def test_no_quorum_below_min_replicas_times_out():
  lighthouse = mb.start_lighthouse(mb.LighthouseConfig(min_replicas=2,
                                                       join_timeout=0.1),
                                   bind="127.0.0.1:0")
  client = mb.Membership(lighthouse.address(), "alone", heartbeat_every=0.05)
  try:
    with pytest.raises(TimeoutError, match="No quorum"):
      client.quorum({"step": 0}, timeout=0.5)
  finally:
    client.close()
    lighthouse.shutdown()


def _lighthouse(port: int):
  """torchft's Lighthouse as a child process on 127.0.0.1:port (to be killed)."""
  return subprocess.Popen(
      [ep.LIGHTHOUSE, "--min_replicas", "1", "--bind", f"127.0.0.1:{port}",
       "--join_timeout_ms", "1000", "--heartbeat_timeout_ms", "1000",
       "--quorum_tick_ms", "50"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=dict(os.environ, RUST_LOG="warn"), start_new_session=True)


def _kill(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


@needs_torchft
def test_quorums_go_on_across_a_lighthouse_restart_and_say_the_true_wait():
  """The Lighthouse killed and started again on the same port: the slices'
  quorum calls made meanwhile retry and return the restarted Lighthouse's
  quorum, each saying once that it waits; with it down past the deadline, the
  TimeoutError gives the deadline and the true wait (>= the deadline)."""
  port = ep.free_port()
  addr = f"http://127.0.0.1:{port}"
  procs = [_lighthouse(port)]
  logs = [[], []]
  clients = []
  try:
    clients = [mb.Membership(addr, f"s{i}", heartbeat_every=0.05, connect_timeout=60,
                             log=logs[i].append) for i in range(2)]
    out = {}

    def ask(i, step):
      out[i] = clients[i].quorum({"slice": i, "step": step}, timeout=60.0)
    threads = [threading.Thread(target=ask, args=(i, 4)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert [m.data["step"] for m in out[0][1]] == [4, 4]
    _kill(procs[0])
    out.clear()
    threads = [threading.Thread(target=ask, args=(i, 8)) for i in range(2)]
    [t.start() for t in threads]
    deadline = time.monotonic() + 30  # both are retrying (each try fails at once)
    while not all(any("unreachable" in l for l in log) for log in logs):
      assert time.monotonic() < deadline, logs
      time.sleep(0.02)
    assert not out
    procs.append(_lighthouse(port))
    [t.join(60) for t in threads]
    assert sorted(out) == [0, 1]
    assert [m.data for m in out[0][1]] == [{"slice": 0, "step": 8}, {"slice": 1, "step": 8}]
    assert out[0][0] == out[1][0]  # the same quorum
    assert all(sum("unreachable" in l for l in log) == 1 for log in logs)
    assert all(any("answers again" in l for l in log) for log in logs)
    _kill(procs[1])
    start = time.monotonic()
    with pytest.raises(TimeoutError) as e:
      clients[0].quorum({"step": 12}, timeout=1.5)
    elapsed = time.monotonic() - start
    got = re.search(r"No quorum within 1\.5 s \(waited ([\d.]+) s\): the Lighthouse at "
                    + re.escape(addr) + r" was unreachable", str(e.value))
    assert got, str(e.value)
    assert 1.5 <= float(got.group(1)) <= elapsed + 0.05
  finally:
    for c in clients:
      c.close()
    for p in procs:
      _kill(p)


@needs_torchft
def test_connecting_waits_for_a_late_lighthouse_then_fails_clearly():
  port = ep.free_port()
  addr = f"http://127.0.0.1:{port}"
  with pytest.raises(ConnectionError, match=re.escape(
      f"Cannot reach the Lighthouse at {addr} within 0.5 s")):
    mb.Membership(addr, "s0", connect_timeout=0.5)
  made = []
  thread = threading.Thread(target=lambda: made.append(
      mb.Membership(addr, "s0", heartbeat_every=0.05, connect_timeout=60)))
  thread.start()
  time.sleep(0.3)
  proc = _lighthouse(port)  # comes up while the client waits
  try:
    thread.join(60)
    assert made
    assert made[0].quorum({"step": 0}, timeout=10.0)[1][0].replica_id == "s0"
  finally:
    for m in made:
      m.close()
    _kill(proc)
