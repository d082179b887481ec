"""The `train_dpo` job: Direct Preference Optimization from an SFT checkpoint.

Wires `rl.dpo_training` (the partitioned DPO step, `DPOTrainer`) into a run:
preference pairs (JSONL files of tools/label_preferences.py, registered as a
seqio task like train_reward_model does), the frozen reference (the SFT model,
on the fly or precomputed into run_dir), atomic checkpoints with the pair
iterator's position (exact resume), eval on held-out pairs, progress and
TensorBoard scalars. Losses: DPO / cDPO ("sigmoid", label_smoothing) and IPO
(`rl.dpo`).
"""

from __future__ import annotations

from collections.abc import Mapping
import os

import jax
import jax.numpy as jnp

from posttrain_jax.core import partitioning
from posttrain_jax.core.checkpointing import Checkpointer
from posttrain_jax.core.nonfinite_guard import NonFiniteGuard
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.progress import job_reporter
from posttrain_jax.core.step_loop import StepLoop
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.jobs.train import check_token_ids
from posttrain_jax.jobs.train_policy import PolicyResult
from posttrain_jax.models import ModelConfig, params_checkpoint
from posttrain_jax.rl.dpo import METRICS, check_dpo_args
from posttrain_jax.rl.dpo_training import (
    DPOTrainer, ReferenceCache, check_reference, precompute_reference)
from posttrain_jax.rl.reward_training import pair_eval_batches, pair_iterator

SHOWN = (("loss", "loss", "{:.4f}"), ("accuracy", "acc", "{:.3f}"),
         ("reward_margin", "margin", "{:.3f}"), ("rewards_chosen", "r_w", "{:.3f}"),
         ("rewards_rejected", "r_l", "{:.3f}"), ("learning_rate", "lr", "{:.2e}"),
         ("grad_norm", "gnorm", "{:.3f}"))
TOKEN_KEYS = ("chosen_tokens", "rejected_tokens")


def evaluate(trainer: DPOTrainer, params, ref_params, batches) -> dict[str, float]:
  """Pair-weighted means of the DPO metrics over held-out (global) batches."""
  totals = None
  for batch in batches:
    sums = trainer.eval_sums(params, batch, ref_params)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  weight = max(float(totals["weight"]), 1e-9)
  return {k: float(totals[k]) / weight for k in METRICS}


def _reference_cache(trainer: DPOTrainer, ref_params, run_dir: str, data, train_data,
                     initial_checkpoint: str, num_batches: int, reporter) -> ReferenceCache:
  """The precomputed reference log-probs of batches 0 .. num_batches - 1."""
  config = {k: v for k, v in data.get_state().items()
            if k not in ("batches_consumed", "shard_index")}
  vocab_size = trainer.model.config.vocab_size
  cache = ReferenceCache(run_dir, {"data": config,
                                   "reference": os.path.abspath(initial_checkpoint)})
  if cache.stale:
    reporter.print(f"{cache.path} was computed for other data or another reference; "
                   "recomputing it")

  def batches_from(start):
    it = pair_iterator(train_data, start_batch=start)
    for local in it:
      check_token_ids(local, vocab_size, TOKEN_KEYS)
      yield local
  done = precompute_reference(trainer, ref_params, cache, num_batches, batches_from)
  if done:
    reporter.print(f"precomputed reference log-probs of {done} batches "
                   f"({len(cache)} in {cache.path})")
  return cache


