"""Streaming DiLoCo (Douillard et al., 2025, arXiv 2501.18512) around any inner step.

M replicas train independently with an inner optimizer; the parameters are
split into fragments (`fragments.py`) that are synchronised on a staggered
schedule. For fragment p, after inner step t:

  if (t - t_p) mod H == 0:        Δ_{m,p} = θ̃_p - θ_{m,p}; quantize (FP4 E3M0 by
                                  default, `quantization.py`); exchange;
                                  Δ_p = fp32 mean over participating replicas
                                  of the dequantized values; keep it in flight
  if (t - t_p - τ) mod H == 0:    θ̃_p <- OuterOpt(θ̃_p, Δ_p)   (Nesterov SGD)
                                  θ_{m,p} <- α θ_{m,p} + (1 - α) θ̃_p   (every m)

With τ = 0 both happen after the same step (exchange first). The outer
parameters θ̃ are the ones to evaluate (`outer_params`).

Wrapping. `inner_step(state, batch) -> (state, metrics)` is any pure step whose
state has a `.params` field and a `.replace` method (a flax struct such as
trainer.TrainState, or distillation / RL states). `replica_steps` vmaps it over
a leading replica axis M of the state and batch ([M, B/M, ...]), with
`spmd_axis_name` so sharding constraints inside the step
put the vmapped axis on the "replica" mesh axis (whose rules must then leave
"replica" out of the batch axes: see `without_mesh_axis`). A step may take a
third argument, `inner_step(state, batch, aux)`, e.g. `trainer.optimizer_step`
with a frozen teacher's parameters as `aux` (distillation): `aux` is the same
for every replica (broadcast, not vmapped), is never donated and gets no
gradient or update; pass it to `train_step(..., aux=...)`. With aux None (the
default) the step is called with two arguments.

The exchange. `exchange` (the reference) passes Δ_{m,p} through
`quantization.fake_quantize` (bit-identical to dequantize(quantize(.))), then
takes the fp32 mean over replicas: a sharded replica axis would move fp32.
`DiLoCoTrainer` (mesh replica axis > 1) uses `diloco_exchange.sharded_exchange`
(same bits): the packed codes (uint8 FP4, int8, bf16) and fp32 scales are
all-gathered over "replica", the mean is local; only per-block scales whose
blocks cross shard boundaries still move fp32. `Traffic` counts the bytes of
the codes. θ̃ is kept in the params' dtype; Δ, its mean and the merge are fp32.

Schedule compilation. The schedule is static (Python): `SyncSchedule.event(t)`
gives the (sync, apply) fragment sets after step t, at most 2F + 1 distinct
events whatever H is. A step runs as two jitted programs picked on the host from
its step number: the inner program (the vmapped inner step, the same for every
step, compiled once) and, when the event is not empty, that event's outer
program (its exchanges and outer updates only, compiled once per distinct event
and small: fragment-sized work plus in-place merges into the donated replica
params). Why not one program per event: each would recompile the whole inner
step, up to 2F + 1 times (minutes each at scale). Why not `lax.switch` on the
step counter: every branch would have to return the whole state (copies of
replica params in the no-op branches) and would hide collectives inside
conditionals. `diloco_step` composes the two pure functions for callers that
want a single program.

Dropped replicas (simulated failures or stragglers). `participating` ([M], 0/1,
an input of every step, used at syncs) leaves replicas out of a sync: Δ_p
is the mean over participants only (a dropped replica's pseudo-gradient is
never sent); every replica, dropped or not, is still merged at the apply step.
If nobody participates, the fragment's outer update and merge are skipped (θ̃_p,
its momentum and the replicas' θ_{m,p} stay as they are).

Outer optimizer state is kept per fragment (tx.init of the fragment's values),
so any elementwise optax optimizer steps each fragment once per window.

Bytes (`Traffic`, host-side Python ints; static per event). One replica's
payload for fragment p is the sum over its tensors (each per-layer slice of a
scanned leaf is its own tensor) of `quantization.bytes_of` in the exchange
format: FP4 is |fragment| * 4 bits + 4 bytes per scale. `ByteCounter` sums, per
step: sent_bytes (payload x participating replicas), replica_bytes (what one
always-participating replica sent), peak_step_bytes (the most one replica sends
after one step), and the data-parallel equivalents: each replica all-reducing
its full gradient every step, n_params x dp_bytes_per_param (default: the
params' dtype size; fp32 here) per replica per step.

Hyperparameter provenance: H = 100, τ = 1, α = 0.5, M = 2, fragments of 3
layers, strided, FP4 E3M0 [V/S]; outer lr 0.4 [S]; outer momentum 0.9, per-tensor
FP4 scales, fragment offsets t_p = round(p H / F) [M] (reconstructions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax import fragments as fr
from posttrain_jax import quantization

REPLICA_AXIS = "replica"
InnerStep = Callable[..., tuple[Any, dict]]  # (state, batch[, aux]) -> (state, metrics)


@dataclasses.dataclass(frozen=True)
class DiLoCoConfig:
  """Streaming DiLoCo hyperparameters (see the module docstring for sources).

  Attributes:
    num_replicas: M.
    sync_every: H, inner steps between two syncs of one fragment.
    num_fragments: P layer fragments; None -> one per 3 layers (or scanned
      groups), at least 1.
    pattern: "strided" or "sequential" (fragments.PATTERNS).
    embeddings: "join" (non-layer params in fragment 0), "separate" (their
      own fragment) or "split" (cut into P slices, one per fragment: balanced
      fragments); see fragments.py.
    overlap: τ, steps between an exchange's start and its outer update; < H.
    alpha: merge weight of the local replica params (0 = replace by θ̃).
    outer_lr, outer_momentum, nesterov: optax.sgd of the outer step
      (momentum 0 means plain SGD).
    quantization: exchange format, one of quantization.FORMATS.
    quant_block: None = one scale per tensor, K = one per K elements.
    dp_bytes_per_param: bytes per parameter of the data-parallel baseline's
      gradient all-reduce; None = the params' dtype size.
  """

  num_replicas: int = 2
  sync_every: int = 100
  num_fragments: int | None = None
  pattern: str = "strided"
  embeddings: str = "join"
  overlap: int = 1
  alpha: float = 0.5
  outer_lr: float = 0.4
  outer_momentum: float = 0.9
  nesterov: bool = True
  quantization: str = "fp4_e3m0"
  quant_block: int | None = None
  dp_bytes_per_param: int | None = None

  def __post_init__(self):
    if self.num_replicas < 1:
      raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
    quantization.bytes_of((1,), self.quantization, self.quant_block)  # validates
    fr.SyncSchedule(1, self.sync_every, self.overlap)  # validates H and tau

  def outer_optimizer(self) -> optax.GradientTransformation:
    momentum = self.outer_momentum or None
    return optax.sgd(self.outer_lr, momentum=momentum,
                     nesterov=self.nesterov and momentum is not None)

  def make_fragments(self, params) -> tuple[fr.Fragment, ...]:
    num = self.num_fragments
    if num is None:
      num = max(1, fr.layer_structure(params)[1] // 3)
    return fr.make_fragments(params, num, self.pattern, self.embeddings)


@flax.struct.dataclass
class DiLoCoState:
  """step: inner steps taken; replicas: the inner state with a leading [M] axis
  on every leaf; outer_params: θ̃ (one copy); outer_opt_state: one per
  fragment; inflight: per fragment {"delta": averaged Δ_p (fp32, by selector
  name), "count": participants of its last exchange}."""

  step: jax.Array
  replicas: Any
  outer_params: Any
  outer_opt_state: tuple
  inflight: tuple


def outer_params(state: DiLoCoState):
  """The parameters to evaluate (θ̃)."""
  return state.outer_params


def replica_params(state: DiLoCoState, m: int):
  return jax.tree.map(lambda x: x[m], state.replicas.params)


def replica_average_params(state: DiLoCoState):
  return jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), 0).astype(x.dtype),
                      state.replicas.params)


def init_state(inner_state, fragments: Sequence[fr.Fragment],
               outer_tx: optax.GradientTransformation, num_replicas: int) -> DiLoCoState:
  """Every replica starts from `inner_state`; θ̃ = its params."""
  replicas = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_replicas,) + x.shape),
                          inner_state)
  params = inner_state.params
  opt = tuple(outer_tx.init(fr.take(params, f)) for f in fragments)
  inflight = tuple({"delta": {k: jnp.zeros(v.shape, jnp.float32)
                              for k, v in fr.take(params, f).items()},
                    "count": jnp.zeros((), jnp.float32)} for f in fragments)
  return DiLoCoState(jnp.zeros((), jnp.int32), replicas, params, opt, inflight)


def _quantize_selected(delta, frag: fr.Fragment, fmt: str, block: int | None):
  """Per-replica, per-tensor fake quantization of a fragment's Δ ([M, ...])."""
  rows = {s.name: s.rows is not None and s.row_tensors for s in frag.selectors}

  def one(name, x):
    q = functools.partial(quantization.fake_quantize, format=fmt, block=block)
    if rows[name]:  # scanned slice: one tensor per layer (group) row
      q = jax.vmap(q)
    return jax.vmap(q)(x)
  return {k: one(k, v) for k, v in delta.items()}


