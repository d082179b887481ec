"""Host-side transport of elastic Streaming DiLoCo: a small gRPC service per slice.

Why gRPC (grpcio, already a pinned dependency through TensorFlow): every call
has a deadline, so a dead peer costs a bounded wait (UNAVAILABLE at once when
its socket is gone, DEADLINE_EXCEEDED otherwise), never a hang; the transfers
are point-to-point pulls, so a failure concerns one pair of slices and not a
collective that every survivor is blocked in (a gloo all-gather among the
quorum hangs or aborts for all when one member dies mid-call);
it needs no accelerator, no shared cluster and no protoc (raw-bytes generic
handlers). `jax.experimental.transfer` moves device arrays between JAX
processes but its API is experimental and its failure semantics (a peer dying
mid-pull) are undocumented; torch.distributed would need a process group per
quorum. The payloads are small (packed FP4 codes of one fragment), so host
copies cost little next to an inner phase.

A slice's `PeerServer` serves two things that its owner `publish`es:
  payload(step, fragment)  the packed codes + scales of its pseudo-gradient of
                           that fragment for that sync (kept for a few syncs);
  snapshot(min_step)       its newest outer state (θ̃, outer optimizer state,
                           in-flight Δ, step) once that step is >= min_step
                           (the call waits, up to its deadline): healing.
Messages are flax msgpack (`flax.serialization.msgpack_serialize`) of dicts of
numpy arrays and ints. `Bytes` counts what a slice sends and receives, with
healing counted apart from the exchange.
"""

from __future__ import annotations

import collections
import dataclasses
import socket
import threading
from concurrent import futures
from typing import Any

from flax import serialization
import grpc

_SERVICE = "posttrain_jax.elastic.Peer"
_PAYLOAD = f"/{_SERVICE}/Payload"
_SNAPSHOT = f"/{_SERVICE}/Snapshot"
_GRPC_OPTIONS = [("grpc.max_send_message_length", -1),
                 ("grpc.max_receive_message_length", -1)]


class PeerError(RuntimeError):
  """A peer could not be reached or did not answer within the deadline."""


def pack(tree: Any) -> bytes:
  return serialization.msgpack_serialize(tree)


def unpack(data: bytes) -> Any:
  return serialization.msgpack_restore(data)


@dataclasses.dataclass
class Bytes:
  """Bytes one slice moved: exchange (pseudo-gradient codes) and heal (outer
  state snapshots), sent (served to peers) and received (fetched)."""

  exchange_sent: int = 0
  exchange_received: int = 0
  heal_sent: int = 0
  heal_received: int = 0

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def _key(step: int, fragment: int) -> bytes:
  return f"{int(step)}:{int(fragment)}".encode()


class PeerServer:
  """This slice's gRPC endpoint (see the module docstring)."""

  def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: int = 8,
               workers: int = 8):
    self.bytes = Bytes()
    self._payloads: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
    self._keep = keep
    self._snapshot: tuple[int, bytes] | None = None
    self._once: set[bytes] = set()
    self.pulls: collections.Counter[int] = collections.Counter()  # payloads served per step
    self._cond = threading.Condition()
    handlers = {
        "Payload": grpc.unary_unary_rpc_method_handler(self._serve_payload),
        "Snapshot": grpc.unary_unary_rpc_method_handler(self._serve_snapshot)}
    self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                               options=_GRPC_OPTIONS)
    self._server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    bound = self._server.add_insecure_port(f"{host}:{port}")
    if not bound:
      raise ValueError(f"Cannot bind the peer server to {host}:{port}: pick a free "
                       "port (0 lets the OS choose).")
    self.address = f"{host if host not in ('0.0.0.0', '[::]') else socket.gethostname()}:{bound}"
    self._server.start()

  # ------------------------------------------------------------- publishing
  def publish_payload(self, step: int, fragment: int, data: bytes) -> None:
    with self._cond:
      self._payloads[_key(step, fragment)] = data
      while len(self._payloads) > self._keep:
        self._payloads.popitem(last=False)
      self._cond.notify_all()

  def withdraw_payloads(self, step: int) -> None:
    """Forgets this step's payloads (failure drills: peers then wait for them)."""
    with self._cond:
      for k in [k for k in self._payloads if k.startswith(f"{int(step)}:".encode())]:
        del self._payloads[k]

  def serve_once(self, step: int) -> None:
    """Forgets this step's payloads once one peer has pulled them (failure
    drills: the survivors then hold different sets of codes)."""
    with self._cond:
      self._once.add(f"{int(step)}:".encode())

  def publish_snapshot(self, step: int, data: bytes) -> None:
    with self._cond:
      self._snapshot = (int(step), data)
      self._cond.notify_all()

  # ---------------------------------------------------------------- serving
  def _wait(self, ready, context) -> bool:
    with self._cond:
      return self._cond.wait_for(ready, timeout=context.time_remaining())

  def _serve_payload(self, request: bytes, context) -> bytes:
    if not self._wait(lambda: request in self._payloads, context):
      context.abort(grpc.StatusCode.NOT_FOUND, f"no payload {request!r}")
    with self._cond:
      data = self._payloads.get(request)
      if data is not None and any(request.startswith(k) for k in self._once):
        del self._payloads[request]
      if data is not None:
        self.bytes.exchange_sent += len(data)
        self.pulls[int(request.split(b":")[0])] += 1
    if data is None:
      context.abort(grpc.StatusCode.NOT_FOUND, f"payload {request!r} withdrawn")
    return data

  def _serve_snapshot(self, request: bytes, context) -> bytes:
    min_step = int(request.decode())
    ok = self._wait(lambda: self._snapshot is not None
                    and self._snapshot[0] >= min_step, context)
    if not ok:
      context.abort(grpc.StatusCode.NOT_FOUND, f"no snapshot at step >= {min_step}")
    with self._cond:
      data = self._snapshot[1]
      self.bytes.heal_sent += len(data)
    return data

  # --------------------------------------------------------------- fetching
  def _call(self, address: str, method: str, request: bytes, timeout: float) -> bytes:
    try:
      with grpc.insecure_channel(address, options=_GRPC_OPTIONS) as channel:
        call = channel.unary_unary(method)
        return call(request, timeout=timeout, wait_for_ready=False)
    except grpc.RpcError as e:
      raise PeerError(f"{method} from {address} failed: {e.code().name} "
                      f"({e.details()})") from e

  def fetch_payload(self, address: str, step: int, fragment: int,
                    timeout: float) -> bytes:
    data = self._call(address, _PAYLOAD, _key(step, fragment), timeout)
    self.bytes.exchange_received += len(data)
    return data

  def fetch_snapshot(self, address: str, min_step: int, timeout: float) -> bytes:
    data = self._call(address, _SNAPSHOT, str(int(min_step)).encode(), timeout)
    self.bytes.heal_received += len(data)
    return data

  def close(self) -> None:
    self._server.stop(grace=None)
