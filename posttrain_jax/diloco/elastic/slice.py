"""One slice of elastic Streaming DiLoCo (arXiv 2501.18512; elastic membership
after torchft's fault-tolerant DiLoCo): its own JAX job, syncing fragments
with the other live slices through a quorum service and a host-side transport.

Algorithm. The same as `streaming_diloco` (one replica per slice, M = 1 in
this process): `StreamingDiLoCo`'s inner program, fragment schedule
(`SyncSchedule.event`) and pure `outer_update` (Nesterov outer step + merge),
fed with the averaged pseudo-gradient computed here instead of inside XLA.
For a sync of fragment p after step t the slice

  1. encodes Δ_{s,p} = θ̃_p - θ_{s,p} per tensor (per layer row of a scanned
     slice) with `quantization.quantize` (FP4 E3M0: packed codes + fp32
     scales) and publishes the codes on its peer server (wire.py);
  2. asks the Lighthouse for a quorum (membership.py) with data (step t,
     phase EXCHANGE, its address, its tokens since its last sync);
  3. pulls the codes of every member at (t, EXCHANGE) with a deadline;
  4. asks for a second quorum (t, COMMIT) listing whose codes it holds, and
     averages over U = the intersection of the committers' lists (every
     committer holds them all, so every survivor computes the same bits):

        Δ_p = Σ_{s∈U} w_s D(Q(Δ_{s,p})) / max(Σ_{s∈U} w_s, 1)

     in the fixed order of slice ids (`exchange.replica_mean`), w_s = 1 or
     the tokens of slice s (`weight_by_tokens`); count = |U|;
  5. runs `outer_update` for the step's event with that Δ_p (τ >= 1: kept in
     flight, applied τ steps later, as in the SPMD reference).

A slice killed during a round therefore never corrupts the survivors' outer
state: the round is completed by the survivors that reach its commit, with the
payloads that all of them received (a dead member's payload counts if every
committer pulled it before it died, else it is dropped from that round).

Healing. A slice whose quorum shows a member ahead of it (a later step, or the
same step in a later phase: a restarted slice, a straggler left out of a
quorum) heals: if the leaders are exchanging, it joins their commit quorum
(marked healing, so it is not waited for and not averaged), then pulls the
outer state (θ̃, outer optimizer state, in-flight Δ, step) that a leader
publishes after each round, waiting for the round's end; it sets its replica
to θ̃ with a fresh inner optimizer state (`init_inner`), and continues from
that step, taking part from the next sync on. From then on its outer
parameters are the survivors' bit for bit. Bytes of healing are counted apart
(`wire.Bytes`).

Start. Every slice first compiles its programs (`warm_up`: the inner step,
each fragment's encode and decode, the outer program of every event, the
heal's replica reset), then publishes its initial outer state and loops on
quorums at (start step, START) until `wait_for` slices are present, or heals
if a member is already ahead (a restarted slice runs the same command as a
fresh one). So a restarted slice asks only once it can train at full speed:
it heals to the leaders' newest outer step and takes part in their next sync,
instead of healing, compiling while they go on past `join_timeout` without
it, and healing again many steps later. The mean always decodes `num_slices`
payloads (absent slices weigh 0: the same sum, bit for bit, in the fixed
order of `replica_mean`), so a change of membership compiles nothing either.

Stopping. `should_stop()` (e.g. a SIGTERM flag) is read after each sync: the
slice checkpoints that step (with `checkpoints`; the round's leader writes
the outer state) and returns. The slices stopped together (a launcher's
SIGTERM) stop after the same round, so every one resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from posttrain_jax.diloco import exchange as dx
from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import quantization as q
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco.elastic import wire

START, EXCHANGE, COMMIT = -1, 0, 1
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
  """Per-slice settings (seconds). slice_id: this slice (0..num_slices-1);
  wait_for: slices a fresh start waits for (None: all); exchange_timeout:
  deadline of one pull of a peer's codes; quorum_timeout: longest wait for a
  quorum; heal_timeout: deadline of a pull of the outer state."""

  slice_id: int
  num_slices: int
  weight_by_tokens: bool = False
  wait_for: int | None = None
  exchange_timeout: float = 5.0
  quorum_timeout: float = 60.0
  heal_timeout: float = 60.0

  def __post_init__(self):
    if not 0 <= self.slice_id < self.num_slices:
      raise ValueError(f"slice_id must be in [0, {self.num_slices}), got "
                       f"{self.slice_id}.")
    if self.wait_for is not None and not 1 <= self.wait_for <= self.num_slices:
      raise ValueError(f"wait_for must be in [1, num_slices={self.num_slices}], got "
                       f"{self.wait_for}.")


def _position(member) -> tuple[int, int]:
  return int(member.data["step"]), int(member.data["phase"])


def _leaders(members) -> list:
  """Non-healing members, by slice id."""
  return sorted((m for m in members if not m.data.get("healing")),
                key=lambda m: int(m.data["slice"]))


# ----------------------------------------------------------- pure programs

def encode_fragment(state: sd.DiLoCoState, frag: fr.Fragment, fmt: str,
                    block: int | None) -> dict[str, dict[str, jax.Array]]:
  """{tensor name: {"codes", "scales"}} of Δ_{s,p} = θ̃_p - θ_{s,p} (fp32) of
  the slice's one replica, one quantized tensor per scanned row."""
  theta = fr.take(state.outer_params, frag)
  local = fr.take(jax.tree.map(lambda x: x[0], state.replicas.params), frag)
  out = {}
  for s in frag.selectors:
    delta = theta[s.name].astype(jnp.float32) - local[s.name].astype(jnp.float32)
    quant = functools.partial(q.quantize, format=fmt, block=block)
    if s.rows is not None and s.row_tensors:
      quant = jax.vmap(quant)
    codes, scales = quant(delta)
    out[s.name] = {"codes": codes, "scales": scales}
  return out


