"""The LM training loop: data -> partitioned step -> metrics -> checkpoints.

`train` takes plain arguments (the binary `posttrain_jax.main` wires them from
gin). It resumes from the newest checkpoint in `run_dir/checkpoints`, including
the input pipeline's position, so a preempted run continues exactly where it
stopped. A fresh run may start from `initial_checkpoint` (a model directory,
e.g. written by tools/convert_hf.py import, or another run): its parameters,
a fresh optimizer state and step 0. The run's own checkpoint always wins over
the initial checkpoint, and the log line says which one was used. With
`diloco`, the run is Streaming DiLoCo (`diloco_loop`): M replicas, outer
parameters evaluated, traffic written as traffic/* scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.core import operative_config as operative_config_lib
from posttrain_jax.core import partitioning
from posttrain_jax.core.checkpointing import Checkpointer
from posttrain_jax.core.nonfinite_guard import NonFiniteGuard
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.profiling import StepProfiler
from posttrain_jax.core.progress import ProgressReporter
from posttrain_jax.core.step_loop import StepLoop
from posttrain_jax.core.trainer import Trainer, TrainState
from posttrain_jax.data.condition_dropout import drop_conditions
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.diloco import loop as diloco_loop
from posttrain_jax.diloco.streaming_diloco import DiLoCoConfig
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import lora_training
from posttrain_jax.models import params_checkpoint
from posttrain_jax.models.lora import LoraConfig


@dataclasses.dataclass
class TrainResult:
  final_step: int
  losses: dict[int, float]       # per-step training loss of this invocation
  eval_metrics: dict[int, dict[str, float]]
  resumed_from: int | None
  initialised_from: str | None = None  # the initial_checkpoint actually used
  preempted: bool = False              # stopped by SIGTERM after saving
  skipped_steps: int = 0               # steps with a non-finite loss/gradient
  traffic: dict[str, float] | None = None  # DiLoCo bytes (DiLoCoLoop.traffic)


def check_token_ids(batch: Mapping[str, np.ndarray], vocab_size: int,
                    keys=("decoder_input_tokens", "decoder_target_tokens")) -> None:
  """Rejects token ids outside [0, vocab_size) before they reach the device."""
  for key in keys:
    tokens = batch[key]
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= vocab_size or lo < 0:
      bad = hi if hi >= vocab_size else lo
      raise ValueError(
          f"Input batch '{key}' contains token id {bad}, outside [0, "
          f"vocab_size={vocab_size}). The data's vocabulary is larger than "
          "ModelConfig.vocab_size: set ModelConfig.vocab_size to at least "
          f"{hi + 1} or use the model's vocabulary.")


def _process_shard(cfg: DatasetConfig) -> tuple[int, int, int]:
  count = jax.process_count()
  if cfg.batch_size % count:
    raise ValueError(f"Global batch_size {cfg.batch_size} of task "
                     f"'{cfg.task_name}' is not divisible by {count} processes.")
  return cfg.batch_size // count, jax.process_index(), count


def _sft_task(cfg: DatasetConfig) -> bool:
  """Whether cfg reads an SFT (chat) task: role loss weights, no inputs_length."""
  from posttrain_jax.data import sft_pipeline  # TF lives in data/
  if not sft_pipeline.is_sft_task(cfg.task_name):
    return False
  if cfg.inputs_length is not None:
    raise ValueError(f"inputs_length={cfg.inputs_length} is for prefix-LM tasks; SFT task "
                     f"{cfg.task_name!r} weights the model's turns itself. Fix: drop "
                     "DatasetConfig.inputs_length.")
  return True


def _train_iterator(cfg: DatasetConfig):
  from posttrain_jax.data.pipeline import LMBatchIterator  # TF lives in data/
  from posttrain_jax.data.sft_pipeline import SFTBatchIterator
  batch, index, count = _process_shard(cfg)
  if _sft_task(cfg):
    return SFTBatchIterator(task_name=cfg.task_name, split=cfg.split,
                            sequence_length=cfg.sequence_length, batch_size=batch,
                            shuffle=cfg.shuffle, seed=cfg.seed, pack=cfg.pack,
                            num_epochs=cfg.num_epochs, shard_index=index, num_shards=count)
  return LMBatchIterator(task_name=cfg.task_name, split=cfg.split,
                         sequence_length=cfg.sequence_length, batch_size=batch,
                         shuffle=cfg.shuffle, seed=cfg.seed, pack=cfg.pack,
                         num_epochs=cfg.num_epochs, shard_index=index,
                         num_shards=count, inputs_length=cfg.inputs_length)


def _eval_batches(cfg: DatasetConfig, max_batches: int | None):
  from posttrain_jax.data.pipeline import eval_batches
  from posttrain_jax.data.sft_pipeline import sft_eval_batches
  batch, index, count = _process_shard(cfg)
  if _sft_task(cfg):
    return sft_eval_batches(task_name=cfg.task_name, split=cfg.split,
                            sequence_length=cfg.sequence_length, batch_size=batch,
                            max_batches=max_batches, pack=cfg.pack, shard_index=index,
                            num_shards=count)
  return list(eval_batches(task_name=cfg.task_name, split=cfg.split,
                           sequence_length=cfg.sequence_length, batch_size=batch,
                           max_batches=max_batches, pack=cfg.pack,
                           shard_index=index, num_shards=count,
                           inputs_length=cfg.inputs_length))


def evaluate(trainer: Trainer, params, batches) -> dict[str, float]:
  """Token-weighted loss, perplexity and accuracy over a list of batches."""
  totals = None
  for local in batches:
    sums = trainer.eval_sums(params, trainer.shard_batch(local))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  weight = max(float(totals["weight"]), 1.0)
  loss = float(totals["cross_entropy"]) / weight
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))),
          "accuracy": float(totals["correct"]) / weight}


def train(*, model_config: ModelConfig, run_dir: str, train_data: DatasetConfig,
          num_steps: int, optimizer: OptimizerConfig = OptimizerConfig(),
          eval_data: DatasetConfig | None = None, eval_every: int = 0,
          eval_batches: int | None = 20,
          ici_parallelism: Mapping[str, int] | None = None,
          dcn_parallelism: Mapping[str, int] | None = None,
          num_microbatches: int = 1, z_loss: float = 0.0, seed: int = 0,
          checkpoint_every: int = 1000, keep_checkpoints: int | None = 3,
          async_checkpointing: bool = True, log_every: int = 10,
          operative_config: str | None = None,
          initial_checkpoint: str | None = None,
          nonfinite_policy: str = "skip", max_consecutive_nonfinite: int = 10,
          profile_steps: tuple[int, int] | None = None,
          diloco: DiLoCoConfig | None = None,
          loss_chunk_size: int | None = None,
          condition_dropout: float = 0.0,
          lora: LoraConfig | None = None) -> TrainResult:
  """Trains a decoder LM for `num_steps` optimizer steps.

  Args:
    model_config: architecture.
    run_dir: holds `checkpoints/`, TensorBoard events and `config.gin`.
    train_data / eval_data: input pipelines (global batch sizes).
    num_steps: total steps of the run (a resumed run counts from its checkpoint).
    optimizer: AdamW and schedule hyperparameters.
    eval_every: evaluate every this many steps and at the end (0: only at the end
      if eval_data is given); eval_batches caps the eval set.
    ici_parallelism / dcn_parallelism: mesh degrees, see partitioning.create_mesh.
    num_microbatches: gradient accumulation factor.
    z_loss: coefficient of the log-partition penalty.
    checkpoint_every / keep_checkpoints / async_checkpointing: orbax settings;
      the final step is always saved.
    operative_config: text of the gin config, written to TensorBoard and, once
      the start has succeeded, kept as run_dir/config.gin (first start) or
      config.<time>.gin (a later start that differs; core/operative_config).
    initial_checkpoint: parameters to start a fresh run from: a model directory
      (DIR/checkpoint + DIR/model.gin, see params_checkpoint) or a run directory
      (its newest step's params). Restored onto the trainer's shardings (either
      scanned/unscanned layout), with a fresh optimizer state at step 0. Ignored,
      with a log line saying so, once run_dir has a checkpoint of its own.
    nonfinite_policy / max_consecutive_nonfinite: a step with a NaN/inf loss or
      gradient is never applied; "skip" goes on (halting after that many in a
      row), "halt" stops at once (NonFiniteError).
    profile_steps: (start, stop) captures a jax.profiler trace of those steps
      into run_dir/profile.
    diloco: train with Streaming DiLoCo (replicas on the mesh's "replica"
      axis, see diloco_loop); evaluation and exports use the outer parameters.
    loss_chunk_size: form the logits this many positions at a time in the loss
      (losses.chunked_cross_entropy_sums: same loss and gradients, no
      [batch, length, vocab] float32 logits); None computes them at once.
    condition_dropout: drop each prefix-LM row's prompt with this probability
      (data.condition_dropout; unpacked rows), so the model also learns the
      unconditional branch of classifier-free guidance; rows drawn from
      (seed, step).
    lora: train low-rank adapters only (models/lora.py, lora_training): the
      base is initial_checkpoint's params (or the seed's random init), frozen
      and held once; checkpoints hold the adapters, run_dir/lora.json the
      settings and the base's path. Evaluation uses base + adapters.

  SIGTERM (preemption) saves a checkpoint at the next step boundary and returns
  with TrainResult.preempted set; the next start resumes from it.
  """
  if loss_chunk_size is not None and diloco is not None:
    raise ValueError("train: loss_chunk_size is not supported with diloco yet; "
                     "unset train.loss_chunk_size or train.diloco.")
  if lora is not None and diloco is not None:
    raise ValueError("train: lora is not supported with diloco; unset train.lora or "
                     "train.diloco.")
  lora_info = None
  if lora is not None:
    lora_info = lora_training.run_info(lora, initial_checkpoint, seed,
                                       lora_training.check_targets(model_config, lora))
    lora_training.check_run_info(run_dir, lora_info)
  guard = NonFiniteGuard(nonfinite_policy, max_consecutive_nonfinite)
  data = _train_iterator(train_data)  # bad data fails before run_dir is written
  if eval_data is not None and _sft_task(eval_data):
    from posttrain_jax.data import sft_pipeline
    sft_pipeline.check(eval_data.task_name, eval_data.split, eval_data.sequence_length)
  profiler = StepProfiler(os.path.join(run_dir, "profile"), profile_steps)
  os.makedirs(run_dir, exist_ok=True)
  mesh = partitioning.create_mesh(ici_parallelism or {"data": -1}, dcn_parallelism)
  schedule, tx = optimizer.build(num_steps)
  if lora is not None:
    trainer = lora_training.LoraTrainer(model_config, lora, tx, schedule, mesh,
                                        num_microbatches=num_microbatches, z_loss=z_loss,
                                        loss_chunk_size=loss_chunk_size, seed=seed)
    eval_params = lambda s: s.params
  elif diloco is None:
    trainer = Trainer(Transformer(model_config), tx, schedule, mesh,
                      num_microbatches=num_microbatches, z_loss=z_loss,
                      loss_chunk_size=loss_chunk_size)
    eval_params = lambda s: s.params
  else:
    trainer = diloco_loop.DiLoCoLoop(Transformer(model_config), tx, schedule, mesh,
                                     diloco, batch_size=train_data.batch_size,
                                     num_microbatches=num_microbatches, z_loss=z_loss)
    eval_params = trainer.eval_params
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              save_every_steps=checkpoint_every,
                              max_to_keep=keep_checkpoints,
                              async_save=async_checkpointing)
  initialised_from = None
  if lora is not None:  # the frozen base, also when resuming (checkpoints hold adapters)
    initialised_from = trainer.load_base(initial_checkpoint, seed)
    lora_training.write_run_info(run_dir, lora_info)
  resumed_from, state, data_state = checkpointer.restore_latest(trainer.abstract_state)
  if resumed_from is not None:
    if "train" in data_state:
      data.set_state(data_state["train"])
    origin = f"resumed from step {resumed_from}"
    if initial_checkpoint and lora is None:
      origin += (f" of the run's own checkpoint (it wins over initial_checkpoint "
                 f"{initial_checkpoint}, which is ignored)")
  elif initial_checkpoint and lora is None:
    state = (state_from_initial_checkpoint(trainer, model_config, initial_checkpoint)
             if diloco is None else
             trainer.state_from_initial_checkpoint(model_config, initial_checkpoint))
    initialised_from = os.path.abspath(initial_checkpoint)
    _copy_hf_metadata(initialised_from, run_dir)
    origin = f"initialised from initial_checkpoint {initialised_from}"
  else:
    state = trainer.init_state(jax.random.key(seed))
    origin = "initialised"
  if lora is not None:
    if initialised_from and resumed_from is None:
      _copy_hf_metadata(initialised_from, run_dir)
    origin += f" | {trainer.summary()} | base {initialised_from or f'random init (seed {seed})'}"
  start = int(jax.device_get(state.step))
  if diloco is not None:
    trainer.start(start)

  reporter = ProgressReporter(run_dir, total_steps=num_steps, start_step=start,
                              log_every=log_every)
  operative_config_lib.record(run_dir, operative_config)  # the start succeeded
  if operative_config:
    reporter.write_text(start, "config", operative_config)
  params_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(eval_params(state)))
  reporter.print(f"{origin} | {params_count:,} params | mesh {dict(mesh.shape)} | "
                 f"run_dir {run_dir}")
  if getattr(data, "summary", None):
    reporter.print(data.summary)

  eval_set = (_eval_batches(eval_data, eval_batches)
              if eval_data is not None and (eval_every or num_steps > start) else None)
  if start >= num_steps:
    reporter.print(f"run already complete at step {start} (num_steps={num_steps}); "
                   "raise num_steps to train further")
  eval_metrics = {}
  loop = StepLoop(start=start, num_steps=num_steps, guard=guard, reporter=reporter,
                  checkpointer=checkpointer, data_state=lambda: {"train": data.get_state()})
  try:
    for step in loop:
      local = next(data)
      if condition_dropout:
        local = drop_conditions(local, condition_dropout,
                                np.random.default_rng([seed, step]))
      check_token_ids(local, model_config.vocab_size)
      profiler.before_step(step)
      state, metrics = trainer.train_step(state, trainer.shard_batch(local))
      profiler.after_step(step, (state, metrics))
      loop.end_step(step, state, metrics)
      if diloco is not None and (step % log_every == 0 or step == num_steps):
        trainer.write_traffic(reporter, step)
      if eval_set and ((eval_every and step % eval_every == 0) or step == num_steps):
        eval_metrics[step] = evaluate(trainer, eval_params(state), eval_set)
        reporter.write_eval(step, eval_metrics[step])
    loop.finish(state)
    if diloco is not None:
      reporter.print(trainer.summary())
  finally:
    profiler.stop()
    loop.close()
  return TrainResult(final_step=loop.final_step,
                     losses=dict(reporter.history), eval_metrics=eval_metrics,
                     resumed_from=resumed_from, initialised_from=initialised_from,
                     preempted=loop.preempted, skipped_steps=guard.skipped,
                     traffic=trainer.traffic() if diloco is not None else None)


def state_from_initial_checkpoint(trainer: Trainer, model_config: ModelConfig,
                                  directory: str) -> TrainState:
  """Step 0, the checkpoint's params on the trainer's shardings, fresh opt state."""
  if not os.path.exists(directory):
    raise FileNotFoundError(f"initial_checkpoint {directory} does not exist.")
  params = params_checkpoint.restore_params(directory, trainer.abstract_state.params,
                                            model_config)
  shardings = trainer.state_shardings
  opt_state = jax.jit(trainer.tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step, params, opt_state)


def _copy_hf_metadata(source: str, run_dir: str) -> None:
  """Keeps the HF export metadata with the run, so the run can be exported."""
  metadata = params_checkpoint.read_hf_metadata(source)
  if metadata is not None and jax.process_index() == 0:
    metadata["initial_checkpoint"] = source
    params_checkpoint.write_hf_metadata(run_dir, metadata)
