"""Partitioned LM train and eval steps.

`Trainer` owns the model, the optimizer, the mesh and the logical-axis rules;
it derives every sharding from the model's logical axis names and jits the
init, train and eval steps with explicit in/out shardings. Gradient
accumulation splits the batch into microbatches and normalises once by the
total loss weight, so an accumulated step equals the full-batch step.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax.core import partitioning
from posttrain_jax.core.losses import chunked_cross_entropy_sums, cross_entropy_sums

Batch = dict[str, jax.Array]
# loss_fn(params, batch, aux) -> (objective summed over the batch, dict of sums
# with "weight"); see optimizer_step.
LossFn = Callable[[Any, Batch, Any], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _forward(model: nn.Module, params, batch: Batch, **kwargs) -> jax.Array:
  return model.apply({"params": params}, batch["decoder_input_tokens"],
                     positions=batch.get("decoder_positions"),
                     segment_ids=batch.get("decoder_segment_ids"), **kwargs)


def lm_loss_sums(model: nn.Module, params, batch: Batch, z_loss: float = 0.0,
                 loss_chunk_size: int | None = None):
  """Summed cross-entropy (+ z-loss) of one batch; see losses.cross_entropy_sums.

  With loss_chunk_size the model returns hidden states only and the logits are
  formed loss_chunk_size positions at a time (losses.chunked_cross_entropy_sums:
  same sums and gradients, no [batch, length, vocab] array).
  """
  if loss_chunk_size is None:
    logits = _forward(model, params, batch)
    return cross_entropy_sums(logits, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"], z_loss)
  hidden = _forward(model, params, batch, hidden_only=True)
  head = functools.partial(model.apply, {"params": params}, method="hidden_to_logits")
  return chunked_cross_entropy_sums(hidden, batch["decoder_target_tokens"],
                                    batch["decoder_loss_weights"], head=head,
                                    chunk_size=loss_chunk_size, z_loss=z_loss)


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[B, ...] -> [M, B/M, ...] with microbatch m = rows m, m+M, ... .

  Taking strided rows keeps each device's rows on that device (the batch axis
  stays sharded), so splitting needs no communication.
  """
  def split(x):
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(f"Batch size {b} is not divisible by num_microbatches "
                       f"{num_microbatches}.")
    x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def optimizer_step(state: TrainState, batch: Batch, aux=None, *,
                   loss_fn: LossFn, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, num_microbatches: int = 1,
                   skip_nonfinite: bool = True):
  """One optimizer step of any summed loss, accumulating over microbatches.

  loss_fn(params, batch, aux) -> (objective_sum, sums): the objective summed
  over the batch and a dict of sums that includes "weight" (what to normalise
  by, e.g. the number of target tokens). The gradient is that of
  objective_sum / weight over the whole batch, so accumulation over
  microbatches equals the full-batch step. `aux` is passed through unchanged
  (e.g. a frozen teacher's parameters) and gets no gradient.

  Metrics: every sum divided by the weight, "tokens" (the weight), grad_norm,
  learning_rate and "nonfinite". With skip_nonfinite, a step whose objective
  or gradient is not finite leaves the parameters and optimizer state
  unchanged (the step counter still advances); metrics["nonfinite"] is 1.
  """
  grad_fn = jax.grad(lambda p, b: loss_fn(p, b, aux), has_aux=True)

  if num_microbatches == 1:
    grads, sums = grad_fn(state.params, batch)
  else:
    def body(acc, microbatch):
      g, s = grad_fn(state.params, microbatch)
      return jax.tree.map(jnp.add, acc, (g, s)), None
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        grad_fn, state.params, jax.tree.map(lambda x: x[0], split_microbatches(
            batch, num_microbatches))))
    (grads, sums), _ = jax.lax.scan(body, zeros,
                                    split_microbatches(batch, num_microbatches))

  weight = jnp.maximum(sums["weight"], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.all(jnp.array([jnp.isfinite(v) for v in jax.tree.leaves(sums)])) & (
      jnp.isfinite(grad_norm))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if skip_nonfinite:
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
  metrics = {k: v / weight for k, v in sums.items() if k != "weight"}
  metrics.update({
      "grad_norm": grad_norm,
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      "learning_rate": schedule(state.step),
      "tokens": sums["weight"],
  })
  return TrainState(state.step + 1, params, opt_state), metrics


def _check_chunk_size(loss_chunk_size: int | None) -> None:
  if loss_chunk_size is not None and loss_chunk_size < 1:
    raise ValueError(f"loss_chunk_size must be >= 1 (or None for the plain loss), "
                     f"got {loss_chunk_size}.")


def lm_objective(model: nn.Module, z_loss: float = 0.0,
                 loss_chunk_size: int | None = None) -> LossFn:
  """The LM loss as an `optimizer_step` loss_fn: metrics loss (cross-entropy
  per token), z_loss and accuracy. loss_chunk_size: see lm_loss_sums."""
  _check_chunk_size(loss_chunk_size)

  def loss_fn(params, batch, aux=None):
    del aux
    sums = lm_loss_sums(model, params, batch, z_loss, loss_chunk_size)
    return sums["loss"], {"loss": sums["cross_entropy"], "z_loss": sums["z_loss"],
                          "accuracy": sums["correct"], "weight": sums["weight"]}
  return loss_fn


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               num_microbatches: int = 1, z_loss: float = 0.0,
               skip_nonfinite: bool = True, loss_chunk_size: int | None = None):
  """One LM optimizer step (`optimizer_step` with `lm_objective`)."""
  loss_fn = lm_objective(model, z_loss, loss_chunk_size)
  return optimizer_step(state, batch, loss_fn=loss_fn, tx=tx, schedule=schedule,
                        num_microbatches=num_microbatches, skip_nonfinite=skip_nonfinite)


