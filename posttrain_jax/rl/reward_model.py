"""Reward model: a Gemma-2 backbone with a scalar linear head, and its model dirs.

r(x, y) = w . dropout(h_last), where h_last is the backbone's final-normed
hidden state at the last non-pad token of the row prompt + response (the
last position with segment_ids > 0) and w the head's kernel ("embed" axis,
no bias: a bias cancels in the Bradley-Terry loss). As in WARM (Ramé et al.,
2024, arXiv 2401.12187) the backbone is initialised from the SFT model and
the head by linear probing (reward_training). Dropout is applied to h_last
only (the backbone has none).

Parameters: {"backbone": <Transformer params>, "head": {"kernel": [d, 1]}},
so a policy/SFT model directory initialises the backbone. A reward model
directory is a params_checkpoint model directory (checkpoint/ + model.gin of
the backbone's ModelConfig) plus `reward_model.json`, the marker that tells
it apart from a policy; its "tokenizer" entry ({"path", "sha256"} of the
SentencePiece model, `tokenizer_record`) names the tokenizer whose ids it
scores, when known.

A reward model scores token ids: it fits a policy only if both use the same
vocabulary (`check_fits_policy`: equal vocab_size, and equal tokenizers where
both sides record one). A smaller reward-model vocabulary would read ids past
its embedding table as NaN scores.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain_jax.core import partitioning
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint

MARKER = "reward_model.json"


class RewardModel(nn.Module):
  """Transformer backbone + linear head on the last non-pad token; scores [b]."""

  config: ModelConfig
  head_dropout: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, deterministic: bool = True):
    _, hidden = Transformer(self.config, name="backbone")(
        tokens, positions=positions, segment_ids=segment_ids, return_hidden=True)
    length = tokens.shape[1]
    if segment_ids is None:
      last = jnp.full((tokens.shape[0],), length - 1, jnp.int32)
    else:
      real = segment_ids > 0
      last = length - 1 - jnp.argmax(real[:, ::-1], axis=1)  # last real position
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    h = nn.with_logical_constraint(h.astype(jnp.float32), ("batch", "embed"))
    h = nn.Dropout(self.head_dropout)(h, deterministic=deterministic)
    score = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              ("embed", None)),
                     name="head")(h)
    return score[:, 0]


def init_boxed(model: RewardModel, rng: jax.Array):
  """Boxed (logically partitioned) parameters, for partitioning.params_and_shardings."""
  return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(config: ModelConfig, mesh: jax.sharding.Mesh | None = None,
                    rules=partitioning.DEFAULT_RULES):
  """ShapeDtypeStructs of RewardModel params (with the rules' shardings on a mesh)."""
  model = RewardModel(config)
  if mesh is None:
    return nn.unbox(jax.eval_shape(lambda: init_boxed(model, jax.random.key(0))))
  abstract, shardings = partitioning.params_and_shardings(
      lambda: init_boxed(model, jax.random.key(0)), mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def is_reward_model(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, MARKER))


def save_reward_model(directory: str, params, config: ModelConfig, *,
                      head_dropout: float = 0.0, info: dict[str, Any] | None = None) -> None:
  """Writes DIR/checkpoint, DIR/model.gin (backbone ModelConfig) and DIR/reward_model.json."""
  params_checkpoint.save(directory, params, config,
                         header="Reward model backbone (see reward_model.json).")
  if jax.process_index() == 0:
    marker = {"kind": "reward_model",
              "score": "linear head on the last non-pad token's final hidden state",
              "head_dropout": head_dropout, **(info or {})}
    with open(os.path.join(os.path.abspath(directory), MARKER), "w") as f:
      json.dump(marker, f, indent=2, sort_keys=True)
      f.write("\n")


def read_reward_info(directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, MARKER)) as f:
    return json.load(f)


TOKENIZER = "tokenizer"
HF_TOKENIZER = os.path.join(params_checkpoint.HF_FILES, "tokenizer.model")


def tokenizer_record(path: str) -> dict[str, str]:
  """{"path", "sha256"} of a tokenizer file (a SentencePiece .model)."""
  path = os.path.abspath(path)
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return {"path": path, "sha256": digest.hexdigest()}


def recorded_tokenizer(directory: str) -> dict[str, str] | None:
  """The tokenizer a model directory records: reward_model.json's "tokenizer",
  else the HF import's hf_files/tokenizer.model (None: none recorded)."""
  if is_reward_model(directory):
    record = read_reward_info(directory).get(TOKENIZER)
    if record:
      return record
  hf = os.path.join(directory, HF_TOKENIZER)
  return tokenizer_record(hf) if os.path.isfile(hf) else None