def decode_mean(payloads: list, weights: jax.Array, frag: fr.Fragment,
                shapes: dict[str, tuple[int, ...]], fmt: str, block: int | None
                ) -> dict[str, jax.Array]:
  """Δ_p = replica_mean(w, [D(codes_s)]) over the payloads (in slice order)."""
  out = {}
  for s in frag.selectors:
    shape = shapes[s.name]
    if s.rows is not None and s.row_tensors:
      deq = jax.vmap(lambda c, k, sh=shape[1:]: q.dequantize(c, k, sh, fmt, block))
    else:
      deq = lambda c, k, sh=shape: q.dequantize(c, k, sh, fmt, block)
    values = jnp.stack([deq(p[s.name]["codes"], p[s.name]["scales"]) for p in payloads])
    out[s.name] = dx.replica_mean(weights, values)
  return out


def outer_with(state: sd.DiLoCoState, given: dict, *, fragments, event: fr.Event,
               outer_tx, alpha: float) -> sd.DiLoCoState:
  """`streaming_diloco.outer_update` for `event` with each synced fragment's
  averaged Δ_p and count taken from `given` ({str(p): {"delta", "count"}})."""
  def exchange_fn(outer, replica_params, frag, participating, fmt, block):
    del outer, replica_params, participating, fmt, block
    return given[str(frag.index)]["delta"], given[str(frag.index)]["count"]
  return sd.outer_update(state, jnp.ones((1,), jnp.float32), fragments=fragments,
                         event=event, outer_tx=outer_tx, alpha=alpha,
                         exchange_fn=exchange_fn)


# ------------------------------------------------------------------ slice

@dataclasses.dataclass
class SyncRecord:
  """What one sync (or heal) of this slice did, for logs and tests."""

  step: int
  kind: str                      # "sync", "heal" or "start"
  members: tuple[int, ...] = ()  # slices averaged (sync) or present (start)
  wait_s: float = 0.0            # time spent in quorums and pulls
  quorum_ids: tuple[int, ...] = ()
  dropped: tuple[int, ...] = ()  # exchangers left out of the mean


