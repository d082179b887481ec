"""Streaming DiLoCo for the LM train step, partitioned over the device mesh.

`DiLoCoTrainer` is the sharded counterpart of `trainer.Trainer`: the M replica
train states carry a leading axis sharded over the "replica" mesh axis (the
DCN axis across slices), the outer parameters, outer optimizer state and
in-flight pseudo-gradients are sharded like the parameters. With that axis
> 1, the exchange all-gathers the quantized codes over it
(`diloco_exchange.sharded_exchange`). The algorithm
itself (fragments, exchange, outer Nesterov step, merge) lives in
`streaming_diloco`.

Programs (`streaming_diloco`, Programs), jitted here with the state's
shardings, the replica state, θ̃ and in-flight Δ donated. Step t (the t-th
inner step, host step count t - 1 in `train_step`) runs:
  - τ >= 1, S = event(t - 1).sync not empty: fused(S), one program holding
    S's exchanges (u8 FP4 codes all-gathered over "replica" under shard_map)
    and the vmapped inner step t, independent of each other, so the DCN
    all-gather can overlap the inner step's compute;
  - otherwise: the inner program (vmapped inner step only);
  then, if the step's outer event is not empty, the outer program: with τ >= 1
  event(t).apply's outer updates + merges only, with τ = 0 event(t)'s
  exchanges, then its applies. `lower_step(step)` lowers the program that
  runs a step's inner step (e.g. to read its HLO).
The inner and fused programs return metrics per replica, sharded over
"replica" (no DCN all-reduce in the step); their replica means are a separate
small program (`streaming_diloco.replica_metric_means`).
"""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from posttrain_jax.core import partitioning
from posttrain_jax.core.trainer import Trainer, TrainState, _MeshRules, train_step
from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco.exchange import fallback_names, sharded_exchange
from posttrain_jax.diloco.streaming_diloco import (REPLICA_AXIS, ByteCounter, DiLoCoConfig,
                                            DiLoCoState, InnerStep, StreamingDiLoCo,
                                            exchange, replica_metric_means,
                                            split_replicas)


def without_mesh_axis(rules, axis: str = REPLICA_AXIS):
  """Logical-axis rules with `axis` removed (used inside the replica vmap,
  where the vmapped dimension already occupies it)."""
  out = []
  for name, mesh_axes in rules:
    if isinstance(mesh_axes, (tuple, list)):
      kept = tuple(a for a in mesh_axes if a != axis)
      mesh_axes = kept if len(kept) > 1 else (kept[0] if kept else None)
    elif mesh_axes == axis:
      mesh_axes = None
    out.append((name, mesh_axes))
  return tuple(out)


