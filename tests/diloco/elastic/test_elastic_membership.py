"""torchft's Lighthouse as elastic DiLoCo's membership: quorums carry each
slice's data, a silent slice leaves the quorum after the heartbeat timeout,
bad settings are refused."""

import threading
import time

import pytest

from posttrain_jax.diloco.elastic import membership as mb

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