def task_tokenizer(task_name: str) -> dict[str, str] | None:
  """The tokenizer record of a registered seqio task's SentencePiece vocabulary
  (None: no such task, or no vocabulary file)."""
  from posttrain_jax.data import vocab  # pylint: disable=g-import-not-at-top,unused-import  # TF lives in data/
  import seqio  # pylint: disable=g-import-not-at-top
  try:
    task = seqio.get_mixture_or_task(task_name)
  except ValueError:
    return None
  for feature in task.output_features.values():
    path = getattr(feature.vocabulary, "sentencepiece_model_file", None)
    if path and os.path.isfile(path):
      return tokenizer_record(path)
  return None


def check_fits_policy(directory: str, vocab_size: int,
                      tokenizer: dict[str, str] | None = None,
                      policy: str = "the policy") -> None:
  """Raises a one-line ValueError if the reward model in `directory` cannot
  score `policy`'s tokens: another vocab_size, or (where both are recorded)
  another tokenizer."""
  if not is_reward_model(directory):
    return  # restore_reward_params names the problem
  rm_vocab = params_checkpoint.model_config_of(params_checkpoint.locate(directory)).vocab_size
  fix = ("Fix: use a reward model trained on the policy's vocabulary (train_reward_model "
         "from the policy's SFT model), or the policy that goes with this reward model.")
  if rm_vocab != vocab_size:
    raise ValueError(
        f"Reward model {directory} has vocab_size {rm_vocab} but {policy} has vocab_size "
        f"{vocab_size}: it cannot score the policy's samples (ids it does not know score "
        f"NaN). {fix}")
  mine = recorded_tokenizer(directory)
  if mine and tokenizer and mine.get("sha256") != tokenizer.get("sha256"):
    raise ValueError(
        f"Reward model {directory} was trained with the tokenizer {mine.get('path')} "
        f"(sha256 {str(mine.get('sha256'))[:12]}) but {policy} uses "
        f"{tokenizer.get('path')} (sha256 {str(tokenizer.get('sha256'))[:12]}): the same "
        f"ids are different text. {fix}")


def restore_reward_params(directory: str, abstract, config: ModelConfig):
  """Restores a reward model directory onto `abstract`'s shardings."""
  if not is_reward_model(directory):
    raise ValueError(
        f"{directory} is not a reward model directory (no {MARKER}). Fix: pass a "
        "directory written by reward training or `tools/merge.py average` of reward "
        "models; a policy directory can only initialise a reward model's backbone.")
  return params_checkpoint.restore_params(directory, abstract, config)


class RewardFunction:
  """r(tokens, positions, segment_ids) -> [b] float32 over restored params.

  `apply(params, tokens, positions, segment_ids)` is the pure function (use it
  inside another jit with `params`); calling the object runs the jitted closure
  under the mesh and logical-axis rules.
  """

  def __init__(self, config: ModelConfig, params, mesh: jax.sharding.Mesh,
               rules=partitioning.DEFAULT_RULES):
    self.config, self.params, self.mesh, self.rules = config, params, mesh, rules
    self.model = RewardModel(config)
    self._jit = jax.jit(self.apply)

  def apply(self, params, tokens, positions=None, segment_ids=None) -> jax.Array:
    return self.model.apply({"params": params}, tokens, positions, segment_ids)

  def context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
    with self.context():
      return self._jit(self.params, tokens, positions, segment_ids)


def load_reward_fn(directory: str, mesh: jax.sharding.Mesh | None = None,
                   rules=partitioning.DEFAULT_RULES) -> RewardFunction:
  """The reward model in `directory` as a callable [b, T] x 3 -> [b] float32.

  Parameters are sharded with the logical rules on `mesh` (default: every
  device on the data axis). The ModelConfig comes from DIR/model.gin.
  """
  location = params_checkpoint.locate(directory)
  config = params_checkpoint.model_config_of(location)
  mesh = mesh if mesh is not None else partitioning.create_mesh({"data": -1})
  params = restore_reward_params(directory, abstract_params(config, mesh, rules), config)
  return RewardFunction(config, params, mesh, rules)


RewardFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
__all__ = ["RewardModel", "RewardFunction", "load_reward_fn", "save_reward_model",
           "is_reward_model", "abstract_params", "restore_reward_params", "MARKER",
           "check_fits_policy", "tokenizer_record", "recorded_tokenizer"]
