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
  learning rate, dropout or data seed (WARM, Ramé et al. 2024, arXiv 2401.12187:
  all members share the linear-probe head init).
* FT: AdamW with warmup + cosine (OptimizerConfig, over the FT steps), head
  dropout on, batches from train_data (its seed is the member's data order).

The two phases keep separate optimizer states (`PhaseState`) and are two
jitted `trainer.optimizer_step`s with the Bradley-Terry loss_fn. At the end
the reward model is exported as a model directory (reward_model.save_reward_model).
The job that runs this (`train_reward_model`: data, checkpoints, eval, export)
is `posttrain_jax.jobs.train_reward_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax.core import partitioning
from posttrain_jax.core.trainer import TrainState, optimizer_step
from posttrain_jax.rl import reward_model
from posttrain_jax.rl.bradley_terry import bradley_terry_sums
from posttrain_jax.rl.reward_model import RewardModel

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
    return shard_pairs(local, self.mesh, self.rules)


def shard_pairs(local: Mapping[str, np.ndarray], mesh, rules=partitioning.DEFAULT_RULES):
  """A pair batch as global arrays over the batch axes; per-pair values [B]
  (pair_weights, ...) travel as [B, 1]."""
  local = {k: np.asarray(v).reshape(-1, 1) if np.ndim(v) == 1 else v
           for k, v in local.items()}
  if "pair_weights" in local:
    local["pair_weights"] = local["pair_weights"].astype(np.float32)
  return partitioning.global_batch(local, mesh, rules)


def pair_iterator(cfg, seed: int | None = None, start_batch: int = 0):
  """data.preferences.PreferenceBatchIterator over cfg (a DatasetConfig): this
  process's share of the global batch_size, its shard of the pairs, from batch
  start_batch on."""
  from posttrain_jax.data.preferences import PreferenceBatchIterator  # TF lives in data/
  count = jax.process_count()
  if cfg.batch_size % count:
    raise ValueError(f"Global batch_size {cfg.batch_size} is not divisible by {count} "
                     "processes.")
  return PreferenceBatchIterator(
      task_name=cfg.task_name, split=cfg.split, sequence_length=cfg.sequence_length,
      batch_size=cfg.batch_size // count, shuffle=cfg.shuffle,
      seed=cfg.seed if seed is None else seed, num_epochs=cfg.num_epochs,
      shard_index=jax.process_index(), num_shards=count, start_batch=start_batch)


def pair_eval_batches(cfg, max_batches: int | None) -> list[dict[str, np.ndarray]]:
  """One unshuffled pass over cfg's held-out pairs (this process's shard; the
  last batch padded with weight-0 pairs), at most max_batches batches."""
  from posttrain_jax.data.preferences import preference_eval_batches  # TF lives in data/
  return preference_eval_batches(
      task_name=cfg.task_name, split=cfg.split, sequence_length=cfg.sequence_length,
      batch_size=cfg.batch_size // jax.process_count(), max_batches=max_batches,
      shard_index=jax.process_index(), num_shards=jax.process_count())
