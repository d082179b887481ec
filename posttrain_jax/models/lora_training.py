"""LoRA training: the partitioned LM step over adapters only, the base frozen beside them.

`LoraTrainer` has the `core.trainer.Trainer` interface the jobs use
(init_state, train_step, eval_sums, shard_batch, abstract_state,
state_shardings), but its TrainState holds the adapters (models/lora.py) and
their optimizer state only: gradients are taken with respect to the adapters,
and the base parameters are a separate, sharded argument of the jitted step
(no gradient, no optimizer state, never copied). Checkpoints of a LoRA run
therefore hold the adapters; the base comes from the run's
initial_checkpoint (or the seed's random init), recorded in
run_dir/lora.json (`write_run_info`).

`lora_objective(loss_fn)` turns any `optimizer_step` loss over full params
into one over adapters with aux = (base, aux): the same wrapper serves other
objectives (e.g. DPO with the base as its reference: the reference "with the
adapters off" is the base tree itself).

Dropout: each step's "dropout" rng is fold_in(key(seed), step); the
microbatches of one step share it (the same mask pattern per microbatch row
position).
"""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from posttrain_jax.core import partitioning
from posttrain_jax.core.losses import chunked_cross_entropy_sums, cross_entropy_sums
from posttrain_jax.core.trainer import (LossFn, TrainState, _MeshRules, _forward,
                                         optimizer_step, train_state_shardings)
from posttrain_jax.models import lora as lora_lib
from posttrain_jax.models import params_checkpoint
from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.gemma2 import Transformer

RUN_INFO = "lora.json"


def lora_objective(loss_fn: LossFn) -> LossFn:
  """loss_fn(params, batch, aux) -> loss over adapters: aux = (base, inner aux)."""
  def adapters_loss(adapters, batch, aux):
    base, inner = aux
    return loss_fn(lora_lib.combine(base, adapters), batch, inner)
  return adapters_loss


