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

The exchange (diloco_exchange.py). `exchange` (the reference) fake-quantizes
each replica's Δ_{m,p} and takes the fp32 mean over replicas;
`sharded_exchange` (`DiLoCoTrainer`, mesh replica axis > 1, same bits)
all-gathers the packed codes and scales over "replica". θ̃ is kept in the
params' dtype; Δ, its mean and the merge are fp32.

Programs. The schedule is static (Python): `SyncSchedule.event(t)` gives the
(sync, apply) fragment sets after step t, at most 2F + 1 distinct events
whatever H is. `StreamingDiLoCo.train_step` runs step t (the t-th inner step)
as at most two jitted programs, picked on the host from t (`programs`):

  τ = 0:   inner; then, if event(t) is not empty, outer(event(t)): its
           exchanges, then its outer updates + merges.
  τ >= 1:  S = event(t - 1).sync, the exchanges started after step t - 1:
           S empty -> inner; else fused(S): S's exchanges and inner step t in
           one program, without data dependence between them (the exchange
           reads θ̃_p and θ_{m,p} before step t's update), so XLA's latency-
           hiding scheduler can overlap the collective over "replica" with the
           inner step's compute; then, if event(t).apply is not empty,
           outer(Event(apply=event(t).apply)): outer updates + merges only.

inner (the vmapped inner step) is compiled once, outer(e) once per distinct
event (fragment-sized work plus in-place merges into the donated replica
params), fused(S) once per distinct S (at most F). fused(S) gives the values of
running S's exchanges after step t - 1 (`fuse_exchange=False`): in between only
event(t - 1)'s applies run, on fragments not in S (none syncs and applies after
the same step when 1 <= τ < H), and fragments are disjoint: θ̃_p and θ_{m,p}
are the same bits. Not one program per event: each would recompile the whole
inner step (up to 2F + 1 times, minutes each at scale). Not `lax.switch` on the
step: every branch would return the whole state (copies of the replica params)
and hide collectives inside conditionals. `diloco_step` composes inner and
outer (the τ = 0 order) as one pure function.

Deferred exchanges (τ >= 1). After step t, inflight[p] of p in event(t).sync
still holds fragment p's previous Δ_p (already applied; zeros at first): step
t + 1's program computes the new one. A checkpoint after step t holds the θ̃
and θ_{m,p} it is computed from, and S is a function of t, so the resumed run's
first program recomputes it: resume is exact. θ̃ (evaluated, exported) changes
only at applies. The exchange started after a run's last step is not run (its
update would come after the end); its bytes count at that step all the same
(diloco_traffic). The `participating` mask of step t waits on the host for step
t + 1 (a new process resuming after step t: `defer_participation`, else all).

Dropped replicas (simulated failures or stragglers). `participating` ([M], 0/1,
an input of every step, used at syncs) leaves replicas out of a sync: Δ_p
is the mean over participants only (a dropped replica's pseudo-gradient is
never sent); every replica, dropped or not, is still merged at the apply step.
If nobody participates, the fragment's outer update and merge are skipped (θ̃_p,
its momentum and the replicas' θ_{m,p} stay as they are).

Outer optimizer state is kept per fragment (tx.init of the fragment's values),
so any elementwise optax optimizer steps each fragment once per window.

Bytes: `Traffic` and `ByteCounter` (traffic.py, host-side ints) count what
each collective moves per replica and the bf16 data-parallel equivalent.

Hyperparameter provenance: H = 100, τ = 1, α = 0.5, M = 2, fragments of 3
layers, strided, FP4 E3M0 [V/S]; outer lr 0.4 [S]; outer momentum 0.9, per-tensor
FP4 scales, fragment offsets t_p = round(p H / F) [M] (reconstructions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import collections
import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from posttrain_jax.diloco import exchange as dx
from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import quantization
from posttrain_jax.diloco import traffic as diloco_traffic
from posttrain_jax.diloco import replica_metrics as rm

# re-exported: the reference exchange and the byte counters live in their modules
REPLICA_AXIS, exchange, replica_mean = dx.REPLICA_AXIS, dx.exchange, dx.replica_mean
replica_metric_means, InnerProgram = rm.replica_metric_means, rm.InnerProgram
Traffic, ByteCounter = diloco_traffic.Traffic, diloco_traffic.ByteCounter

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
    dp_dtype: dtype of the data-parallel baseline's gradient all-reduce
      (traffic.py; bf16 as in the paper).
    block_fallback: "fp32" (tensors whose scale blocks cross shards take the
      fp32 reference exchange, counted and reported) or "error" (refuse).
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
  dp_dtype: str = "bfloat16"
  block_fallback: str = "fp32"

  def __post_init__(self):
    if self.num_replicas < 1:
      raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}.")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
    quantization.bytes_of((1,), self.quantization, self.quant_block)  # validates
    fr.SyncSchedule(1, self.sync_every, self.overlap)  # validates H and tau
    if self.block_fallback not in ("fp32", "error"):
      raise ValueError(f"block_fallback must be 'fp32' or 'error', got "
                       f"{self.block_fallback!r}.")

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
  name), "count": participants of its last exchange}; with τ >= 1, of the
  last exchange run (see Deferred exchanges in the module docstring)."""

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
  stay per replica (leading axis M, on the "replica" mesh axis): no reduction
  over replicas, so the inner step has no cross-replica (DCN) collective;
  `replica_metric_means` gives the logged values. Takes only the
  replicas (not the outer state), so one compiled program serves every
  fragment configuration. `aux` (None: not passed) goes unbatched to every
  replica's inner_step(state, batch, aux)."""
  if aux is None:
    replicas, metrics = jax.vmap(inner_step, spmd_axis_name=spmd_axis_name)(
        replicas, batch)
  else:
    replicas, metrics = jax.vmap(inner_step, in_axes=(0, 0, None),
                                 spmd_axis_name=spmd_axis_name)(replicas, batch, aux)
  return step + 1, replicas, metrics


