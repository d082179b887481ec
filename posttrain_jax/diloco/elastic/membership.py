"""Membership of elastic Streaming DiLoCo: torchft's Lighthouse quorum service.

Each slice (one multi-controller JAX job) is one torchft *replica*: it sends
heartbeats to the Lighthouse from a background thread and, at every sync, asks
it for a quorum (`Membership.quorum`). The Lighthouse (torchft, Rust, a gRPC
service; no GPU needed) returns the same participant list to every member of a
quorum: the slices that asked within the round, minus those whose heartbeats
stopped longer than `heartbeat_timeout_ms` ago. Its rules (torchft
`quorum_compute`): a quorum forms at once when every member of the previous
quorum asked again ("fast quorum"); otherwise it needs >= `min_replicas`
healthy askers, more than half of the heartbeating slices (no split brain) and
either every heartbeating slice asked or `join_timeout_ms` passed since the
first asker. So a slice killed mid inner phase holds the others up for at
most about `heartbeat_timeout_ms` (then it is no longer healthy), and a
straggler that is alive but slow for at most `join_timeout_ms`.

Each member attaches a small JSON `data` dict to its request (its step, phase,
peer address, tokens, ...); `Member` gives it back parsed. The consensus is
the Lighthouse's; the round logic on top (elastic/slice.py) only reads the
quorum it returns.

torchft is an optional dependency (`pip install -e ".[elastic]"`, pinned in
constraints.txt); importing it pulls in torch (about 3 s on CPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
from typing import Any


def _torchft():
  try:
    from torchft import _torchft  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("Elastic DiLoCo needs torchft's Lighthouse: install it with "
                      "`pip install -c constraints.txt -e \".[elastic]\"`.") from e
  return _torchft


def available() -> bool:
  """Whether torchft (the Lighthouse) can be imported here."""
  try:
    _torchft()
  except ImportError:
    return False
  return True


def _ms(seconds: float) -> datetime.timedelta:
  return datetime.timedelta(milliseconds=int(seconds * 1000))


@dataclasses.dataclass(frozen=True)
class LighthouseConfig:
  """The quorum service's settings (seconds; gin binds them at the edge).

  min_replicas: fewest slices a quorum may have (a sync with fewer waits).
  join_timeout: how long a quorum waits for live stragglers.
  heartbeat_timeout: silence after which a slice counts as dead.
  quorum_tick: how often the Lighthouse re-evaluates a pending quorum.
  """

  min_replicas: int = 1
  join_timeout: float = 5.0
  heartbeat_timeout: float = 1.0
  quorum_tick: float = 0.05

  def __post_init__(self):
    if self.min_replicas < 1:
      raise ValueError(f"min_replicas must be >= 1, got {self.min_replicas}.")
    for name in ("join_timeout", "heartbeat_timeout", "quorum_tick"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}.")


def start_lighthouse(config: LighthouseConfig, bind: str = "[::]:0"):
  """A running torchft LighthouseServer (call .address(), .shutdown())."""
  return _torchft().LighthouseServer(
      bind=bind, min_replicas=config.min_replicas,
      join_timeout_ms=int(config.join_timeout * 1000),
      quorum_tick_ms=max(1, int(config.quorum_tick * 1000)),
      heartbeat_timeout_ms=int(config.heartbeat_timeout * 1000))


@dataclasses.dataclass(frozen=True)
class Member:
  replica_id: str
  data: dict[str, Any]


class Membership:
  """One slice's client of the Lighthouse: heartbeats every `heartbeat_every`
  seconds from a daemon thread (from construction to `close`), and quorums."""

  def __init__(self, lighthouse_addr: str, replica_id: str,
               heartbeat_every: float = 0.2, connect_timeout: float = 10.0):
    ft = _torchft()
    self.replica_id = replica_id
    self._client = ft.LighthouseClient(addr=lighthouse_addr,
                                       connect_timeout=_ms(connect_timeout))
    self._hb_client = ft.LighthouseClient(addr=lighthouse_addr,
                                          connect_timeout=_ms(connect_timeout))
    self._every = heartbeat_every
    self._stop = threading.Event()
    self._hb_client.heartbeat(replica_id)
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def _beat(self):
    while not self._stop.wait(self._every):
      try:
        self._hb_client.heartbeat(self.replica_id, timeout=_ms(max(self._every, 1.0)))
      except Exception:  # pylint: disable=broad-except  # the service may be restarting
        pass

  def quorum(self, data: dict[str, Any], timeout: float) -> tuple[int, list[Member]]:
    """(quorum id, members sorted by replica id) of the next quorum this slice
    is part of; raises TimeoutError when none forms within `timeout` seconds."""
    start = time.monotonic()
    try:
      q = self._client.quorum(replica_id=self.replica_id, timeout=_ms(timeout),
                              data=dict(data))
    except Exception as e:  # torchft raises a RuntimeError / TimeoutError
      raise TimeoutError(f"No quorum within {timeout:.1f} s "
                         f"({time.monotonic() - start:.1f} s): {e}") from e
    members = [Member(m.replica_id, dict(m.data or {})) for m in q.participants]
    return int(q.quorum_id), sorted(members, key=lambda m: m.replica_id)

  def close(self):
    self._stop.set()
    self._thread.join(timeout=2 * self._every + 1.0)