def lm_sums(model: nn.Module, params, batch, z_loss: float = 0.0,
            loss_chunk_size: int | None = None, rngs=None):
  """core.trainer.lm_loss_sums with apply rngs (the adapters' dropout)."""
  if loss_chunk_size is None:
    logits = _forward(model, params, batch, rngs=rngs)
    return cross_entropy_sums(logits, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"], z_loss)
  hidden = _forward(model, params, batch, hidden_only=True, rngs=rngs)
  head = functools.partial(model.apply, {"params": params}, method="hidden_to_logits")
  return chunked_cross_entropy_sums(hidden, batch["decoder_target_tokens"],
                                    batch["decoder_loss_weights"], head=head,
                                    chunk_size=loss_chunk_size, z_loss=z_loss)


def base_boxed(model_config: ModelConfig):
  """Abstract boxed base params (logical axis names, no allocation)."""
  init = Transformer(model_config).init
  return jax.eval_shape(lambda: init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def check_targets(model_config: ModelConfig, lora: lora_lib.LoraConfig) -> list[str]:
  """The adapted weights' paths; ValueError for a pattern that matches none."""
  return sorted(lora_lib.targeted(base_boxed(model_config), lora))


class LoraTrainer:
  """Jitted, partitioned LM steps of a LoRA run (adapters trained, base frozen)."""

  def __init__(self, model_config: ModelConfig, lora: lora_lib.LoraConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               mesh: jax.sharding.Mesh, rules=partitioning.DEFAULT_RULES,
               num_microbatches: int = 1, z_loss: float = 0.0, skip_nonfinite: bool = True,
               loss_chunk_size: int | None = None, seed: int = 0):
    self.model_config, self.lora = model_config, lora
    self.base_model = Transformer(model_config)
    self.model = Transformer(model_config, lora=lora)
    self.tx, self.schedule, self.mesh, self.rules = tx, schedule, mesh, rules
    self.batch_sharding = partitioning.batch_sharding(mesh, rules)
    boxed = base_boxed(model_config)
    self.adapted = sorted(lora_lib.targeted(boxed, lora))
    tokens = jnp.zeros((1, 1), jnp.int32)
    self._init_base_boxed = lambda rng: self.base_model.init(rng, tokens)["params"]
    base_abstract, self.base_shardings = partitioning.params_and_shardings(
        lambda: self._init_base_boxed(jax.random.key(0)), mesh, rules)
    self.abstract_base = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        base_abstract, self.base_shardings)
    self._init_adapters_boxed = lambda rng: lora_lib.init_adapters(rng, boxed, lora)
    adapters_abstract, self.param_shardings = partitioning.params_and_shardings(
        lambda: self._init_adapters_boxed(jax.random.key(0)), mesh, rules)
    self.abstract_state, self.state_shardings = train_state_shardings(
        adapters_abstract, self.param_shardings, tx, mesh)
    self.base = None
    replicated = partitioning.replicated(mesh)

    def loss_fn(params, batch, rng):
      rngs = {"dropout": rng} if lora.dropout else None
      sums = lm_sums(self.model, params, batch, z_loss, loss_chunk_size, rngs)
      return sums["loss"], {"loss": sums["cross_entropy"], "z_loss": sums["z_loss"],
                            "accuracy": sums["correct"], "weight": sums["weight"]}

    def step(state, batch, base):
      rng = jax.random.fold_in(jax.random.key(seed), state.step)
      return optimizer_step(state, batch, (base, rng), loss_fn=lora_objective(loss_fn),
                            tx=tx, schedule=schedule, num_microbatches=num_microbatches,
                            skip_nonfinite=skip_nonfinite)

    def init_state(rng):
      adapters = nn.unbox(self._init_adapters_boxed(jax.random.fold_in(rng, 1)))
      return TrainState(jnp.zeros((), jnp.int32), adapters, tx.init(adapters))

    self._init = jax.jit(init_state, out_shardings=self.state_shardings)
    self._init_base = jax.jit(lambda rng: nn.unbox(self._init_base_boxed(rng)),
                              out_shardings=self.base_shardings)
    self._train = jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding,
                                              self.base_shardings),
                          out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval = jax.jit(
        lambda adapters, batch, base: lm_sums(self.model, lora_lib.combine(base, adapters),
                                              batch, 0.0, loss_chunk_size),
        in_shardings=(self.param_shardings, self.batch_sharding, self.base_shardings),
        out_shardings=replicated)
    self._merge = jax.jit(lambda base, adapters: lora_lib.merge(base, adapters, lora),
                          out_shardings=self.base_shardings)

  def _context(self):
    return _MeshRules(self.mesh, self.rules)

  def load_base(self, initial_checkpoint: str | None, seed: int = 0) -> str | None:
    """Sets the frozen base: initial_checkpoint's params (a model or run
    directory, either layout) or the random init of `seed`. Returns the
    checkpoint's absolute path (None for the random init)."""
    if initial_checkpoint:
      if not os.path.exists(initial_checkpoint):
        raise FileNotFoundError(f"initial_checkpoint {initial_checkpoint} does not exist.")
      self.base = params_checkpoint.restore_params(initial_checkpoint, self.abstract_base,
                                                   self.model_config)
      return os.path.abspath(initial_checkpoint)
    with self._context():
      self.base = self._init_base(jax.random.key(seed))
    return None

  def set_base(self, params) -> None:
    """Sets the frozen base from a params tree (put on the base's shardings)."""
    self.base = jax.device_put(params, self.base_shardings)

  def init_state(self, rng: jax.Array) -> TrainState:
    """Fresh adapters (B = 0: the model starts as the base) at step 0."""
    with self._context():
      return self._init(rng)

  def _need_base(self):
    if self.base is None:
      raise ValueError("LoraTrainer: no base parameters; call load_base first.")
    return self.base

  def train_step(self, state: TrainState, batch):
    base = self._need_base()
    with self._context():
      return self._train(state, batch, base)

  def eval_sums(self, adapters, batch):
    base = self._need_base()
    with self._context():
      return self._eval(adapters, batch, base)

  def merged_params(self, adapters):
    """The base with the adapters merged in (W + alpha/r A B), on the base's shardings."""
    base = self._need_base()
    with self._context():
      return self._merge(base, adapters)

  def shard_batch(self, local_batch):
    return partitioning.global_batch(local_batch, self.mesh, self.rules)

  def summary(self) -> str:
    trainable = lora_lib.count(self.abstract_state.params)
    total = lora_lib.count(self.abstract_base)
    return (f"LoRA rank {self.lora.rank}, alpha {self.lora.alpha:g} on "
            f"{len(self.adapted)} weights: {trainable:,} trainable params "
            f"({100.0 * trainable / total:.2f}% of the base's {total:,})")


def run_info(lora: lora_lib.LoraConfig, initial_checkpoint: str | None, seed: int,
             adapted: list[str]) -> dict:
  """What run_dir/lora.json records: the settings, the adapted weights and the
  base (a pointer: initial_checkpoint's absolute path, or null and the seed
  of the random init)."""
  base = os.path.abspath(initial_checkpoint) if initial_checkpoint else None
  return {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
          "targets": list(lora.targets), "base": base, "seed": None if base else seed,
          "adapted": adapted}


def check_run_info(run_dir: str, info: dict) -> bool:
  """Whether run_dir/lora.json exists; ValueError if it records other settings
  or another base (a resumed LoRA run must keep both)."""
  path = os.path.join(run_dir, RUN_INFO)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  diffs = [f"{k}: saved={saved.get(k)!r}, now={v!r}" for k, v in info.items()
           if saved.get(k) != v]
  if diffs:
    raise ValueError(f"{path} records another LoRA run ({'; '.join(diffs)}). Fix: use "
                     "the run's settings and base, or a new run_dir.")
  return True


def write_run_info(run_dir: str, info: dict) -> None:
  """Writes run_dir/lora.json (process 0, atomically) unless it exists."""
  path = os.path.join(run_dir, RUN_INFO)
  if not check_run_info(run_dir, info) and jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(info, f, indent=1)
    os.replace(tmp, path)


def read_run_info(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, RUN_INFO)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)