def inner_update(state: DiLoCoState, batch, aux=None, *, inner_step: InnerStep,
                 spmd_axis_name: str | None = None):
  """Every replica takes one inner step (vmapped); batch leaves are [M, B/M, ...];
  `aux` is shared by the replicas; metrics per replica (see replica_steps)."""
  step, replicas, metrics = replica_steps(state.step, state.replicas, batch, aux,
                                          inner_step=inner_step,
                                          spmd_axis_name=spmd_axis_name)
  return state.replace(step=step, replicas=replicas), metrics


def start_exchanges(state: DiLoCoState, participating: jax.Array, *,
                    fragments: Sequence[fr.Fragment], sync: Sequence[int],
                    quantization_format: str = "fp4_e3m0",
                    quant_block: int | None = None,
                    exchange_fn: Callable = exchange) -> tuple:
  """`state.inflight` with inflight[p] = {"delta": Δ_p, "count": Σ_m w_m} for p
  in `sync`, Δ_p = exchange_fn(θ̃, θ_m, fragment p, w) read from `state`."""
  inflight = list(state.inflight)
  for p in sync:
    delta, count = exchange_fn(state.outer_params, state.replicas.params, fragments[p],
                               participating, quantization_format, quant_block)
    inflight[p] = {"delta": delta, "count": count}
  return tuple(inflight)


def outer_update(state: DiLoCoState, participating: jax.Array, *,
                 fragments: Sequence[fr.Fragment], event: fr.Event,
                 outer_tx: optax.GradientTransformation, alpha: float,
                 quantization_format: str = "fp4_e3m0",
                 quant_block: int | None = None,
                 exchange_fn: Callable = exchange) -> DiLoCoState:
  """`event`'s exchanges (first; `exchange_fn` has `exchange`'s signature)
  and outer updates + merges."""
  inflight = start_exchanges(state, participating, fragments=fragments,
                             sync=event.sync, quantization_format=quantization_format,
                             quant_block=quant_block, exchange_fn=exchange_fn)
  params, outer, opt = state.replicas.params, state.outer_params, list(
      state.outer_opt_state)
  for p in event.apply:
    outer, opt[p], params = apply_outer(outer, opt[p], params, fragments[p],
                                        inflight[p]["delta"], inflight[p]["count"],
                                        outer_tx, alpha)
  return state.replace(replicas=state.replicas.replace(params=params),
                       outer_params=outer, outer_opt_state=tuple(opt),
                       inflight=inflight)


def overlapped_update(state: DiLoCoState, batch, participating: jax.Array, aux=None,
                      *, inner_step: InnerStep, fragments: Sequence[fr.Fragment],
                      sync: Sequence[int], quantization_format: str = "fp4_e3m0",
                      quant_block: int | None = None,
                      spmd_axis_name: str | None = None,
                      exchange_fn: Callable = exchange):
  """Inner step t + 1 and the exchanges of `sync` (= event(t).sync, τ >= 1)
  as one pure function without data dependence between the two:

    inflight[p] <- exchange(θ̃_p, θ_{m,p} after step t, participating)  (p in sync)
    θ_m <- inner_step(θ_m, batch_m)                                      (every m)

  (`participating`: the mask given for step t.) The same values as
  outer_update(event(t)) after step t: see the module docstring (Programs)."""
  inflight = start_exchanges(state, participating, fragments=fragments, sync=sync,
                             quantization_format=quantization_format,
                             quant_block=quant_block, exchange_fn=exchange_fn)
  step, replicas, metrics = replica_steps(state.step, state.replicas, batch, aux,
                                          inner_step=inner_step,
                                          spmd_axis_name=spmd_axis_name)
  return state.replace(step=step, replicas=replicas, inflight=inflight), metrics


