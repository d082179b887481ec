"""The `train_reward_model` job: a Bradley-Terry reward model from an SFT checkpoint.

Wires `rl.reward_training` (the linear-probing then fine-tuning `RewardTrainer`,
WARM recipe) into a run: preference data, atomic checkpoints with the data
position (exact resume), pairwise eval, progress and TensorBoard scalars, and
the export as a reward-model directory (`rl.reward_model.save_reward_model`).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax.core import partitioning
from posttrain_jax.core.checkpointing import Checkpointer
from posttrain_jax.core.nonfinite_guard import NonFiniteGuard
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.progress import job_reporter
from posttrain_jax.core.step_loop import StepLoop
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.jobs.train import check_token_ids
from posttrain_jax.models import ModelConfig, params_checkpoint
from posttrain_jax.rl import reward_model
from posttrain_jax.rl.reward_model import RewardModel
from posttrain_jax.rl.reward_training import RewardTrainer, pair_eval_batches, pair_iterator

TOKEN_KEYS = ("chosen_tokens", "rejected_tokens")
SHOWN = (("loss", "loss", "{:.4f}"), ("accuracy", "acc", "{:.3f}"),
         ("margin", "margin", "{:.3f}"), ("learning_rate", "lr", "{:.2e}"),
         ("grad_norm", "gnorm", "{:.3f}"))


@dataclasses.dataclass
class RewardTrainResult:
  final_step: int
  losses: dict[int, float]
  eval_metrics: dict[int, dict[str, float]]
  resumed_from: int | None
  export_dir: str | None = None
  linear_probe_head: np.ndarray | None = None  # head kernel after LP (if run here)
  preempted: bool = False
  skipped_steps: int = 0


def evaluate(trainer: RewardTrainer, params, batches) -> dict[str, float]:
  """Pair-weighted BT loss, pairwise accuracy and mean margin."""
  totals = None
  for local in batches:
    sums = trainer.eval_sums(params, trainer.shard_batch(local))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  w = max(float(totals["weight"]), 1e-9)
  return {k: float(totals[k]) / w for k in ("loss", "accuracy", "margin")}


def _initial_params(trainer: RewardTrainer, cfg: ModelConfig, initial_checkpoint,
                    allow_random_init: bool, seed: int):
  if initial_checkpoint is None:
    if not allow_random_init:
      raise ValueError(
          "train_reward_model needs initial_checkpoint: the SFT model directory (or run) "
          "whose weights initialise the backbone. Fix: set "
          "train_reward_model.initial_checkpoint, or allow_random_init=True for a "
          "randomly initialised backbone (tests only).")
    return trainer.init_params(jax.random.key(seed)), "randomly initialised backbone"
  if not os.path.exists(initial_checkpoint):
    raise FileNotFoundError(f"initial_checkpoint {initial_checkpoint} does not exist.")
  check_vocabulary(initial_checkpoint, cfg)
  abstract = trainer.abstract_state.params
  if reward_model.is_reward_model(initial_checkpoint):
    params = reward_model.restore_reward_params(initial_checkpoint, abstract, cfg)
    return params, f"reward model {os.path.abspath(initial_checkpoint)}"
  params = dict(trainer.init_params(jax.random.key(seed)))
  params["backbone"] = params_checkpoint.restore_params(initial_checkpoint,
                                                       abstract["backbone"], cfg)
  return params, f"backbone from {os.path.abspath(initial_checkpoint)}"


def _tokenizer(initial_checkpoint: str | None, train_data: DatasetConfig):
  """The backbone's recorded tokenizer, else the preference task's (None: unknown)."""
  record = (reward_model.recorded_tokenizer(initial_checkpoint)
            if initial_checkpoint and os.path.isdir(initial_checkpoint) else None)
  return record or reward_model.task_tokenizer(train_data.task_name)


def check_vocabulary(initial_checkpoint: str, cfg: ModelConfig) -> None:
  """One line if the backbone's checkpoint has another vocab_size than cfg."""
  saved = params_checkpoint.model_config_of(params_checkpoint.locate(initial_checkpoint))
  if saved.vocab_size != cfg.vocab_size:
    raise ValueError(
        f"initial_checkpoint {initial_checkpoint} has vocab_size {saved.vocab_size} but "
        f"the reward model's ModelConfig.vocab_size is {cfg.vocab_size}: the reward model "
        "must read the policy's tokens. Fix: configure the reward model with the SFT "
        "model's model.gin.")