class ElasticSlice:
  """Drives one slice: `run(state, batch_fn, num_steps)`.

  config: the Streaming DiLoCo hyperparameters (num_replicas is ignored: one
  replica per slice); inner_step / params as for `StreamingDiLoCo`;
  init_inner(params, step) -> a fresh inner state (used when healing);
  membership: a `membership.Membership`; peer: this slice's `wire.PeerServer`.
  """

  def __init__(self, config: sd.DiLoCoConfig, inner_step, params,
               init_inner: Callable[[Any, int], Any], membership, peer: wire.PeerServer,
               elastic: ElasticConfig, log: Callable[[str], None] | None = None,
               on_exchange: Callable[[int], None] | None = None, checkpoints=None,
               should_stop: Callable[[], bool] | None = None,
               on_join: Callable[[int, float], None] | None = None):
    self.checkpoints = checkpoints  # an elastic.checkpoint.ElasticCheckpoints, or None
    self.should_stop = should_stop
    self.on_join = on_join  # called with (step, warm-up seconds) before the first quorum
    self.stopped_at: int | None = None  # the step it stopped at after should_stop()
    self.compiles_after_join = 0        # backend compiles from its first quorum on
    self._warm: tuple[int, Any] | None = None  # (step, batch) of the warm-up
    self._listening = False
    self._leader = False
    self.on_exchange = on_exchange  # called with t once in an exchange quorum (drills)
    self.config = dataclasses.replace(config, num_replicas=1)
    self.algo = sd.StreamingDiLoCo(self.config, inner_step, params, fuse_exchange=False)
    self.fragments = self.algo.fragments
    self.shapes = [f.shapes(params) for f in self.fragments]
    self.init_inner = init_inner
    self.membership = membership
    self.peer = peer
    self.elastic = elastic
    self.records: list[SyncRecord] = []
    self._log = log or logging.info
    self._tokens = 0
    c = self.config
    self._encode = [jax.jit(functools.partial(encode_fragment, frag=f, fmt=c.quantization,
                                              block=c.quant_block))
                    for f in self.fragments]
    self._decode = [jax.jit(functools.partial(decode_mean, frag=f, shapes=s,
                                              fmt=c.quantization, block=c.quant_block))
                    for f, s in zip(self.fragments, self.shapes)]
    self._outer: dict[fr.Event, Callable] = {}
    self._fresh = jax.jit(lambda p, step: jax.tree.map(lambda x: jnp.asarray(x)[None],
                                                       init_inner(p, step)))

  # ------------------------------------------------------------ helpers
  def init(self, inner_state) -> sd.DiLoCoState:
    return self.algo.init(inner_state)

  def _outer_program(self, event: fr.Event) -> Callable:
    if event not in self._outer:
      self._outer[event] = jax.jit(functools.partial(
          outer_with, fragments=self.fragments, event=event,
          outer_tx=self.algo.outer_tx, alpha=self.config.alpha))
    return self._outer[event]

  def _data(self, step: int, phase: int, **extra) -> dict:
    return dict(slice=self.elastic.slice_id, step=int(step), phase=phase,
                addr=self.peer.address, **extra)

  def _quorum(self, step: int, phase: int, **extra):
    return self.membership.quorum(self._data(step, phase, **extra),
                                  self.elastic.quorum_timeout)

  def snapshot(self, state: sd.DiLoCoState) -> bytes:
    outer = {"step": np.asarray(state.step), "outer_params": state.outer_params,
             "outer_opt_state": state.outer_opt_state, "inflight": state.inflight}
    return wire.pack(serialization.to_state_dict(jax.device_get(outer)))

  def restore(self, state: sd.DiLoCoState, data: bytes) -> sd.DiLoCoState:
    """`state` with the snapshot's outer state and step, its replica reset to
    θ̃ with a fresh inner optimizer state."""
    template = {"step": np.asarray(state.step), "outer_params": state.outer_params,
                "outer_opt_state": state.outer_opt_state, "inflight": state.inflight}
    got = serialization.from_state_dict(jax.device_get(template), wire.unpack(data))
    got["step"] = np.asarray(got["step"], np.int32)
    got = jax.device_put(got)  # (jnp.asarray would compile a program per shape)
    return sd.DiLoCoState(got["step"], self._fresh(got["outer_params"], got["step"]),
                          got["outer_params"], got["outer_opt_state"], got["inflight"])

  # ---------------------------------------------------------------- heal
  def heal(self, state, target: tuple[int, int], members, waited: float = 0.0):
    """Adopts the outer state of the members at position `target` (see the
    module docstring); returns the healed state."""
    start = time.monotonic()
    qids = []
    while target[1] == EXCHANGE:  # mirror the leaders' commit quorum
      qid, members = self._quorum(target[0], COMMIT, healing=True, have=[])
      qids.append(qid)
      top = max((_position(m) for m in _leaders(members)),
                default=(target[0], COMMIT))  # the leaders may have died meanwhile
      target = top if top > (target[0], COMMIT) else (target[0], COMMIT)
    sources = [m for m in _leaders(members) if _position(m) == target]
    for m in sources:
      try:
        data = self.peer.fetch_snapshot(m.data["addr"], target[0],
                                        self.elastic.heal_timeout)
      except wire.PeerError as e:
        self._log(f"heal: {e}; trying the next source")
        continue
      state = self.restore(state, data)
      self.peer.publish_snapshot(int(state.step), data)
      step = int(state.step)
      self._tokens = 0
      self.records.append(SyncRecord(step, "heal", (int(m.data["slice"]),),
                                     waited + time.monotonic() - start, tuple(qids)))
      self._log(f"healed from slice {m.data['slice']} at step {step} "
                f"({len(data)} bytes)")
      return state
    raise RuntimeError(f"Slice {self.elastic.slice_id} could not heal: no member at "
                       f"{target} answered with its outer state; restart it.")

  # ------------------------------------------------------------- warm-up
  def warm_up(self, state, batch) -> float:
    """Compiles every program of a round and of a heal (module docstring)
    before this slice joins: the inner step and the outer programs are
    lowered and compiled with the real arguments (nothing runs, nothing is
    donated); encode, decode and a restore run once (small, or as much memory
    as a heal). Returns the seconds taken."""
    begin = time.monotonic()
    self.algo.compiled_inner().lower(
        state.step, state.replicas, jax.tree.map(lambda x: x[None], batch)).compile()
    n, deltas = self.elastic.num_slices, {}
    for p in range(len(self.fragments)):
      codes = jax.device_get(self._encode[p](state))
      deltas[p] = self._decode[p]([codes] * n, jnp.asarray(np.ones((n,), np.float32)))
    for event in sorted(self.algo.schedule.events(), key=lambda e: (e.sync, e.apply)):
      if event.sync or event.apply:
        given = {str(p): {"delta": deltas[p], "count": jnp.asarray(n, jnp.float32)}
                 for p in event.sync}
        self._outer_program(event).lower(state, given).compile()
    self.restore(state, self.snapshot(state))  # a heal's programs (run, dropped)
    return time.monotonic() - begin

  def _count_compile(self, event: str, duration: float, **kw) -> None:
    del duration, kw
    if event == _COMPILE_EVENT:
      self.compiles_after_join += 1

  # ---------------------------------------------------------------- start
  def start(self, state, batch_fn: Callable[[int], Any] | None = None):
    """The start barrier (module docstring), after resuming from the newest
    checkpoint if any and, given batch_fn, the warm-up (on the batch of the
    start step, kept for the first step); returns the state to train from."""
    if self.checkpoints is not None:
      resumed = self.checkpoints.restore(state, self.init_inner)
      if resumed is not None:
        state, exact = resumed
        self._log(f"resumed from the outer checkpoint at step {int(state.step)} "
                  f"({'with' if exact else 'without'} this slice's inner state)")
    step, warm_s = int(state.step), 0.0
    if batch_fn is not None:
      self._warm = (step, batch_fn(step))
      warm_s = self.warm_up(state, self._warm[1])
      self._log(f"compiled its programs in {warm_s:.1f} s before joining")
    self.peer.publish_snapshot(step, self.snapshot(state))
    if self.on_join is not None:
      self.on_join(step, warm_s)
    wait_for = self.elastic.wait_for or self.elastic.num_slices
    begin = time.monotonic()
    if not self._listening:
      jax.monitoring.register_event_duration_secs_listener(self._count_compile)
      self._listening = True
    while True:
      qid, members = self._quorum(step, START)
      leaders = _leaders(members)
      top = max(_position(m) for m in leaders)
      if top > (step, START):
        return self.heal(state, top, members, time.monotonic() - begin)
      if len(leaders) >= wait_for:
        self.records.append(SyncRecord(step, "start", tuple(
            int(m.data["slice"]) for m in leaders), time.monotonic() - begin, (qid,)))
        return state
      if time.monotonic() - begin > self.elastic.quorum_timeout:
        raise TimeoutError(f"Only {len(leaders)} of {wait_for} slices joined within "
                           f"{self.elastic.quorum_timeout} s.")

  # ----------------------------------------------------------------- sync
  def sync(self, state, t: int, event: fr.Event):
    """The round of `event.sync` after step t (module docstring); returns
    (state, given) with given the averaged Δ_p per synced fragment, or
    (healed state, None)."""
    me, begin = self.elastic.slice_id, time.monotonic()
    mine = {}
    for p in event.sync:
      payload = jax.device_get(self._encode[p](state))
      mine[p] = payload
      self.peer.publish_payload(t, p, wire.pack({"tokens": self._tokens,
                                                 "codes": payload}))
    qid1, members = self._quorum(t, EXCHANGE, tokens=self._tokens)
    top = max(_position(m) for m in _leaders(members))
    if top > (t, EXCHANGE):
      return self.heal(state, top, members, time.monotonic() - begin), None
    if self.on_exchange is not None:
      self.on_exchange(t)
    got = {me: {"tokens": self._tokens, "codes": mine}}
    exchangers = {int(m.data["slice"]) for m in _leaders(members)
                  if _position(m) == (t, EXCHANGE)}
    for m in _leaders(members):
      s = int(m.data["slice"])
      if s == me or s not in exchangers:
        continue
      try:
        got[s] = {"tokens": int(m.data.get("tokens", 0)), "codes": {
            p: wire.unpack(self.peer.fetch_payload(m.data["addr"], t, p,
                                                   self.elastic.exchange_timeout))["codes"]
            for p in event.sync}}
      except wire.PeerError as e:
        self._log(f"step {t}: slice {s} dropped from the exchange: {e}")
    qid2, members = self._quorum(t, COMMIT, have=sorted(got))
    top = max(_position(m) for m in _leaders(members))
    if top > (t, COMMIT):
      return self.heal(state, top, members, time.monotonic() - begin), None
    committers = [m for m in _leaders(members) if _position(m) == (t, COMMIT)]
    use = sorted(set.intersection(*(set(m.data["have"]) for m in committers)))
    self._leader = min(int(m.data["slice"]) for m in committers) == me
    # always num_slices payloads, the absent ones (filled with this slice's)
    # weighing 0: one decode program whatever the membership, the same bits
    w = np.zeros((self.elastic.num_slices,), np.float32)
    w[:len(use)] = [got[s]["tokens"] if self.elastic.weight_by_tokens else 1.0
                    for s in use]
    fill = [mine] * (self.elastic.num_slices - len(use))
    given = {str(p): {"delta": self._decode[p](
        [got[s]["codes"][p] for s in use] + [m[p] for m in fill], jnp.asarray(w)),
                      "count": jnp.asarray(len(use), jnp.float32)}
             for p in event.sync}
    self._tokens = 0
    self.records.append(SyncRecord(t, "sync", tuple(use), time.monotonic() - begin,
                                   (qid1, qid2), tuple(sorted(exchangers - set(use)))))
    return state, given

  # ------------------------------------------------------------------ run
  def run(self, state, batch_fn: Callable[[int], Any], num_steps: int,
          on_step: Callable[[int, dict, sd.DiLoCoState], None] | None = None):
    """Trains until `num_steps` inner steps are done (from state.step, after
    the warm-up and the start barrier), or until `should_stop()` after a
    sync; batch_fn(step) is this slice's batch of inner step `step` ([B, ...],
    as given to inner_step)."""
    try:
      return self._run(state, batch_fn, num_steps, on_step)
    finally:
      if self._listening:
        jax.monitoring.unregister_event_duration_listener(self._count_compile)
        self._listening = False

  def _run(self, state, batch_fn, num_steps, on_step):
    state = self.start(state, batch_fn)
    step = int(state.step)
    while step < num_steps:
      warm, self._warm = self._warm, None
      batch = warm[1] if warm is not None and warm[0] == step else batch_fn(step)
      new_step, replicas, metrics = self.algo.compiled_inner()(
          state.step, state.replicas, jax.tree.map(lambda x: x[None], batch))
      state = state.replace(step=new_step, replicas=replicas)
      self._tokens += int(metrics.get("tokens", 0))
      event = self.algo.event(step)
      step += 1
      given = {}
      if event.sync:
        state, given = self.sync(state, step, event)
        if given is None:  # healed: continue from the leaders' step
          step = int(state.step)
          if on_step is not None:
            on_step(step, {}, state)
          continue
      if event.sync or event.apply:
        state = self._outer_program(event)(state, given)
      stop = bool(event.sync) and self.should_stop is not None and self.should_stop()
      if event.sync:
        self.peer.publish_snapshot(step, self.snapshot(state))
        if self.checkpoints is not None and (stop or self.checkpoints.due(step)):
          self.checkpoints.save(step, state, self._leader)
      if on_step is not None:
        on_step(step, metrics, state)
      if stop:
        self.stopped_at = step
        self._log(f"stopping after the sync of step {step} (asked to stop)"
                  + (", checkpoint saved" if self.checkpoints is not None else ""))
        break
    return state