def train_state_shardings(abstract_params, param_shardings, tx: optax.GradientTransformation,
                          mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
  """(abstract TrainState whose leaves carry their shardings, TrainState of
  shardings) for params sharded by param_shardings: the optimizer state follows
  its parameters (optax.tree_map_params), its other leaves and the step are
  replicated."""
  replicated = partitioning.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = TrainState(replicated, param_shardings, opt_shardings)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt),
      shardings)
  return abstract, shardings


class Trainer:
  """Jitted, partitioned init / train / eval for a decoder-only LM."""

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, mesh: jax.sharding.Mesh,
               rules=partitioning.DEFAULT_RULES, num_microbatches: int = 1,
               z_loss: float = 0.0, skip_nonfinite: bool = True,
               loss_chunk_size: int | None = None):
    _check_chunk_size(loss_chunk_size)
    self.model, self.tx, self.schedule = model, tx, schedule
    self.mesh, self.rules = mesh, rules
    self.batch_sharding = partitioning.batch_sharding(mesh, rules)
    abstract_params, param_shardings = partitioning.params_and_shardings(
        lambda: self._init_boxed(jax.random.key(0)), mesh, rules)
    self.param_shardings = param_shardings
    replicated = partitioning.replicated(mesh)
    self.abstract_state, self.state_shardings = train_state_shardings(
        abstract_params, param_shardings, tx, mesh)

    self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
    self._train = jax.jit(
        functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                          num_microbatches=num_microbatches, z_loss=z_loss,
                          skip_nonfinite=skip_nonfinite, loss_chunk_size=loss_chunk_size),
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=(0,))
    self._eval = jax.jit(
        lambda params, batch: lm_loss_sums(model, params, batch, 0.0, loss_chunk_size),
        in_shardings=(param_shardings, self.batch_sharding),
        out_shardings=replicated)

  def _init_boxed(self, rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return self.model.init(rng, tokens)["params"]

  def _init_state(self, rng):
    params = nn.unbox(self._init_boxed(rng))
    return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

  def _context(self):
    return _MeshRules(self.mesh, self.rules)

  def init_state(self, rng: jax.Array) -> TrainState:
    with self._context():
      return self._init(rng)

  def train_step(self, state: TrainState, batch: Batch):
    with self._context():
      return self._train(state, batch)

  def eval_sums(self, params, batch: Batch) -> dict[str, jax.Array]:
    with self._context():
      return self._eval(params, batch)

  def shard_batch(self, local_batch: dict[str, np.ndarray]) -> Batch:
    return partitioning.global_batch(local_batch, self.mesh, self.rules)

  def lower_train_step(self, state, batch):
    """Lowered train step (for cost analysis and compile timing in benchmarks)."""
    with self._context():
      return self._train.lower(state, batch)


class _MeshRules:
  """Context: the mesh for sharding constraints plus the logical-axis rules."""

  def __init__(self, mesh, rules):
    self._mesh_cm = jax.set_mesh(mesh)
    self._rules_cm = nn.logical_axis_rules(rules)

  def __enter__(self):
    self._mesh_cm.__enter__()
    self._rules_cm.__enter__()

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    self._mesh_cm.__exit__(*exc)