class DiLoCoTrainer:
  """Streaming DiLoCo for the LM `trainer.train_step`, partitioned like
  `Trainer`: replica states are sharded P("replica", *param_spec), θ̃ and the
  outer/in-flight state like the params (replicated over "replica").

  The loop feeds the same global [B, T] batches as for `Trainer`
  (`shard_batch`); the step splits them into M contiguous row blocks, one per
  replica. `train_step(state, batch, step)` takes the host's step count to pick
  the step's programs; `event(step)` and a `ByteCounter` (`new_counter`) give
  the traffic. Evaluate `state.outer_params` with `eval_sums`.

  Other trainers: `inner_step` replaces the LM step, e.g.
  `functools.partial(trainer.optimizer_step, loss_fn=..., tx=tx, ...)` on the
  same TrainState; with `aux_shardings`, it is called as
  inner_step(state, batch, aux) with the `aux` given to `train_step` (e.g. a
  frozen teacher's params), placed by aux_shardings on every replica group
  (not vmapped, not donated). `model` is the trained model (eval_sums).
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, mesh: jax.sharding.Mesh,
               config: DiLoCoConfig, rules=partitioning.DEFAULT_RULES,
               num_microbatches: int = 1, z_loss: float = 0.0,
               inner_step: InnerStep | None = None, aux_shardings=None,
               fuse_exchange: bool = True):
    self.mesh, self.rules, self.config = mesh, rules, config
    self.aux_shardings = aux_shardings
    self.inner_rules = without_mesh_axis(rules)
    self.trainer = Trainer(model, tx, schedule, mesh, rules,
                           num_microbatches=num_microbatches, z_loss=z_loss)
    inner_step = inner_step or functools.partial(
        train_step, model=model, tx=tx, schedule=schedule,
        num_microbatches=num_microbatches, z_loss=z_loss)
    r = mesh.shape[REPLICA_AXIS]
    param_sh = self.trainer.param_shardings
    # replica axis sharded: all-gather the packed codes over it (diloco_exchange)
    exchange_fn = (functools.partial(sharded_exchange, param_shardings=param_sh)
                   if r > 1 else exchange)
    abstract_params = self.trainer.abstract_state.params
    # tensors the sharded exchange sends as fp32 (on this mesh's non-replica
    # sharding, whatever r): counted so by Traffic, reported at start-up
    fallback = [fallback_names(f, param_sh, abstract_params, config.quantization,
                               config.quant_block)
                for f in config.make_fragments(abstract_params)]
    self.algo = StreamingDiLoCo(config, inner_step, abstract_params,
                                spmd_axis_name=REPLICA_AXIS, exchange_fn=exchange_fn,
                                fuse_exchange=fuse_exchange, fallback=fallback,
                                shardings=param_sh if r > 1 else None)
    if any(fallback) and config.block_fallback == "error":
      raise ValueError(self.algo.traffic.fallback_line() + " (block_fallback='error')")
    (logging.warning if any(fallback) else logging.info)(
        self.algo.traffic.fallback_line())
    self.algo._jit_inner = self._jit_inner  # pylint: disable=protected-access
    self.algo._jit_outer = self._jit_outer  # pylint: disable=protected-access
    self.algo._jit_fused = self._jit_fused  # pylint: disable=protected-access
    self.algo._jit_means = self._jit_means  # pylint: disable=protected-access
    self.fragments, self.schedule = self.algo.fragments, self.algo.schedule
    self.traffic = self.algo.traffic

    if config.num_replicas % r:
      raise ValueError(f"num_replicas {config.num_replicas} is not divisible by the "
                       f"mesh's replica axis ({r}).")
    replicated = partitioning.replicated(mesh)
    stack = lambda s: NamedSharding(mesh, PartitionSpec(
        REPLICA_AXIS if r > 1 else None, *s.spec))

    def frag_sharding(s, rows):
      return s if rows is None else NamedSharding(mesh, PartitionSpec(None, *s.spec[1:]))

    frag_sh = [fr.take_like(param_sh, f, frag_sharding) for f in self.fragments]
    abstract = jax.eval_shape(self.algo.init_fn, self.trainer.abstract_state)
    opt_sh = tuple(optax.tree_map_params(self.algo.outer_tx, lambda _, s: s, o, sh,
                                         transform_non_params=lambda _: replicated)
                   for o, sh in zip(abstract.outer_opt_state, frag_sh))
    self.state_shardings = DiLoCoState(
        replicated, jax.tree.map(stack, self.trainer.state_shardings), param_sh,
        opt_sh, tuple({"delta": sh, "count": replicated} for sh in frag_sh))
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, self.state_shardings)
    self.batch_sharding = self.trainer.batch_sharding
    inner_batch = partitioning.batch_sharding(mesh, self.inner_rules).spec
    self._replica_batch_spec = PartitionSpec(REPLICA_AXIS if r > 1 else None,
                                             *inner_batch)
    self._init = jax.jit(lambda rng: self.algo.init_fn(self.trainer._init_state(rng)),  # pylint: disable=protected-access
                         out_shardings=self.state_shardings)
    self._from_params = jax.jit(self._state_from_params,
                                in_shardings=(param_sh,),
                                out_shardings=self.state_shardings)

  def _state_from_params(self, params):
    inner = TrainState(jnp.zeros((), jnp.int32), params, self.trainer.tx.init(params))
    return self.algo.init_fn(inner)

  def _split(self, batch):
    """Global [B, ...] -> [M, B/M, ...], the replica axis on "replica"."""
    spec = self._replica_batch_spec
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, PartitionSpec(*spec[:x.ndim]))),
                        split_replicas(batch, self.config.num_replicas))

  def _aux_in(self) -> tuple:
    return () if self.aux_shardings is None else (self.aux_shardings,)

  def _metric_sharding(self):
    """Per-replica metrics [M] stay on their replica (no DCN all-reduce in the
    step); streaming_diloco.replica_metric_means averages them after it
    (inside the inner program with one replica: scalars)."""
    if self.config.num_replicas == 1:
      return partitioning.replicated(self.mesh)
    return NamedSharding(self.mesh, PartitionSpec(REPLICA_AXIS))

  def _jit_inner(self, inner_fn):
    def fn(step, replicas, batch, *aux):
      return inner_fn(step, replicas, self._split(batch), *aux)
    replicated = partitioning.replicated(self.mesh)
    replica_sh = self.state_shardings.replicas
    in_shardings = (replicated, replica_sh, self.batch_sharding) + self._aux_in()
    return jax.jit(fn, in_shardings=in_shardings,
                   out_shardings=(replicated, replica_sh, self._metric_sharding()),
                   donate_argnums=(0, 1))

  def _jit_fused(self, fused_fn):
    def fn(state, batch, participating, *aux):
      return fused_fn(state, self._split(batch), participating, *aux)
    replicated = partitioning.replicated(self.mesh)
    in_shardings = (self.state_shardings, self.batch_sharding,
                    replicated) + self._aux_in()
    return jax.jit(fn, in_shardings=in_shardings,
                   out_shardings=(self.state_shardings, self._metric_sharding()),
                   donate_argnums=(0,))

  def _jit_means(self):
    """replica_metric_means, replicated (as the step's metrics were)."""
    return jax.jit(replica_metric_means, in_shardings=(self._metric_sharding(),),
                   out_shardings=partitioning.replicated(self.mesh))

  def _jit_outer(self, outer_fn):
    replicated = partitioning.replicated(self.mesh)
    return jax.jit(outer_fn, in_shardings=(self.state_shardings, replicated),
                   out_shardings=self.state_shardings, donate_argnums=(0,))

  def init_state(self, rng: jax.Array) -> DiLoCoState:
    with _MeshRules(self.mesh, self.rules):
      return self._init(rng)

  def state_from_params(self, params) -> DiLoCoState:
    """Step 0 from given params (e.g. an initial checkpoint), fresh optimizers."""
    with _MeshRules(self.mesh, self.rules):
      return self._from_params(params)

  def event(self, step: int) -> fr.Event:
    return self.algo.event(step)

  def new_counter(self) -> ByteCounter:
    return self.algo.new_counter()

  def counter_at(self, step: int) -> ByteCounter:
    return self.algo.counter_at(step)

  def train_step(self, state: DiLoCoState, batch, step: int | None = None,
                 participating=None, aux=None):
    """One step on a global [B, ...] batch (as `Trainer.train_step`); `step` =
    state.step as known on the host (None reads it from the device); `aux`
    is required exactly when the trainer was built with aux_shardings."""
    if (aux is None) != (self.aux_shardings is None):
      raise ValueError(
          "DiLoCoTrainer.train_step: pass `aux` (e.g. the teacher's params) if and "
          "only if the trainer was built with aux_shardings; got aux "
          f"{'None' if aux is None else 'given'} and aux_shardings "
          f"{'None' if self.aux_shardings is None else 'given'}.")
    with _MeshRules(self.mesh, self.inner_rules):
      return self.algo.train_step(state, batch, step, participating, aux)

  def lower_step(self, step: int, batch_size: int, seq_len: int, aux=None):
    """jax.stages.Lowered of the program running the inner step taken when
    `step` steps are done (fused with its pending exchanges, or the inner
    program), for an LM batch of [batch_size, seq_len] int32 tokens."""
    pending, _ = self.algo.programs(step)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32,
                                  sharding=self.batch_sharding)
    batch = dict(decoder_input_tokens=tokens, decoder_target_tokens=tokens,
                 decoder_loss_weights=jax.ShapeDtypeStruct(
                     (batch_size, seq_len), jnp.float32, sharding=self.batch_sharding))
    extra = () if aux is None else (aux,)
    m = self.config.num_replicas
    with _MeshRules(self.mesh, self.inner_rules):
      if pending:
        return self.algo.compiled_fused(pending).lower(
            self.abstract_state, batch, jax.ShapeDtypeStruct((m,), jnp.float32),
            *extra)
      return self.algo.compiled_inner().lower(
          self.abstract_state.step, self.abstract_state.replicas, batch, *extra)

  def eval_sums(self, params, batch):
    return self.trainer.eval_sums(params, batch)

  def shard_batch(self, local_batch):
    return self.trainer.shard_batch(local_batch)