def exchange(outer, replica_params_, frag: fr.Fragment, participating: jax.Array,
             fmt: str = "fp4_e3m0", block: int | None = None):
  """Averaged pseudo-gradient of one fragment: (Δ_p by selector name, count).

  Δ_{m,p} = θ̃_p - θ_{m,p} in fp32, quantized per replica and tensor, then the
  fp32 mean over replicas with participating[m] = 1.
  """
  theta = fr.take(outer, frag)
  local = jax.vmap(lambda t: fr.take(t, frag))(replica_params_)
  delta = {k: theta[k].astype(jnp.float32)[None] - local[k].astype(jnp.float32)
           for k in theta}
  delta = _quantize_selected(delta, frag, fmt, block)
  w = participating.astype(jnp.float32)
  return {k: replica_mean(w, v) for k, v in delta.items()}, jnp.sum(w)


def replica_mean(w: jax.Array, values: jax.Array) -> jax.Array:
  """Σ_m w_m values[m] / max(Σ_m w_m, 1) in fp32, summed in the fixed order
  m = 0, 1, ... and scaled by the scalar reciprocal (a division of the tensor
  may compile to either), so that sharded exchanges give the same bits."""
  total = functools.reduce(lambda acc, m: acc + w[m] * values[m],
                           range(1, values.shape[0]), w[0] * values[0])
  return total * (1.0 / jnp.maximum(jnp.sum(w), 1.0))


