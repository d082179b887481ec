"""The gRPC peer transport: payloads and snapshots round-trip and are
counted; a dead or silent peer costs at most the deadline (PeerError)."""

import threading
import time

import numpy as np
import pytest

from posttrain_jax.diloco.elastic import wire


@pytest.fixture
def servers():
  made = []

  def make():
    made.append(wire.PeerServer())
    return made[-1]
  yield make
  for s in made:
    s.close()


def test_payload_and_snapshot_round_trip_with_byte_counts(servers):
  a, b = servers(), servers()
  tree = {"codes": {"w": np.arange(7, dtype=np.uint8)}, "tokens": 12}
  a.publish_payload(5, 1, wire.pack(tree))
  got = wire.unpack(b.fetch_payload(a.address, 5, 1, timeout=5.0))
  np.testing.assert_array_equal(got["codes"]["w"], tree["codes"]["w"])
  assert got["tokens"] == 12
  n = len(wire.pack(tree))
  assert a.bytes.exchange_sent == b.bytes.exchange_received == n
  assert a.bytes.heal_sent == b.bytes.heal_received == 0
  # a snapshot pull waits until the owner publishes one at a late enough step
  a.publish_snapshot(3, b"old")
  later = threading.Timer(0.3, lambda: a.publish_snapshot(8, b"new"))
  later.start()
  start = time.monotonic()
  assert b.fetch_snapshot(a.address, 8, timeout=5.0) == b"new"
  assert 0.2 < time.monotonic() - start < 3.0
  assert b.bytes.heal_received == 3 and a.bytes.heal_sent == 3


def test_dead_and_silent_peers_fail_within_the_deadline(servers):
  a, b = servers(), servers()
  start = time.monotonic()
  with pytest.raises(wire.PeerError, match="DEADLINE_EXCEEDED|NOT_FOUND"):
    b.fetch_payload(a.address, 1, 0, timeout=0.5)  # never published
  assert time.monotonic() - start < 2.0
  a.publish_payload(2, 0, b"x")
  a.withdraw_payloads(2)
  with pytest.raises(wire.PeerError):
    b.fetch_payload(a.address, 2, 0, timeout=0.3)
  address = a.address
  a.close()
  start = time.monotonic()
  with pytest.raises(wire.PeerError, match="UNAVAILABLE|DEADLINE"):
    b.fetch_payload(address, 1, 0, timeout=2.0)
  assert time.monotonic() - start < 3.0


def test_old_payloads_are_dropped(servers):
  a, b = servers(), servers()
  for t in range(10):
    a.publish_payload(t, 0, bytes([t]))
  a._keep = 8  # pylint: disable=protected-access  (the default)
  assert b.fetch_payload(a.address, 9, 0, timeout=1.0) == bytes([9])
  with pytest.raises(wire.PeerError):
    b.fetch_payload(a.address, 0, 0, timeout=0.3)
