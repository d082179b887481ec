"""Reward-model training: linear probing, then full fine-tuning, Bradley-Terry loss.

WARM recipe (Ramé et al., 2024, arXiv 2401.12187, Sec. 3): the backbone
starts from the SFT model, the linear head is first fitted by linear probing
(LP), then everything is fine-tuned (FT). Steps 1..linear_probe_steps are LP,
the rest FT, in one step counter and one checkpointed TrainState:

* LP: the loss sees stop_gradient(backbone); the LP optimizer
  (Adam(linear_probe_learning_rate), its state over the head only) updates
  params["head"] and gives the backbone zero updates, so the backbone stays
  bit-exact. No dropout; the batches come from their own iterator with seed
  linear_probe_seed. LP therefore
  depends only on (initial_checkpoint, LP data/seed/lr/steps): every WARM
  member with the same LP settings starts FT from the same head, whatever its
  learning rate, dropout or data seed (ALGORITHMS.md 8(c)).
* FT: AdamW with warmup + cosine (OptimizerConfig, over the FT steps), head
  dropout on, batches from train_data (its seed is the member's data order).

The two phases keep separate optimizer states (`PhaseState`) and are two
jitted `trainer.optimizer_step`s with the Bradley-Terry loss_fn. At the end
the reward model is exported as a model directory (reward_model.save_reward_model).
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import dataclasses
import functools
import os
import shutil
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax import params_checkpoint, partitioning, reward_model
from posttrain_jax.bradley_terry import bradley_terry_sums
from posttrain_jax.checkpointing import Checkpointer
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.models import ModelConfig
from posttrain_jax.nonfinite_guard import NonFiniteGuard
from posttrain_jax.optimizer import OptimizerConfig
from posttrain_jax.progress import ProgressReporter
from posttrain_jax.step_loop import StepLoop
from posttrain_jax.reward_model import RewardModel
from posttrain_jax.trainer import TrainState, optimizer_step

SHOWN = (("loss", "loss", "{:.4f}"), ("accuracy", "acc", "{:.3f}"),
         ("margin", "margin", "{:.3f}"), ("learning_rate", "lr", "{:.2e}"),
         ("grad_norm", "gnorm", "{:.3f}"))
SIDES = ("chosen", "rejected")


class PhaseState(NamedTuple):
  probe: Any     # the LP optimizer's state over params["head"]
  finetune: Any  # the FT optimizer's state over all params


def phase_optimizers(head_tx: optax.GradientTransformation,
                     finetune_tx: optax.GradientTransformation):
  """Two views of one PhaseState: (LP transform, FT transform).

  LP applies head_tx to params["head"] and zero updates to everything else
  (the backbone stays bit-exact); FT applies finetune_tx to all params. Each
  updates its own half of the state and leaves the other untouched.
  """
  def init(params):
    return PhaseState(head_tx.init(params["head"]), finetune_tx.init(params))

  def probe_update(grads, state, params=None):
    head, new = head_tx.update(grads["head"], state.probe,
                               None if params is None else params["head"])
    updates = {k: head if k == "head" else jax.tree.map(jnp.zeros_like, v)
               for k, v in grads.items()}
    return updates, PhaseState(new, state.finetune)

  def finetune_update(grads, state, params=None):
    updates, new = finetune_tx.update(grads, state.finetune, params)
    return updates, PhaseState(state.probe, new)

  return (optax.GradientTransformation(init, probe_update),
          optax.GradientTransformation(init, finetune_update))


def bradley_terry_objective(model: RewardModel, *, probe: bool):
  """optimizer_step loss_fn: BT loss over a pair batch; aux = dropout rng.

  Chosen and rejected rows go through the model as one [2B, L] batch. With
  probe, the backbone is stop_gradient-ed and dropout is off.
  """
  def loss_fn(params, batch, rng):
    if probe:
      params = dict(params, backbone=jax.lax.stop_gradient(params["backbone"]))
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], 0)
    scores = model.apply({"params": params}, cat("tokens"), cat("positions"),
                         cat("segment_ids"), deterministic=probe,
                         rngs=None if probe else {"dropout": rng})
    chosen, rejected = jnp.split(scores, 2)
    sums = bradley_terry_sums(chosen, rejected, batch["pair_weights"][:, 0])
    return sums["loss"], {"loss": sums["loss"], "accuracy": sums["correct"],
                          "margin": sums["margin"], "weight": sums["weight"]}
  return loss_fn


class RewardTrainer:
  """Jitted, partitioned LP / FT / eval steps of a RewardModel (Trainer-style shardings)."""

  def __init__(self, model: RewardModel, head_tx, finetune_tx, schedule, mesh,
               rules=partitioning.DEFAULT_RULES, num_microbatches: int = 1):
    self.model, self.mesh, self.rules = model, mesh, rules
    probe_tx, finetune_tx_view = phase_optimizers(head_tx, finetune_tx)
    abstract_params, self.param_shardings = partitioning.params_and_shardings(
        lambda: reward_model.init_boxed(model, jax.random.key(0)), mesh, rules)
    abstract_opt = jax.eval_shape(probe_tx.init, abstract_params)
    replicated = partitioning.replicated(mesh)
    follow = lambda tx, opt, shardings: optax.tree_map_params(
        tx, lambda _, s: s, opt, shardings, transform_non_params=lambda _: replicated)
    opt_shardings = PhaseState(
        follow(head_tx, abstract_opt.probe, self.param_shardings["head"]),
        follow(finetune_tx, abstract_opt.finetune, self.param_shardings))
    self.state_shardings = TrainState(replicated, self.param_shardings, opt_shardings)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt),
        self.state_shardings)
    batch = partitioning.batch_sharding(mesh, rules)

    def step_fn(probe):
      tx = probe_tx if probe else finetune_tx_view
      fn = functools.partial(optimizer_step, loss_fn=bradley_terry_objective(model, probe=probe),
                             tx=tx, schedule=schedule, num_microbatches=num_microbatches)
      return jax.jit(fn, in_shardings=(self.state_shardings, batch, replicated),
                     out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._probe, self._finetune = step_fn(True), step_fn(False)
    eval_loss = bradley_terry_objective(model, probe=True)
    self._eval = jax.jit(lambda p, b: eval_loss(p, b, None)[1],
                         in_shardings=(self.param_shardings, batch), out_shardings=replicated)
    self._init_opt = jax.jit(probe_tx.init, out_shardings=opt_shardings)

  def context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def state_from_params(self, params) -> TrainState:
    with self.context():
      opt = self._init_opt(params)
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step),
                      params, opt)

  def init_params(self, rng):
    init = jax.jit(lambda r: nn.unbox(reward_model.init_boxed(self.model, r)),
                   out_shardings=self.param_shardings)
    with self.context():
      return init(rng)

  def train_step(self, state, batch, rng, *, probe: bool):
    with self.context():
      return (self._probe if probe else self._finetune)(state, batch, rng)

  def eval_sums(self, params, batch):
    with self.context():
      return self._eval(params, batch)

  def shard_batch(self, local: Mapping[str, np.ndarray]):
    """Global arrays over the batch axes; pair_weights [B] travels as [B, 1]."""
    local = dict(local)
    local["pair_weights"] = np.asarray(local["pair_weights"], np.float32).reshape(-1, 1)
    return partitioning.global_batch(local, self.mesh, self.rules)


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


def _iterator(cfg: DatasetConfig, seed: int | None = None):
  from posttrain_jax.data.preferences import PreferenceBatchIterator  # TF lives in data/
  count = jax.process_count()
  if cfg.batch_size % count:
    raise ValueError(f"Global batch_size {cfg.batch_size} is not divisible by {count} "
                     "processes.")
  return PreferenceBatchIterator(
      task_name=cfg.task_name, split=cfg.split, sequence_length=cfg.sequence_length,
      batch_size=cfg.batch_size // count, shuffle=cfg.shuffle,
      seed=cfg.seed if seed is None else seed, num_epochs=cfg.num_epochs,
      shard_index=jax.process_index(), num_shards=count)


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
  abstract = trainer.abstract_state.params
  if reward_model.is_reward_model(initial_checkpoint):
    params = reward_model.restore_reward_params(initial_checkpoint, abstract, cfg)
    return params, f"reward model {os.path.abspath(initial_checkpoint)}"
  params = dict(trainer.init_params(jax.random.key(seed)))
  params["backbone"] = params_checkpoint.restore_params(initial_checkpoint,
                                                       abstract["backbone"], cfg)
  return params, f"backbone from {os.path.abspath(initial_checkpoint)}"


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
      allow_random_init.
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
  if operative_config and jax.process_index() == 0:
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
      f.write(operative_config)
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
  probe_data = _iterator(train_data, linear_probe_seed) if k > 0 else None
  data = _iterator(train_data)

  def data_state():
    return {"train": data.get_state(),
            **({"probe": probe_data.get_state()} if probe_data else {})}

  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    state, saved = checkpointer.restore(resumed_from, trainer.abstract_state)
    data.set_state(saved["train"])
    if probe_data is not None and "probe" in saved:
      probe_data.set_state(saved["probe"])
    origin = f"resumed from step {resumed_from}"
  else:
    params, origin = _initial_params(trainer, model_config, initial_checkpoint,
                                     allow_random_init, seed)
    state = trainer.state_from_params(params)
  start = int(jax.device_get(state.step))
  reporter = ProgressReporter(run_dir, total_steps=num_steps, start_step=start,
                              log_every=log_every, shown=SHOWN)
  if operative_config:
    reporter.write_text(start, "config", operative_config)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  reporter.print(f"reward model: {origin} | {count:,} params | linear probe steps 1-{k}, "
                 f"fine-tuning {k + 1}-{num_steps} | mesh {dict(mesh.shape)} | "
                 f"run_dir {run_dir}")
  eval_set = None
  if eval_data is not None:
    from posttrain_jax.data.preferences import preference_eval_batches
    eval_set = preference_eval_batches(
        task_name=eval_data.task_name, split=eval_data.split,
        sequence_length=eval_data.sequence_length,
        batch_size=eval_data.batch_size // jax.process_count(), max_batches=eval_batches,
        shard_index=jax.process_index(), num_shards=jax.process_count())
  base_rng = jax.random.key(seed)
  eval_metrics, probe_head = {}, None
  loop = StepLoop(start=start, num_steps=num_steps, guard=guard, reporter=reporter,
                  checkpointer=checkpointer, data_state=data_state)
  try:
    for step in loop:
      probe = step <= k
      local = next(probe_data if probe else data)
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
                                     if initial_checkpoint else None)})
    reporter.print(f"exported reward model to {exported}")
  return RewardTrainResult(
      final_step=loop.final_step,
      losses=dict(reporter.history), eval_metrics=eval_metrics, resumed_from=resumed_from,
      export_dir=exported, linear_probe_head=probe_head, preempted=loop.preempted,
      skipped_steps=guard.skipped)