def apply_outer(outer, outer_opt, replica_params_, frag: fr.Fragment, delta, count,
                outer_tx: optax.GradientTransformation, alpha: float):
  """Outer step on fragment p and merge of every replica's fragment p.
  Skipped (all unchanged) when count == 0."""
  theta = fr.take(outer, frag)
  updates, new_opt = outer_tx.update(delta, outer_opt, theta)
  new_theta = optax.apply_updates(theta, updates)
  ok = count > 0
  new_theta = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_theta, theta)
  new_opt = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_opt, outer_opt)

  def merge(local):
    mine = fr.take(local, frag)
    merged = {k: (alpha * v.astype(jnp.float32)
                  + (1.0 - alpha) * new_theta[k].astype(jnp.float32))
              for k, v in mine.items()}
    merged = {k: jnp.where(ok, merged[k], mine[k]) for k in mine}
    return fr.put(local, frag, merged)
  return (fr.put(outer, frag, new_theta), new_opt, jax.vmap(merge)(replica_params_))


def replica_steps(step: jax.Array, replicas, batch, aux=None, *,
                  inner_step: InnerStep, spmd_axis_name: str | None = None):
  """(step + 1, replicas after one vmapped inner step each, metrics). Metrics
  are replica means (tokens: the sum), plus loss_per_replica. Takes only the
  replicas (not the outer state), so one compiled program serves every
  fragment configuration. `aux` (None: not passed) goes unbatched to every
  replica's inner_step(state, batch, aux)."""
  if aux is None:
    replicas, metrics = jax.vmap(inner_step, spmd_axis_name=spmd_axis_name)(
        replicas, batch)
  else:
    replicas, metrics = jax.vmap(inner_step, in_axes=(0, 0, None),
                                 spmd_axis_name=spmd_axis_name)(replicas, batch, aux)
  out = {k: jnp.sum(v) if k == "tokens" else jnp.mean(v) for k, v in metrics.items()}
  if "loss" in metrics:
    out["loss_per_replica"] = metrics["loss"]
  return step + 1, replicas, out


