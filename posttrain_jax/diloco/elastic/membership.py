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

The Lighthouse may die and be started again on the same address (the
launcher restarts it): a quorum call that finds it unreachable probes it with
a bounded backoff (0.1 s doubling to 1 s) until the call's own deadline, on
the same client (its gRPC channel reconnects by itself). Once it answers, the
slice waits max(1 s, 3 heartbeat periods) before asking again: the restarted
Lighthouse knows no one, and a quorum asked before the other live slices'
heartbeats reach it would be of the first asker alone (the others would then
heal instead of syncing); after that wait it waits for them as usual. Connecting at start-up retries likewise until
`connect_timeout`, saying so every few seconds. The errors give the deadline
and the time really waited.

torchft is an optional dependency (`pip install -e ".[elastic]"`, pinned in
constraints.txt); importing it pulls in torch (about 3 s on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import datetime
import logging
import threading
import time
from typing import Any

_CONNECT_ATTEMPT = 5.0  # seconds per connection attempt (one log line each)
_BACKOFF = (0.1, 1.0)   # first and longest pause between quorum retries (s)


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


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
  seconds from a daemon thread (from construction to `close`), and quorums.
  Waits up to `connect_timeout` seconds for the Lighthouse to answer at
  start-up; `log` gets one line per retry (default: logging.warning)."""

  def __init__(self, lighthouse_addr: str, replica_id: str,
               heartbeat_every: float = 0.2, connect_timeout: float = 10.0,
               log: Callable[[str], None] | None = None):
    self.replica_id = replica_id
    self.address = lighthouse_addr
    self._log = log or logging.warning
    start = time.monotonic()
    self._client = self._connect(connect_timeout, start)
    self._hb_client = self._connect(connect_timeout, start)
    self._every = heartbeat_every
    self._settle = max(_BACKOFF[1], 3 * heartbeat_every)
    self._stop = threading.Event()
    try:
      self._hb_client.heartbeat(replica_id)
    except Exception:  # pylint: disable=broad-except  # the beat thread goes on
      pass
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def _connect(self, timeout: float, start: float):
    """A LighthouseClient, trying in attempts of at most _CONNECT_ATTEMPT s
    (one log line each) until `timeout` seconds after `start`."""
    ft = _torchft()
    while True:
      left = timeout - (time.monotonic() - start)
      try:
        return ft.LighthouseClient(addr=self.address,
                                   connect_timeout=_ms(max(0.1, min(left, _CONNECT_ATTEMPT))))
      except Exception as e:  # pylint: disable=broad-except  # torchft: RuntimeError
        waited = time.monotonic() - start
        if waited >= timeout:
          raise ConnectionError(
              f"Cannot reach the Lighthouse at {self.address} within {timeout:g} s "
              f"(waited {waited:.1f} s): {_first_line(e)}. Start it first (launch/"
              "local.py --elastic_slices starts one; the binary's job "
              "elastic_lighthouse serves one) or fix the address.") from e
        self._log(f"the Lighthouse at {self.address} is not reachable yet ({waited:.1f} s "
                  f"of {timeout:g} s): {_first_line(e)}; retrying")

  def _beat(self):
    while not self._stop.wait(self._every):
      try:
        self._hb_client.heartbeat(self.replica_id, timeout=_ms(max(self._every, 1.0)))
      except Exception:  # pylint: disable=broad-except  # the service may be restarting
        pass

  def quorum(self, data: dict[str, Any], timeout: float) -> tuple[int, list[Member]]:
    """(quorum id, members sorted by replica id) of the next quorum this slice
    is part of; raises TimeoutError when none forms within `timeout` seconds
    (retrying while the Lighthouse is unreachable, see the module docstring)."""
    start = time.monotonic()
    down, backoff = None, _BACKOFF[0]  # when the Lighthouse stopped answering
    while True:
      left = timeout - (time.monotonic() - start)
      try:
        if down is None:
          q = self._client.quorum(replica_id=self.replica_id,
                                  timeout=_ms(max(left, 0.001)), data=dict(data))
          break
        # unreachable so far: probe it; once it answers, let the other live
        # slices' heartbeats reach it before asking, or the restarted
        # Lighthouse (it knows no one) forms a quorum of the first asker alone
        self._client.heartbeat(self.replica_id, timeout=_ms(max(min(left, 1.0), 0.001)))
        self._log(f"the Lighthouse at {self.address} answers again after "
                  f"{time.monotonic() - down:.1f} s")
        time.sleep(max(0.0, min(self._settle, timeout - (time.monotonic() - start))))
        down, backoff = None, _BACKOFF[0]
        continue
      except TimeoutError as e:
        if down is None:  # the Lighthouse answered: no quorum in time
          raise TimeoutError(
              f"No quorum within {timeout:.1f} s (waited {time.monotonic() - start:.1f} "
              f"s): the Lighthouse at {self.address} formed none with this slice "
              "(fewer than min_replicas live slices, or no majority of the "
              f"heartbeating ones): {_first_line(e)}") from e
        error = e
      except RuntimeError as e:  # torchft: unreachable, or the call broke
        error = e
      now = time.monotonic()
      if down is None:
        down = now
        self._log(f"the Lighthouse at {self.address} is unreachable "
                  f"({_first_line(error)}); retrying for up to {max(left, 0):.1f} s more")
      if now - start >= timeout:
        raise TimeoutError(
            f"No quorum within {timeout:.1f} s (waited {now - start:.1f} s): the "
            f"Lighthouse at {self.address} was unreachable for the last "
            f"{now - down:.1f} s ({_first_line(error)}). Restart it on the same "
            "address (launch/local.py does) and this slice (it heals).") from error
      time.sleep(min(backoff, timeout - (now - start)))
      backoff = min(2 * backoff, _BACKOFF[1])
    members = [Member(m.replica_id, dict(m.data or {})) for m in q.participants]
    return int(q.quorum_id), sorted(members, key=lambda m: m.replica_id)

  def close(self):
    self._stop.set()
    self._thread.join(timeout=2 * self._every + 1.0)
