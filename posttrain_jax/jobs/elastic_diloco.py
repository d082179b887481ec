"""Elastic Streaming DiLoCo of the LM: one slice per job, plus the quorum service.

Two jobs of the binary (`posttrain_jax.main`, gin `job.name`):

  elastic_diloco       one slice: the LM inner step `train()` uses
                       (`core.trainer.train_step`), the input pipeline of
                       `train_data` (DatasetConfig), the Streaming DiLoCo
                       settings of `diloco` (DiLoCoConfig), synced with the
                       other live slices by `diloco.elastic.slice.ElasticSlice`
                       (quorums from torchft's Lighthouse at `lighthouse`,
                       packed FP4 codes over gRPC, healing of a restarted slice).
  elastic_lighthouse   the quorum service (torchft's Lighthouse) with the gin
                       `LighthouseConfig` (min_replicas, join and heartbeat
                       timeouts), serving until it is stopped.

Data. `train_data.batch_size` is the GLOBAL batch of all `num_slices` slices
(the same gin as the SPMD run, gin/experiments/streaming_diloco): every slice
reads the global batches of inner step t and trains on its contiguous row
block s (rows [s B/M, (s+1) B/M)), which is exactly replica s's block in the
SPMD `DiLoCoLoop`. So with no failure the M slices compute the SPMD run (tested
to float tolerance), and a slice's batch depends on (slice, step) only: a
healed or resumed slice seeks the pipeline to its step (`start_batch`).
Reading the whole global batch costs M times the host input work of one
block; it buys that exactness (a per-slice shard of the pipeline would change
which rows each replica sees).

Outputs. As the LM job (`train`), once the slice has joined: a progress line
every `log_every` steps (loss, accuracy, lr, grad norm, tokens/s, steps/s
and the ETA of this slice, from its first step: compiling and the start
barrier are not counted, nor the steps a heal skips) and an eval line every
`eval_every` steps on stdout; TensorBoard scalars of the same metrics (plus
elastic/members and elastic/sync_wait_s per sync, elastic/heal_wait_s per
heal, eval/* per eval) and the config text in RUN_DIR/slice_{S}/
(`core.progress`); RUN_DIR/config.gin, the operative configuration of slice
0 (the slices differ only in slice_index; `core.operative_config`). And: RUN_DIR/slice{S}.jsonl (a line per inner step
with the loss and a digest of θ̃, per sync/heal/start record with the members
and wait, an eval line, a final line with the bytes moved, exchange and heal
apart), RUN_DIR/slice{S}_outer.npz (final θ̃), and with `checkpoint_every` the
elastic orbax checkpoints under RUN_DIR/elastic_ckpt (the round leader writes
θ̃; each slice its inner state). The Lighthouse job with `log_dir` writes
torchft's log to LOG_DIR/lighthouse.log (launch/local.py gives it RUN_DIR).

SIGTERM (the launcher's stop, a preemption): the slice stops after its next
sync, saves the elastic checkpoint of that step (with `checkpoint_every`),
writes a "preempted" line and returns {"preempted": True, ...} (exit 0).

One process per slice: a slice of several processes (each host exchanging
its shard with the same-rank hosts of the other slices) is not built; the job
raises a ValueError when jax.process_count() > 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time

import jax
import numpy as np

from posttrain_jax.core import operative_config as operative_config_lib
from posttrain_jax.core import partitioning
from posttrain_jax.core.preemption import PreemptionWatcher
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.progress import ProgressReporter
from posttrain_jax.core.quiet_stderr import quiet_stderr
from posttrain_jax.core.trainer import Trainer, TrainState, _MeshRules, train_step
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.diloco.elastic import checkpoint as ec
from posttrain_jax.diloco.elastic import membership as mb
from posttrain_jax.diloco.elastic.run_slice import digest, flat_arrays
from posttrain_jax.diloco.elastic import slice as es
from posttrain_jax.diloco.elastic import wire
from posttrain_jax.diloco.streaming_diloco import DiLoCoConfig
from posttrain_jax.diloco.trainer import without_mesh_axis
from posttrain_jax.models import ModelConfig, Transformer

LIGHTHOUSE_LOG = "lighthouse.log"  # in the Lighthouse job's log_dir
NOT_REPORTED = ("loss_per_replica",)  # one replica per slice: its loss is "loss"


class SliceBatches:
  """batch_fn(step) of `ElasticSlice`: slice s's row block of the global batch
  of inner step `step`, from the train pipeline (sought when the step jumps,
  e.g. after a heal or a resume). Not autotuned: the same batches, and the
  slice's exit does not wait (up to a minute) for tf.data's tuning thread."""

  def __init__(self, cfg: DatasetConfig, slice_index: int, num_slices: int):
    if cfg.batch_size % num_slices:
      raise ValueError(f"elastic_diloco: train_data.batch_size {cfg.batch_size} (the "
                       f"global batch of all slices) must be divisible by num_slices="
                       f"{num_slices}.")
    self.cfg, self.block = cfg, cfg.batch_size // num_slices
    self.lo = slice_index * self.block
    self._it, self._next = None, None

  def __call__(self, step: int) -> dict:
    if self._it is None or step != self._next:
      from posttrain_jax.data.pipeline import LMBatchIterator  # TF lives in data/
      c = self.cfg
      self._it = LMBatchIterator(task_name=c.task_name, split=c.split,
                                 sequence_length=c.sequence_length, batch_size=c.batch_size,
                                 shuffle=c.shuffle, seed=c.seed, pack=c.pack,
                                 num_epochs=c.num_epochs, start_batch=step,
                                 inputs_length=c.inputs_length, autotune=False)
    batch = next(self._it)
    self._next = step + 1
    return {k: np.asarray(v)[self.lo:self.lo + self.block] for k, v in batch.items()}


def elastic_diloco(*, model_config: ModelConfig, run_dir: str, train_data: DatasetConfig,
                   num_steps: int, diloco: DiLoCoConfig, slice_index: int,
                   num_slices: int, lighthouse: str,
                   optimizer: OptimizerConfig = OptimizerConfig(),
                   eval_data: DatasetConfig | None = None, eval_every: int = 0,
                   eval_batches: int | None = 8, seed: int = 0,
                   weight_by_tokens: bool = False, wait_for: int | None = None,
                   exchange_timeout: float = 30.0, quorum_timeout: float = 300.0,
                   heal_timeout: float = 120.0, heartbeat_every: float = 0.2,
                   peer_host: str = "127.0.0.1", checkpoint_every: int = 0,
                   z_loss: float = 0.0, log_every: int = 10,
                   operative_config: str | None = None) -> dict:
  """Trains slice `slice_index` of `num_slices` (see the module docstring).

  diloco: the Streaming DiLoCo settings (its num_replicas must equal
  num_slices: the SPMD run of the same gin has M = num_slices replicas);
  lighthouse: the quorum service's address (http://host:port); weight_by_tokens:
  the mean of the pseudo-gradients weights each slice by its tokens since its
  last sync (else 1); wait_for: slices a fresh start waits for (None: all);
  exchange / quorum / heal timeouts and heartbeat_every in seconds; peer_host:
  the interface this slice's gRPC peer server binds (its address goes to the
  others through the Lighthouse; "0.0.0.0" across machines); checkpoint_every:
  elastic orbax checkpoints every this many steps (0: none); log_every: a
  progress line and TensorBoard scalars every this many steps; operative_config:
  the gin text (RUN_DIR/config.gin from slice 0, TensorBoard "config").
  Returns {"final_step", "outer_digest", "bytes", "compiles_after_join"} and,
  stopped by SIGTERM, "preempted": True.
  """
  if jax.process_count() > 1:
    raise ValueError("elastic_diloco runs one process per slice; slices of several "
                     "processes are not built yet. Run each slice as one process.")
  if diloco.num_replicas != num_slices:
    raise ValueError(f"elastic_diloco: DiLoCoConfig.num_replicas={diloco.num_replicas} "
                     f"must equal num_slices={num_slices} (one replica per slice).")
  if not lighthouse:
    raise ValueError("elastic_diloco: set elastic_diloco.lighthouse to the quorum "
                     "service's address, e.g. 'http://127.0.0.1:29510'.")
  os.makedirs(run_dir, exist_ok=True)
  batches = SliceBatches(train_data, slice_index, num_slices)
  mesh = partitioning.create_mesh({"data": -1}, {})
  rules = without_mesh_axis(partitioning.DEFAULT_RULES)
  schedule, tx = optimizer.build(num_steps)
  model = Transformer(model_config)
  trainer = Trainer(model, tx, schedule, mesh)
  params = jax.device_get(trainer.init_state(jax.random.key(seed)).params)
  inner = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                            z_loss=z_loss)
  init_inner = lambda p, step: TrainState(jax.numpy.asarray(step, jax.numpy.int32),
                                          jax.tree.map(jax.numpy.asarray, p),
                                          tx.init(jax.tree.map(jax.numpy.asarray, p)))
  out = open(os.path.join(run_dir, f"slice{slice_index}.jsonl"), "a", buffering=1)

  def emit(**rec):
    rec.update(slice=slice_index, time=time.time(), pid=os.getpid())
    out.write(json.dumps(rec) + "\n")

  log = lambda s: print(f"[slice {slice_index}] {s}", flush=True)
  peer = wire.PeerServer(host=peer_host)
  members = mb.Membership(lighthouse, f"slice{slice_index:03d}",
                          heartbeat_every=heartbeat_every, connect_timeout=quorum_timeout,
                          log=log)
  watcher = PreemptionWatcher()
  checkpoints = (ec.ElasticCheckpoints(os.path.join(run_dir, "elastic_ckpt"), slice_index,
                                       checkpoint_every) if checkpoint_every else None)
  elastic = es.ElasticConfig(slice_index, num_slices, weight_by_tokens, wait_for,
                             exchange_timeout, quorum_timeout, heal_timeout)
  eval_set = None
  if eval_data is not None and eval_every:
    from posttrain_jax.jobs.train import _eval_batches, evaluate  # pylint: disable=g-import-not-at-top
    eval_set = _eval_batches(eval_data, eval_batches)
  seen, reporter = [0], []
  n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  tb_dir = os.path.join(run_dir, f"slice_{slice_index}")

  def on_join(step, warm_s):  # the start succeeded: resumed, compiled
    emit(event="joining", step=step, warm_s=warm_s)
    if slice_index == 0:
      operative_config_lib.record(run_dir, operative_config)
    reporter.append(ProgressReporter(tb_dir, total_steps=num_steps, start_step=step,
                                     log_every=log_every))
    if operative_config:
      reporter[0].write_text(step, "config", operative_config)
    log(f"joining at step {step} of {num_steps} ({num_slices} slices) | "
        f"{n_params:,} params | TensorBoard {tb_dir}")

  def on_step(step, metrics, state):
    if metrics:  # rates and the ETA from this slice's first step (core/progress)
      reporter[0].update(step, {k: v for k, v in metrics.items() if k not in NOT_REPORTED})
    else:  # healed to `step`: the steps it jumped were not trained here
      reporter[0].restart()
    for r in algo.records[seen[0]:]:
      emit(event=r.kind, step=r.step, members=list(r.members), wait_s=r.wait_s,
           quorum_ids=list(r.quorum_ids), dropped=list(r.dropped))
      if r.kind == "sync":
        reporter[0].writer.write_scalars(r.step, {"elastic/members": len(r.members),
                                                  "elastic/sync_wait_s": r.wait_s})
      elif r.kind == "heal":
        reporter[0].writer.write_scalars(r.step, {"elastic/heal_wait_s": r.wait_s})
    seen[0] = len(algo.records)
    if "loss" in metrics:
      emit(event="step", step=step, loss=float(np.mean(metrics["loss"])),
           tokens=float(np.sum(metrics["tokens"])), outer=digest(state.outer_params))
    if eval_set and step % eval_every == 0:
      result = evaluate(trainer, state.outer_params, eval_set)
      emit(event="eval", step=step, **result)
      reporter[0].write_eval(step, result)

  try:
    with _MeshRules(mesh, rules):
      algo = es.ElasticSlice(diloco, inner, params, init_inner, members, peer, elastic,
                             log=log, checkpoints=checkpoints,
                             should_stop=lambda: watcher.should_stop(0),
                             on_join=on_join)
      state = algo.init(init_inner(params, 0))
      emit(event="started")
      state = algo.run(state, batches, num_steps, on_step)
    if algo.stopped_at is not None:
      emit(event="preempted", step=algo.stopped_at, checkpointed=checkpoints is not None)
      log(f"preempted (SIGTERM): stopped after the sync of step {algo.stopped_at}"
          + ("; elastic checkpoint saved" if checkpoints is not None else ""))
      return {"final_step": algo.stopped_at, "preempted": True,
              "outer_digest": digest(state.outer_params), "bytes": peer.bytes.as_dict(),
              "compiles_after_join": algo.compiles_after_join}
    np.savez(os.path.join(run_dir, f"slice{slice_index}_outer.npz"),
             **flat_arrays(state.outer_params))
    result = {"final_step": int(state.step), "outer_digest": digest(state.outer_params),
              "bytes": peer.bytes.as_dict(), "compiles_after_join": algo.compiles_after_join}
    emit(event="done", step=result["final_step"], outer=result["outer_digest"],
         bytes=result["bytes"], compiles_after_join=result["compiles_after_join"])
    log(f"done at step {result['final_step']}: bytes {result['bytes']}")
    return result
  finally:
    watcher.close()
    if reporter:
      reporter[0].close()
    if checkpoints is not None:
      checkpoints.close()
    members.close()
    peer.close()
    out.close()


def elastic_lighthouse(*, quorum: mb.LighthouseConfig = mb.LighthouseConfig(),
                       bind: str = "[::]:29510", run_for: float | None = None,
                       log_dir: str | None = None,
                       operative_config: str | None = None) -> str:
  """Serves torchft's Lighthouse with `quorum`'s settings on `bind` until
  SIGTERM/SIGINT (or `run_for` seconds); returns its address. log_dir:
  torchft's log (its Rust INFO lines on stderr, about six per quorum: each
  request, each change of status, the quorum) goes to LOG_DIR/lighthouse.log,
  appended (None: stderr, e.g. a cloud job's log); the one line on stdout
  says where."""
  del operative_config
  log_file = None
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
    log_file = os.path.join(log_dir, LIGHTHOUSE_LOG)
  with quiet_stderr(log_file) if log_file else contextlib.nullcontext():
    server = mb.start_lighthouse(quorum, bind)
    address = server.address()
    print(f"[lighthouse] serving on {address} ({quorum})"
          + (f"; torchft's log: {log_file}" if log_file else ""), flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, lambda *_: done.set())
    try:
      done.wait(run_for)
    finally:
      server.shutdown()
  return address