def inner_update(state: DiLoCoState, batch, aux=None, *, inner_step: InnerStep,
                 spmd_axis_name: str | None = None):
  """Every replica takes one inner step (vmapped); batch leaves are [M, B/M, ...];
  `aux` is shared by the replicas (see replica_steps)."""
  step, replicas, metrics = replica_steps(state.step, state.replicas, batch, aux,
                                          inner_step=inner_step,
                                          spmd_axis_name=spmd_axis_name)
  return state.replace(step=step, replicas=replicas), metrics


def outer_update(state: DiLoCoState, participating: jax.Array, *,
                 fragments: Sequence[fr.Fragment], event: fr.Event,
                 outer_tx: optax.GradientTransformation, alpha: float,
                 quantization_format: str = "fp4_e3m0",
                 quant_block: int | None = None,
                 exchange_fn: Callable = exchange) -> DiLoCoState:
  """`event`'s exchanges (first; `exchange_fn` has `exchange`'s signature)
  and outer updates + merges."""
  params = state.replicas.params
  outer, opt, inflight = state.outer_params, list(state.outer_opt_state), list(
      state.inflight)
  for p in event.sync:
    delta, count = exchange_fn(outer, params, fragments[p], participating,
                               quantization_format, quant_block)
    inflight[p] = {"delta": delta, "count": count}
  for p in event.apply:
    outer, opt[p], params = apply_outer(outer, opt[p], params, fragments[p],
                                        inflight[p]["delta"], inflight[p]["count"],
                                        outer_tx, alpha)
  return state.replace(replicas=state.replicas.replace(params=params),
                       outer_params=outer, outer_opt_state=tuple(opt),
                       inflight=tuple(inflight))


def diloco_step(state: DiLoCoState, batch, participating: jax.Array, aux=None, *,
                inner_step: InnerStep, fragments: Sequence[fr.Fragment],
                event: fr.Event, outer_tx: optax.GradientTransformation,
                alpha: float, quantization_format: str = "fp4_e3m0",
                quant_block: int | None = None, spmd_axis_name: str | None = None,
                exchange_fn: Callable = exchange):
  """One whole Streaming DiLoCo step as one pure function: inner_update then
  outer_update for `event`."""
  state, metrics = inner_update(state, batch, aux, inner_step=inner_step,
                                spmd_axis_name=spmd_axis_name)
  state = outer_update(state, participating, fragments=fragments, event=event,
                       outer_tx=outer_tx, alpha=alpha,
                       quantization_format=quantization_format,
                       quant_block=quant_block, exchange_fn=exchange_fn)
  return state, metrics


# ------------------------------------------------------------------ traffic