def diloco_step(state: DiLoCoState, batch, participating: jax.Array, aux=None, *,
                inner_step: InnerStep, fragments: Sequence[fr.Fragment],
                event: fr.Event, outer_tx: optax.GradientTransformation,
                alpha: float, quantization_format: str = "fp4_e3m0",
                quant_block: int | None = None, spmd_axis_name: str | None = None,
                exchange_fn: Callable = exchange):
  """One whole Streaming DiLoCo step as one pure function: inner_update then
  outer_update for `event`; metrics: replica_metric_means."""
  state, metrics = inner_update(state, batch, aux, inner_step=inner_step,
                                spmd_axis_name=spmd_axis_name)
  metrics = replica_metric_means(metrics)
  state = outer_update(state, participating, fragments=fragments, event=event,
                       outer_tx=outer_tx, alpha=alpha,
                       quantization_format=quantization_format,
                       quant_block=quant_block, exchange_fn=exchange_fn)
  return state, metrics


# ------------------------------------------------------------------ wrappers

class StreamingDiLoCo:
  """Streaming DiLoCo around any inner step: the jitted programs of the module
  docstring (Programs), each compiled once and picked on the host per step.

  No explicit shardings (jit infers them from the inputs); `DiLoCoTrainer`
  adds the mesh for the LM trainer. fuse_exchange=False (τ >= 1) runs each
  exchange after its own step in an outer program, as with τ = 0 (a reference
  and a baseline; the same values). `dispatches` counts the programs run, by
  key ("inner",), ("fused", sync) or ("outer", event).

  Usage:
    algo = StreamingDiLoCo(config, inner_step, params)
    state = algo.init(inner_state)
    for step in range(num_steps):
      state, metrics = algo.train_step(state, batch_mb, step)  # batch [M, B/M, ...]
  """

  def __init__(self, config: DiLoCoConfig, inner_step: InnerStep, params,
               spmd_axis_name: str | None = None, exchange_fn: Callable = exchange,
               fuse_exchange: bool = True, fallback=None, shardings=None):
    self.config = config
    self.exchange_fn = exchange_fn
    self.inner_step = inner_step
    self.fragments = config.make_fragments(params)
    self.schedule = fr.SyncSchedule(len(self.fragments), config.sync_every,
                                    config.overlap)
    self.fused = fuse_exchange and config.overlap >= 1
    self.outer_tx = config.outer_optimizer()
    # fallback: per fragment, tensors on the fp32 reference path; shardings:
    # the params' when the exchange is sharded over "replica" (traffic.py)
    self.traffic = Traffic.build(params, self.fragments, config.quantization,
                                 config.quant_block, config.num_replicas,
                                 config.dp_dtype, fallback, shardings)
    self.spmd_axis_name = spmd_axis_name
    self.dispatches: collections.Counter = collections.Counter()
    self._inner: InnerProgram | None = None
    self._means: Callable | None = None
    self._outer: dict[fr.Event, Callable] = {}
    self._fused: dict[tuple[int, ...], Callable] = {}
    self._masks: dict[int, jax.Array] = {}  # step -> mask of its deferred exchanges

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

  def programs(self, step: int) -> tuple[tuple[int, ...], fr.Event]:
    """(pending, after) for the step taken when `step` inner steps are done:
    the fragments whose exchange runs in that step's program (fused with the
    inner step; () -> the plain inner program) and the event of the outer
    program run after it (empty -> none)."""
    event = self.event(step)
    if not self.fused:
      return (), event
    pending = self.event(step - 1).sync if step >= 1 else ()
    return pending, fr.Event(apply=event.apply)

  def inner_fn(self) -> Callable:
    """Pure (step, replicas, batch [M, ...][, aux]) -> (step, replicas, [M] metrics)."""
    return functools.partial(replica_steps, inner_step=self.inner_step,
                             spmd_axis_name=self.spmd_axis_name)

  def outer_fn(self, event: fr.Event) -> Callable:
    """Pure (state, participating [M]) -> state for `event`."""
    c = self.config
    return functools.partial(
        outer_update, fragments=self.fragments, event=event, outer_tx=self.outer_tx,
        alpha=c.alpha, quantization_format=c.quantization, quant_block=c.quant_block,
        exchange_fn=self.exchange_fn)

  def fused_fn(self, sync: tuple[int, ...]) -> Callable:
    """Pure (state, batch [M, ...], participating [M][, aux]) -> (state,
    metrics per replica): `overlapped_update` for the pending exchanges `sync`."""
    c = self.config
    return functools.partial(
        overlapped_update, inner_step=self.inner_step, fragments=self.fragments,
        sync=sync, quantization_format=c.quantization, quant_block=c.quant_block,
        spmd_axis_name=self.spmd_axis_name, exchange_fn=self.exchange_fn)

  def _jit_inner(self, fn):
    return _jit_inner_cached(self.inner_step, self.spmd_axis_name,
                             self.config.num_replicas == 1)

  def _jit_outer(self, fn):  # also the fused programs: the state is donated
    return jax.jit(fn, donate_argnums=(0,))

  _jit_fused = _jit_outer

  def _jit_means(self):
    return rm.jit_means()

  def compiled_means(self) -> Callable:
    self._means = self._means or self._jit_means()
    return self._means

  def compiled_inner(self) -> "InnerProgram":
    """rm.InnerProgram; with one replica the means are in the inner program."""
    if self._inner is None:
      one = self.config.num_replicas == 1
      fn = self.inner_fn()
      self._inner = InnerProgram(self._jit_inner(
          functools.partial(rm.inner_with_means, inner=fn) if one else fn),
                                 None if one else self.compiled_means())
    return self._inner

  def compiled_outer(self, event: fr.Event) -> Callable:
    if event not in self._outer:
      self._outer[event] = self._jit_outer(self.outer_fn(event))
    return self._outer[event]

  def compiled_fused(self, sync: tuple[int, ...]) -> Callable:
    if sync not in self._fused:
      self._fused[sync] = self._jit_fused(self.fused_fn(sync))
    return self._fused[sync]

  def participation(self, participating=None) -> jax.Array:
    m = self.config.num_replicas
    if participating is None:
      return jnp.ones((m,), jnp.float32)
    participating = jnp.asarray(participating, jnp.float32)
    if participating.shape != (m,):
      raise ValueError(f"participating must have shape ({m},), got "
                       f"{participating.shape}.")
    return participating

  def defer_participation(self, step: int, participating) -> None:
    """Sets the mask of the exchanges started after the step taken when `step`
    steps are done, run by the next step's program (fused scheme). train_step
    records it; a run resumed after that step in a new process calls this to
    restore a non-default mask (default: every replica)."""
    self._masks[step] = self.participation(participating)

  def train_step(self, state: DiLoCoState, batch, step: int | None = None,
                 participating=None, aux=None):
    """`step` = inner steps already taken (= state.step), which the host loop
    knows; None reads state.step from the device (a synchronisation). `aux`
    (e.g. a frozen teacher's params) goes to every replica's inner step.
    `participating` is the mask of this step's exchanges (event(step).sync),
    wherever they run."""
    if step is None:
      step = int(jax.device_get(state.step))
    pending, after = self.programs(step)
    extra = () if aux is None else (aux,)
    if pending:
      mask = self.participation(self._masks.get(step - 1))
      state, metrics = self.compiled_fused(pending)(state, batch, mask, *extra)
      metrics = self.compiled_means()(metrics)
      self.dispatches[("fused", pending)] += 1
    else:
      new_step, replicas, metrics = self.compiled_inner()(
          state.step, state.replicas, batch, *extra)
      state = state.replace(step=new_step, replicas=replicas)
      self.dispatches[("inner",)] += 1
    self._masks = {k: v for k, v in self._masks.items() if k >= step}  # used
    if self.fused and self.event(step).sync:
      self.defer_participation(step, participating)
    if after.sync or after.apply:
      state = self.compiled_outer(after)(state, self.participation(participating))
      self.dispatches[("outer", after)] += 1
    return state, metrics


@functools.lru_cache(maxsize=16)
def _jit_inner_cached(inner_step, spmd_axis_name, means: bool):
  """One jitted inner program per inner step (shared by StreamingDiLoCo
  instances with the same inner step, e.g. in tests); aux is not donated;
  `means`: replica_metric_means inside (one replica)."""
  fn = functools.partial(replica_steps, inner_step=inner_step,
                         spmd_axis_name=spmd_axis_name)
  return jax.jit(functools.partial(rm.inner_with_means, inner=fn) if means else fn,
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
