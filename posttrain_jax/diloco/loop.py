"""Streaming DiLoCo in the LM loop (`train.train(..., diloco=DiLoCoConfig(...))`).

`DiLoCoLoop` gives `train.train` the interface of `trainer.Trainer` that the
loop uses (abstract_state, init_state, shard_batch, eval_sums, train_step)
around a `diloco_trainer.DiLoCoTrainer`, plus what differs:

- the evaluated / counted parameters are the OUTER parameters θ̃
  (`eval_params`); checkpoints hold the whole DiLoCoState (replicas, θ̃, outer
  optimizer, in-flight pseudo-gradients), so a resume mid-window is exact
  (with τ >= 1 an exchange started after the checkpoint step runs in the
  resumed run's first program, recomputed from the checkpointed θ̃ and
  replicas: streaming_diloco, Deferred exchanges);
- the host step picks each step's schedule event (no device read);
- traffic: a `ByteCounter` (rebuilt with `counter_at` on resume) written to
  TensorBoard as traffic/* scalars and summarised in the final log line; an
  exchange counts at the step that starts it (diloco_traffic).

Replicas and the mesh: the M replicas sit on the mesh's "replica" axis. Either
mesh.shape["replica"] == M (one replica per device group, e.g.
dcn_parallelism={"replica": M}), or, in one process, M replicas share a mesh
with replica degree r dividing M (r = 1: every replica on all devices, a
simulation of M replicas on one host). The global batch is split into M
contiguous row blocks; each block is sharded over the other batch axes.

Other inner steps: `DiLoCoLoop(..., inner_step=..., aux_shardings=...)` wraps
any step on the LM TrainState; `distillation` builds the loop for the
distillation loop (`distill.distill(..., diloco=...)`): the student trains as M
replicas, the frozen teacher's params are the step's shared `aux`.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math

import jax

from posttrain_jax.core import partitioning
from posttrain_jax.core.trainer import optimizer_step
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco import trainer as diloco_trainer
from posttrain_jax.distillation.trainer import DistillationTrainer, distillation_objective
from posttrain_jax.models import params_checkpoint


def _gb(n: float) -> str:
  return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


class DiLoCoLoop:
  """Trainer-like wrapper of `DiLoCoTrainer` for `train.train`."""

  def __init__(self, model, tx, schedule, mesh, config: sd.DiLoCoConfig, *,
               batch_size: int | Sequence[int], num_microbatches: int = 1,
               z_loss: float = 0.0, inner_step: sd.InnerStep | None = None,
               aux_shardings=None):
    """batch_size: the global batch size, or those of every input the loop
    feeds; inner_step / aux_shardings: see diloco_trainer.DiLoCoTrainer (None:
    the LM step)."""
    m, r = config.num_replicas, mesh.shape[sd.REPLICA_AXIS]
    if r != m and (m % r or jax.process_count() > 1):
      raise ValueError(
          f"Streaming DiLoCo with num_replicas={m} needs the mesh's replica axis to "
          f"be {m} (e.g. dcn_parallelism={{'replica': {m}}}), or, in a single "
          f"process, a divisor of {m}; the mesh has replica={r} with "
          f"{jax.process_count()} process(es).")
    inner_batch = partitioning.batch_sharding(mesh, diloco_trainer.without_mesh_axis(
        partitioning.DEFAULT_RULES)).spec[0]
    axes = inner_batch if isinstance(inner_batch, tuple) else (inner_batch,)
    shards = math.prod(mesh.shape[a] for a in axes if a)
    for size in [batch_size] if isinstance(batch_size, int) else batch_size:
      if size % (m * shards):
        raise ValueError(
            f"Streaming DiLoCo: the global batch size {size} must split into "
            f"num_replicas={m} row blocks, each divisible by the {shards} batch "
            f"shards of the mesh {dict(mesh.shape)} (batch size a multiple of "
            f"{m * shards}).")
    self.config = config
    self.trainer = diloco_trainer.DiLoCoTrainer(
        model, tx, schedule, mesh, config, num_microbatches=num_microbatches,
        z_loss=z_loss, inner_step=inner_step, aux_shardings=aux_shardings)
    self.abstract_state = self.trainer.abstract_state
    self.counter = self.trainer.new_counter()
    self._step = 0

  # ----------------------------------------------------- the Trainer interface
  def init_state(self, rng):
    return self.trainer.init_state(rng)

  def shard_batch(self, local_batch):
    return self.trainer.shard_batch(local_batch)

  def eval_sums(self, params, batch):
    return self.trainer.eval_sums(params, batch)

  def train_step(self, state, batch, aux=None):
    """One DiLoCo step; the host step count (set by `start`) picks the event;
    `aux` (e.g. the teacher's params) is shared by every replica's step."""
    state, metrics = self.trainer.train_step(state, batch, self._step, aux=aux)
    self.counter.update(self.trainer.event(self._step))
    self._step += 1
    return state, metrics

  # ------------------------------------------------------------ the extras
  @staticmethod
  def eval_params(state):
    return sd.outer_params(state)

  def start(self, step: int) -> None:
    """Called once with the restored (or initial) step."""
    self._step = step
    self.counter = self.trainer.counter_at(step)

  def state_from_initial_checkpoint(self, model_config, directory: str):
    params = params_checkpoint.restore_params(
        directory, self.trainer.trainer.abstract_state.params, model_config)
    return self.trainer.state_from_params(params)

  def traffic(self) -> dict[str, float]:
    """Traffic so far: bytes per replica and in total, and the data-parallel
    equivalents over the same steps."""
    c = self.counter.as_dict()
    ratio = lambda a, b: a / b if b else float("inf")
    c["dp_ratio"] = ratio(c["dp_replica_bytes"], c["replica_bytes"])
    c["dp_peak_ratio"] = ratio(c["dp_peak_step_bytes"], c["peak_step_bytes"])
    c["dp_fp32_ratio"] = ratio(c["dp_fp32_replica_bytes"], c["replica_bytes"])
    return c

  def write_traffic(self, reporter, step: int) -> None:
    reporter.writer.write_scalars(
        step, {f"traffic/{k}": float(v) for k, v in self.traffic().items()})

  def summary(self) -> str:
    t = self.traffic()
    c = self.config
    return (f"DiLoCo M={c.num_replicas} H={c.sync_every} "
            f"fragments={len(self.trainer.fragments)} {c.quantization} | sent "
            f"{_gb(t['sent_bytes'])} ({_gb(t['replica_bytes'])} per replica, peak "
            f"{_gb(t['peak_step_bytes'])}/step) | data-parallel ({c.dp_dtype} ring "
            f"all-reduce) {_gb(t['dp_sent_bytes'])} (peak "
            f"{_gb(t['dp_peak_step_bytes'])}/step) | "
            + (f"{t['dp_ratio']:.0f}x fewer bytes per replica ({t['dp_fp32_ratio']:.0f}x "
               f"vs fp32), {t['dp_peak_ratio']:.1f}x lower peak"
               if t["replica_bytes"] else "no exchange yet"))


def distillation(trainer: DistillationTrainer, config: sd.DiLoCoConfig, *,
                 batch_size: int | Sequence[int], kind: str = "forward_kl",
                 temperature: float = 1.0, beta: float = 0.5,
                 chunk_size: int | None = None, num_microbatches: int = 1) -> DiLoCoLoop:
  """Streaming DiLoCo around `trainer`'s distillation step: M student replicas,
  inner step = optimizer_step with distillation_objective (same loss arguments
  as the trainer), the teacher's params the shared aux on
  trainer.teacher_shardings; `train_step(state, batch, teacher_params)`."""
  loss_fn = distillation_objective(trainer.model, trainer.teacher, kind=kind,
                                   temperature=temperature, beta=beta,
                                   chunk_size=chunk_size)
  step = functools.partial(optimizer_step, loss_fn=loss_fn, tx=trainer.tx,
                           schedule=trainer.schedule, num_microbatches=num_microbatches)
  return DiLoCoLoop(trainer.model, trainer.tx, trainer.schedule, trainer.mesh, config,
                    batch_size=batch_size, num_microbatches=num_microbatches,
                    inner_step=step, aux_shardings=trainer.teacher_shardings)