@dataclasses.dataclass(frozen=True)
class Traffic:
  """Static wire sizes: payload_bytes[p] is what one replica sends when
  fragment p syncs; dp_step_bytes what it sends per data-parallel step."""

  payload_bytes: tuple[int, ...]
  dp_step_bytes: int
  num_params: int

  @classmethod
  def build(cls, params, fragments: Sequence[fr.Fragment], fmt: str,
            block: int | None, dp_bytes_per_param: int | None = None) -> "Traffic":
    leaves = fr._leaves_by_path(params)  # pylint: disable=protected-access
    payload = []
    for f in fragments:
      total = 0
      for s in f.selectors:
        shape = leaves[s.path].shape
        if s.rows is None or not s.row_tensors:  # one tensor
          total += quantization.bytes_of(fr.selected_shape(shape, s.rows), fmt, block)
        else:  # one tensor per row (a scanned layer's slice)
          total += len(range(*s.rows)) * quantization.bytes_of(shape[1:], fmt, block)
      payload.append(total)
    num = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    per = dp_bytes_per_param or max(np.dtype(x.dtype).itemsize
                                    for x in jax.tree.leaves(params))
    return cls(tuple(payload), num * per, num)

  @property
  def full_sync_bytes(self) -> int:
    return sum(self.payload_bytes)

  def step_bytes(self, event: fr.Event) -> int:
    return sum(self.payload_bytes[p] for p in event.sync)


@dataclasses.dataclass
class ByteCounter:
  """Cumulative traffic of a run (host-side; see the module docstring)."""

  traffic: Traffic
  num_replicas: int
  steps: int = 0
  sent_bytes: int = 0
  replica_bytes: int = 0
  peak_step_bytes: int = 0

  def update(self, event: fr.Event, participants: int | None = None) -> None:
    n = self.num_replicas if participants is None else int(participants)
    step = self.traffic.step_bytes(event)
    self.steps += 1
    self.replica_bytes += step
    self.sent_bytes += step * n
    self.peak_step_bytes = max(self.peak_step_bytes, step)

  @property
  def dp_replica_bytes(self) -> int:
    return self.steps * self.traffic.dp_step_bytes

  @property
  def dp_sent_bytes(self) -> int:
    return self.dp_replica_bytes * self.num_replicas

  def as_dict(self) -> dict[str, int]:
    return {"sent_bytes": self.sent_bytes, "replica_bytes": self.replica_bytes,
            "peak_step_bytes": self.peak_step_bytes,
            "dp_replica_bytes": self.dp_replica_bytes,
            "dp_sent_bytes": self.dp_sent_bytes,
            "dp_peak_step_bytes": self.traffic.dp_step_bytes}


# ------------------------------------------------------------------ wrappers

