"""Where the distillation student's training sequences come from (the data source nu).

Tiapkin et al. 2025 (arXiv 2502.02671, Sec. 3) compare three sources of the
sequences y on which the token-level loss is computed:

* ``offline``: a fixed dataset of teacher generations, reused every epoch
  (written by tools/generate_dataset.py, read through a seqio task);
* ``online_teacher``: fresh samples y ~ pi_T(.|x) for every batch;
* ``online_student``: on-policy samples y ~ stopgrad(pi_S)(.|x) from the
  current student parameters (sampling is a separate program: no gradient
  flows through it).

`MixtureSource` draws the source of each step at random with fixed weights
(a GKD-style lambda mixture; Agarwal et al. 2024), reproducibly from
(seed, step). Every source yields global batches in the LM layout
(`trainer.Batch`), sharded over the mesh's batch axes, and has
get_state/set_state so a resumed run continues with the same data.

Online sources draw prompts from a prompt iterator (posttrain_jax.data.prompts:
``{"prompts": left-padded int32 [b, P], "prompt_lengths": [b]}``); the sampling
key of step t is fold_in(key(seed), t).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.core import partitioning
from posttrain_jax.core.trainer import Batch
from posttrain_jax.inference.sampling import SamplingConfig, generate
from posttrain_jax.models import ModelConfig, Transformer

SOURCES = ("offline", "online_teacher", "online_student")


class Source(Protocol):
  def next_batch(self, step: int, student_params, teacher_params) -> Batch: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


def sample_to_batch(sample) -> Batch:
  """A `sampling.SampleOutput` [b, P + N] -> LM batch [b, P + N - 1].

  Inputs are tokens[:, :-1] and targets tokens[:, 1:]; loss weights mark the
  generated targets; segment ids are 1 on prompt and generated tokens and 0 on
  the left padding and after a sequence's end, positions count real tokens.
  """
  tokens = sample.tokens
  segments = (sample.prompt_mask | sample.generated_mask).astype(jnp.int32)
  return {
      "decoder_input_tokens": tokens[:, :-1],
      "decoder_target_tokens": tokens[:, 1:],
      "decoder_loss_weights": sample.generated_mask[:, 1:].astype(jnp.float32),
      "decoder_segment_ids": segments[:, :-1],
      "decoder_positions": sample.positions[:, :-1],
  }


class OfflineSource:
  """A fixed dataset (e.g. teacher generations): numpy batches -> global batches."""

  def __init__(self, iterator, shard_batch: Callable[[dict], Batch],
               check: Callable[[dict], None] | None = None):
    self.iterator, self.shard_batch, self.check = iterator, shard_batch, check

  def next_batch(self, step, student_params, teacher_params) -> Batch:
    del step, student_params, teacher_params
    local = next(self.iterator)
    if self.check is not None:
      self.check(local)
    return self.shard_batch(local)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


class OnlineSource:
  """Fresh samples of the teacher or of the (stop-gradient) student per batch."""

  def __init__(self, which: str, model_config: ModelConfig, prompts,
               sampling: SamplingConfig, mesh: jax.sharding.Mesh,
               rules=partitioning.DEFAULT_RULES, seed: int = 0):
    if which not in ("online_teacher", "online_student"):
      raise ValueError(f"OnlineSource samples 'online_teacher' or 'online_student', "
                       f"not {which!r}.")
    self.which, self.prompts, self.mesh, self.rules = which, prompts, mesh, rules
    self.key = jax.random.key(seed)
    model = Transformer(model_config)
    _, param_shardings = partitioning.params_and_shardings(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
        mesh, rules)
    batch = partitioning.batch_sharding(mesh, rules)

    def sample(params, prompts, lengths, rng):
      return sample_to_batch(generate(model, params, prompts, lengths[:, 0], rng, sampling))
    self._sample = jax.jit(sample, in_shardings=(param_shardings, batch, batch, None),
                           out_shardings=batch)

  def next_batch(self, step, student_params, teacher_params) -> Batch:
    local = next(self.prompts)
    arrays = partitioning.global_batch(
        {"prompts": local["prompts"], "lengths": local["prompt_lengths"][:, None]},
        self.mesh, self.rules)
    params = teacher_params if self.which == "online_teacher" else student_params
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._sample(jax.lax.stop_gradient(params), arrays["prompts"],
                          arrays["lengths"], jax.random.fold_in(self.key, step))

  def get_state(self):
    return self.prompts.get_state()

  def set_state(self, state):
    self.prompts.set_state(state)


@dataclasses.dataclass
class MixtureSource:
  """Picks one source per step with probabilities `weights` (reproducible)."""

  sources: Mapping[str, Source]
  weights: Mapping[str, float]
  seed: int = 0

  def __post_init__(self):
    check_weights(self.weights)
    self.names = sorted(n for n, w in self.weights.items() if w > 0)
    p = np.array([self.weights[n] for n in self.names], np.float64)
    self.probs = p / p.sum()
    self.counts = {n: 0 for n in self.names}

  def choose(self, step: int) -> str:
    if len(self.names) == 1:
      return self.names[0]
    return self.names[np.random.default_rng([self.seed, step]).choice(
        len(self.names), p=self.probs)]

  def next_batch(self, step, student_params, teacher_params) -> Batch:
    name = self.choose(step)
    self.counts[name] += 1
    return self.sources[name].next_batch(step, student_params, teacher_params)

  def get_state(self):
    return {n: self.sources[n].get_state() for n in self.names}

  def set_state(self, state):
    for n in self.names:
      self.sources[n].set_state(state[n])


def check_weights(weights: Mapping[str, float]) -> None:
  """Validates a {source: weight} mixture."""
  if not weights:
    raise ValueError(f"No distillation data source given; choose from {SOURCES}, "
                     "e.g. sources={'offline': 1.0}.")
  for name, w in weights.items():
    if name not in SOURCES:
      raise ValueError(f"Unknown distillation data source {name!r}; choose from "
                       f"{SOURCES}.")
    if not w >= 0:
      raise ValueError(f"Source weight of {name!r} must be >= 0, got {w}.")
  if sum(weights.values()) <= 0:
    raise ValueError(f"Source weights {dict(weights)} sum to 0; give one a positive weight.")