def train_reward_model(
    *, model_config: ModelConfig, run_dir: str, train_data: DatasetConfig,
    num_steps: int, data_files: Mapping[str, str] | None = None,
    linear_probe_steps: int = 0, linear_probe_learning_rate: float = 1e-3,
    linear_probe_seed: int = 0, optimizer: OptimizerConfig = OptimizerConfig(),
    initial_checkpoint: str | None = None, allow_random_init: bool = False,
    head_dropout: float = 0.0, seed: int = 0, eval_data: DatasetConfig | None = None,
    eval_every: int = 0, eval_batches: int | None = 20,
    ici_parallelism: Mapping[str, int] | None = None,
    dcn_parallelism: Mapping[str, int] | None = None, num_microbatches: int = 1,
    checkpoint_every: int = 1000, keep_checkpoints: int | None = 3,
    async_checkpointing: bool = True, log_every: int = 10,
    operative_config: str | None = None, export_dir: str | None = None,
    nonfinite_policy: str = "skip", max_consecutive_nonfinite: int = 10,
) -> RewardTrainResult:
  """Trains a Bradley-Terry reward model: LP for linear_probe_steps, then FT.

  Args:
    model_config: the backbone's architecture (the SFT model's).
    run_dir: checkpoints/, TensorBoard events, config.gin; the exported reward
      model goes to export_dir (default run_dir/reward_model).
    train_data: pair batches (DatasetConfig: task_name, split, sequence_length,
      global batch_size, shuffle, seed = the data order; pack is ignored).
    num_steps: total steps, LP included.
    data_files: {split: JSONL file(s)}; registers the preference task
      train_data.task_name over them (data/preferences.py) before reading.
    linear_probe_steps / linear_probe_learning_rate / linear_probe_seed: the LP
      phase (head only, Adam, constant lr, its own data order, no dropout).
    optimizer: AdamW + warmup/cosine of the FT phase (schedule over the FT steps).
    initial_checkpoint: SFT model directory or run for the backbone (a reward
      model directory restores backbone and head). Required unless
      allow_random_init. Its vocab_size must be model_config's, and every
      pair's token ids must lie below it (one line before the step otherwise).
      The export records the tokenizer (reward_model.json "tokenizer"): the
      checkpoint's recorded one, else the preference task's vocabulary, which
      policy jobs compare with theirs.
    head_dropout: dropout on the last token's hidden state during FT.
    seed: dropout rng (and random init).
    eval_data / eval_every / eval_batches: pairwise accuracy on held-out pairs.
    The other arguments are as in train.train.
  """
  if not 0 <= linear_probe_steps <= num_steps:
    raise ValueError(f"linear_probe_steps must be in [0, num_steps={num_steps}], got "
                     f"{linear_probe_steps}.")
  if not 0.0 <= head_dropout < 1.0:
    raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}.")
  if data_files:
    from posttrain_jax.data.preferences import register_preference_task
    register_preference_task(train_data.task_name, data_files)
  guard = NonFiniteGuard(nonfinite_policy, max_consecutive_nonfinite)
  os.makedirs(run_dir, exist_ok=True)
  mesh = partitioning.create_mesh(ici_parallelism or {"data": -1}, dcn_parallelism)
  finetune_steps = max(num_steps - linear_probe_steps, 1)
  ft_schedule, ft_tx = optimizer.build(finetune_steps)
  k = linear_probe_steps
  schedule = lambda step: jnp.where(step < k, linear_probe_learning_rate,
                                    ft_schedule(jnp.maximum(step - k, 0)))
  trainer = RewardTrainer(RewardModel(model_config, head_dropout),
                          optax.adam(linear_probe_learning_rate), ft_tx,
                          schedule, mesh, num_microbatches=num_microbatches)
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              save_every_steps=checkpoint_every, max_to_keep=keep_checkpoints,
                              async_save=async_checkpointing)
  probe_data = pair_iterator(train_data, linear_probe_seed) if k > 0 else None
  data = pair_iterator(train_data)

  def data_state():
    return {"train": data.get_state(),
            **({"probe": probe_data.get_state()} if probe_data else {})}

  resumed_from, state, saved = checkpointer.restore_latest(trainer.abstract_state)
  if resumed_from is not None:
    data.set_state(saved["train"])
    if probe_data is not None and "probe" in saved:
      probe_data.set_state(saved["probe"])
    origin = f"resumed from step {resumed_from}"
  else:
    params, origin = _initial_params(trainer, model_config, initial_checkpoint,
                                     allow_random_init, seed)
    state = trainer.state_from_params(params)
  start = int(jax.device_get(state.step))
  reporter = job_reporter(run_dir, total_steps=num_steps, start_step=start,
                          log_every=log_every, shown=SHOWN, operative_config=operative_config)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  reporter.print(f"reward model: {origin} | {count:,} params | linear probe steps 1-{k}, "
                 f"fine-tuning {k + 1}-{num_steps} | mesh {dict(mesh.shape)} | "
                 f"run_dir {run_dir}")
  eval_set = None
  if eval_data is not None:
    eval_set = pair_eval_batches(eval_data, eval_batches)
    for local in eval_set:
      check_token_ids(local, model_config.vocab_size, TOKEN_KEYS)
  base_rng = jax.random.key(seed)
  eval_metrics, probe_head = {}, None
  loop = StepLoop(start=start, num_steps=num_steps, guard=guard, reporter=reporter,
                  checkpointer=checkpointer, data_state=data_state)
  try:
    for step in loop:
      probe = step <= k
      local = next(probe_data if probe else data)
      check_token_ids(local, model_config.vocab_size, TOKEN_KEYS)
      state, metrics = trainer.train_step(state, trainer.shard_batch(local),
                                          jax.random.fold_in(base_rng, step), probe=probe)
      loop.end_step(step, state, metrics)
      if step == k:
        probe_head = np.asarray(jax.device_get(state.params["head"]["kernel"]))
      if eval_set and ((eval_every and step % eval_every == 0) or step == num_steps):
        eval_metrics[step] = evaluate(trainer, state.params, eval_set)
        reporter.write_eval(step, eval_metrics[step])
    loop.finish(state)
  finally:
    loop.close()
  exported = None
  if not loop.preempted:
    exported = os.path.abspath(export_dir or os.path.join(run_dir, "reward_model"))
    if reward_model.is_reward_model(exported) and jax.process_index() == 0:
      shutil.rmtree(os.path.join(exported, params_checkpoint.PARAMS), ignore_errors=True)
    reward_model.save_reward_model(
        exported, state.params, model_config, head_dropout=head_dropout,
        info={"linear_probe_steps": k, "num_steps": num_steps,
              "learning_rate": optimizer.learning_rate, "data_seed": train_data.seed,
              "initial_checkpoint": (os.path.abspath(initial_checkpoint)
                                     if initial_checkpoint else None),
              reward_model.TOKENIZER: _tokenizer(initial_checkpoint, train_data)})
    reporter.print(f"exported reward model to {exported}")
  return RewardTrainResult(
      final_step=loop.final_step,
      losses=dict(reporter.history), eval_metrics=eval_metrics, resumed_from=resumed_from,
      export_dir=exported, linear_probe_head=probe_head, preempted=loop.preempted,
      skipped_steps=guard.skipped)