class StreamingDiLoCo:
  """Streaming DiLoCo around any inner step: one jitted inner program plus one
  small jitted outer program per distinct schedule event.

  No explicit shardings (jit infers them from the inputs); `DiLoCoTrainer`
  adds the mesh for the LM trainer.

  Usage:
    algo = StreamingDiLoCo(config, inner_step, params)
    state = algo.init(inner_state)
    for step in range(num_steps):
      state, metrics = algo.train_step(state, batch_mb, step)  # batch [M, B/M, ...]
  """

  def __init__(self, config: DiLoCoConfig, inner_step: InnerStep, params,
               spmd_axis_name: str | None = None, exchange_fn: Callable = exchange):
    self.config = config
    self.exchange_fn = exchange_fn
    self.inner_step = inner_step
    self.fragments = config.make_fragments(params)
    self.schedule = fr.SyncSchedule(len(self.fragments), config.sync_every,
                                    config.overlap)
    self.outer_tx = config.outer_optimizer()
    self.traffic = Traffic.build(params, self.fragments, config.quantization,
                                 config.quant_block, config.dp_bytes_per_param)
    self.spmd_axis_name = spmd_axis_name
    self._inner: Callable | None = None
    self._outer: dict[fr.Event, Callable] = {}

  def new_counter(self) -> ByteCounter:
    return ByteCounter(self.traffic, self.config.num_replicas)

  def counter_at(self, step: int) -> ByteCounter:
    """The counter after `step` steps with every replica participating (to
    resume a run's traffic totals from its checkpoint step)."""
    counter = self.new_counter()
    for t in range(step):
      counter.update(self.event(t))
    return counter

  def init_fn(self, inner_state) -> DiLoCoState:
    return init_state(inner_state, self.fragments, self.outer_tx,
                      self.config.num_replicas)

  def init(self, inner_state) -> DiLoCoState:
    return jax.jit(self.init_fn)(inner_state)

  def event(self, step: int) -> fr.Event:
    """The event of the step taken when `step` inner steps are done."""
    return self.schedule.event(step + 1)

  def inner_fn(self) -> Callable:
    """Pure (step, replicas, batch [M, ...][, aux]) -> (step, replicas, metrics)."""
    return functools.partial(replica_steps, inner_step=self.inner_step,
                             spmd_axis_name=self.spmd_axis_name)

  def outer_fn(self, event: fr.Event) -> Callable:
    """Pure (state, participating [M]) -> state for `event`."""
    c = self.config
    return functools.partial(
        outer_update, fragments=self.fragments, event=event, outer_tx=self.outer_tx,
        alpha=c.alpha, quantization_format=c.quantization, quant_block=c.quant_block,
        exchange_fn=self.exchange_fn)

  def _jit_inner(self, fn):
    return _jit_inner_cached(self.inner_step, self.spmd_axis_name)

  def _jit_outer(self, fn):
    return jax.jit(fn, donate_argnums=(0,))

  def compiled_inner(self) -> Callable:
    if self._inner is None:
      self._inner = self._jit_inner(self.inner_fn())
    return self._inner

  def compiled_outer(self, event: fr.Event) -> Callable:
    if event not in self._outer:
      self._outer[event] = self._jit_outer(self.outer_fn(event))
    return self._outer[event]

  def participation(self, participating=None) -> jax.Array:
    m = self.config.num_replicas
    if participating is None:
      return jnp.ones((m,), jnp.float32)
    participating = jnp.asarray(participating, jnp.float32)
    if participating.shape != (m,):
      raise ValueError(f"participating must have shape ({m},), got "
                       f"{participating.shape}.")
    return participating

  def train_step(self, state: DiLoCoState, batch, step: int | None = None,
                 participating=None, aux=None):
    """`step` = inner steps already taken (= state.step), which the host loop
    knows; None reads state.step from the device (a synchronisation). `aux`
    (e.g. a frozen teacher's params) goes to every replica's inner step."""
    if step is None:
      step = int(jax.device_get(state.step))
    args = (state.step, state.replicas, batch) + (() if aux is None else (aux,))
    new_step, replicas, metrics = self.compiled_inner()(*args)
    state = state.replace(step=new_step, replicas=replicas)
    event = self.event(step)
    if event.sync or event.apply:
      state = self.compiled_outer(event)(state, self.participation(participating))
    return state, metrics


@functools.lru_cache(maxsize=16)
def _jit_inner_cached(inner_step, spmd_axis_name):
  """One jitted inner program per inner step (shared by StreamingDiLoCo
  instances with the same inner step, e.g. in tests); aux is not donated."""
  return jax.jit(functools.partial(replica_steps, inner_step=inner_step,
                                   spmd_axis_name=spmd_axis_name),
                 donate_argnums=(0, 1))


def split_replicas(batch, num_replicas: int):
  """[B, ...] -> [M, B/M, ...]: replica m gets rows [m B/M, (m+1) B/M), i.e. with
  one process per replica, that process's own rows."""
  def split(x):
    if x.shape[0] % num_replicas:
      raise ValueError(f"Batch size {x.shape[0]} is not divisible by "
                       f"num_replicas {num_replicas}.")
    return x.reshape((num_replicas, x.shape[0] // num_replicas) + x.shape[1:])
  return jax.tree.map(split, batch)