def train_dpo(*, model_config: ModelConfig, run_dir: str, initial_checkpoint: str,
              train_data: DatasetConfig, num_steps: int,
              data_files: Mapping[str, str] | None = None, beta: float = 0.1,
              label_smoothing: float = 0.0, loss_type: str = "sigmoid",
              ipo_tau: float = 0.1, reference: str = "on_the_fly",
              optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-6,
                                                           warmup_steps=150,
                                                           weight_decay=0.0),
              eval_data: DatasetConfig | None = None, eval_every: int = 0,
              eval_batches: int | None = 20,
              ici_parallelism: Mapping[str, int] | None = None,
              dcn_parallelism: Mapping[str, int] | None = None,
              num_microbatches: int = 1, checkpoint_every: int = 100,
              keep_checkpoints: int | None = 3, async_checkpointing: bool = True,
              log_every: int = 10, nonfinite_policy: str = "skip",
              max_consecutive_nonfinite: int = 10,
              operative_config: str | None = None) -> PolicyResult:
  """DPO (or cDPO / IPO) of the SFT model on preference pairs for num_steps steps.

  Returns a PolicyResult: metrics of every logged step, eval/* metrics, the
  final TrainState.

  Args:
    model_config: the policy's architecture (that of initial_checkpoint).
    run_dir: checkpoints/, TensorBoard events, config.gin (and, with
      reference="precomputed", reference_logprobs.npz).
    initial_checkpoint: the SFT model (model or run directory): the policy's
      initialisation and the frozen reference pi_ref.
    train_data: pair batches (DatasetConfig: task_name, split, sequence_length
      = prompt + response tokens per row, global batch_size in pairs, shuffle,
      seed = the data order, num_epochs; pack is ignored).
    num_steps: total steps (a resumed run counts from its checkpoint).
    data_files: {split: JSONL file(s)}; registers the preference task
      train_data.task_name over them (data/preferences.py) before reading.
    beta / label_smoothing / loss_type / ipo_tau: the loss (`rl.dpo`): beta the
      KL strength (0.1 in the DPO paper), label_smoothing eps of cDPO in
      [0, 0.5), loss_type "sigmoid" (DPO) or "ipo", ipo_tau IPO's regulariser.
    reference: "on_the_fly" (reference forward in every step) or "precomputed"
      (scored once into run_dir before training; `rl.dpo_training`).
    optimizer: AdamW + warmup/cosine (DPO paper: lr 1e-6, 150 warmup steps).
    eval_data / eval_every / eval_batches: the DPO metrics on held-out pairs
      (eval/loss, eval/accuracy, eval/reward_margin, ...) every eval_every
      steps and at the end.
    The other arguments are as in train.train.
  """
  check_dpo_args(beta, label_smoothing, loss_type, ipo_tau)
  check_reference(reference)
  if not initial_checkpoint:
    raise ValueError("train_dpo needs initial_checkpoint: the SFT model directory (policy "
                     "init and DPO reference); set train_dpo.initial_checkpoint.")
  if not os.path.exists(initial_checkpoint):
    raise FileNotFoundError(f"initial_checkpoint {initial_checkpoint} does not exist.")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  if data_files:
    from posttrain_jax.data.preferences import register_preference_task
    register_preference_task(train_data.task_name, data_files)
  guard = NonFiniteGuard(nonfinite_policy, max_consecutive_nonfinite)
  mesh = partitioning.create_mesh(ici_parallelism or {"data": -1}, dcn_parallelism)
  schedule, tx = optimizer.build(num_steps)
  trainer = DPOTrainer(model_config, tx, schedule, mesh, beta=beta, loss_type=loss_type,
                       label_smoothing=label_smoothing, ipo_tau=ipo_tau,
                       reference=reference, num_microbatches=num_microbatches)
  data = pair_iterator(train_data)
  eval_set = pair_eval_batches(eval_data, eval_batches) if eval_data is not None else None
  os.makedirs(run_dir, exist_ok=True)
  ref_params = params_checkpoint.restore_params(initial_checkpoint, trainer.abstract_params,
                                                model_config)
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              save_every_steps=checkpoint_every, max_to_keep=keep_checkpoints,
                              async_save=async_checkpointing)
  resumed_from, state, data_state = checkpointer.restore_latest(trainer.abstract_state)
  if resumed_from is not None:
    data.set_state(data_state["train"])
    origin = f"resumed from step {resumed_from}"
  else:
    state = trainer.init_state(ref_params)
    origin = f"initialised from {os.path.abspath(initial_checkpoint)}"
  start = int(jax.device_get(state.step))
  reporter = job_reporter(run_dir, total_steps=num_steps, start_step=start,
                          log_every=log_every, shown=SHOWN, operative_config=operative_config)
  reporter.print(f"DPO {origin} | loss {loss_type} | beta {beta} | label smoothing "
                 f"{label_smoothing} | reference {reference} | {train_data.batch_size} "
                 f"pairs/step | mesh {dict(mesh.shape)} | run_dir {run_dir}")
  if start >= num_steps:
    reporter.print(f"run already complete at step {start} (num_steps={num_steps})")
  cache, precomputed = None, reference == "precomputed"
  if precomputed:
    cache = _reference_cache(trainer, ref_params, run_dir, data, train_data,
                             initial_checkpoint,
                             data.batches_consumed + max(num_steps - start, 0), reporter)
  if eval_set is not None:
    for b in eval_set:
      check_token_ids(b, model_config.vocab_size, TOKEN_KEYS)
    refs = [trainer.reference_logprobs(ref_params, trainer.shard_batch(b)) if precomputed
            else None for b in eval_set]
    eval_set = [trainer.shard_batch(b, r) for b, r in zip(eval_set, refs)]
  if precomputed:
    ref_params = None  # the step needs no reference: free its device memory

  history: dict[int, dict[str, float]] = {}
  eval_history: dict[int, dict[str, float]] = {}
  loop = StepLoop(start=start, num_steps=num_steps, guard=guard, reporter=reporter,
                  checkpointer=checkpointer, data_state=lambda: {"train": data.get_state()})
  try:
    for step in loop:
      index = data.batches_consumed
      local = next(data)
      check_token_ids(local, model_config.vocab_size, TOKEN_KEYS)
      batch = trainer.shard_batch(local, None if cache is None else cache[index])
      state, metrics = trainer.step(state, batch, ref_params)
      loop.end_step(step, state, metrics)
      if step % log_every == 0 or step == num_steps:
        history[step] = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if eval_set and ((eval_every and step % eval_every == 0) or step == num_steps):
        eval_history[step] = evaluate(trainer, state.params, ref_params, eval_set)
        reporter.write_eval(step, eval_history[step])
    loop.finish(state)
  finally:
    loop.close()
  return PolicyResult(final_step=loop.final_step, metrics=history,
                      eval_metrics=eval_history, resumed_from=resumed_from,
                      preempted=loop.preempted, skipped_steps=guard.skipped, state=state)
