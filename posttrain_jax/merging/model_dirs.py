"""Merges of model directories: read, check one architecture, merge, write.

Applies the pure merges of `merging.interpolation` to model directories
(params_checkpoint runs/exports or reward_model directories): `load_models`
checks that every directory shares one architecture (layout-only settings such
as scan_layers or dtype may differ), the merge runs on the parameter trees and
`write_model` writes a model directory of the same kind, recording what was
merged with which weights. The merges are per layer in either layout
(`merging.leafwise`), so a scanned directory merges as its unscanned twin.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
from typing import Any

import jax
import numpy as np

from posttrain_jax.merging.interpolation import (average, liti, normalized_weights,
                                                 slerp_many)
from posttrain_jax.merging.leafwise import Rule
from posttrain_jax.merging.streaming import stream_merge
from posttrain_jax.models import ModelConfig, params_checkpoint
from posttrain_jax.rl import reward_model

# Fields that change the parameter layout or the compute, not the function.
_LAYOUT_FIELDS = ("scan_layers", "remat_policy", "dtype", "attention_impl",
                  "dpa_implementation")


@dataclasses.dataclass
class LoadedModel:
  directory: str
  config: ModelConfig
  params: Any
  is_reward_model: bool


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
  neutral = {f: getattr(a, f) for f in _LAYOUT_FIELDS}
  return dataclasses.replace(b, **neutral) == a


def check_models(directories: Sequence[str]) -> tuple[ModelConfig, bool]:
  """(ModelConfig, is_reward_model) shared by all directories, or one clear ValueError
  naming the directories of different kinds or architectures."""
  if not directories:
    raise ValueError("Nothing to merge: give at least one model directory.")
  configs = []
  for d in directories:
    configs.append(params_checkpoint.model_config_of(params_checkpoint.locate(d)))
  kinds = [reward_model.is_reward_model(d) for d in directories]
  if len(set(kinds)) > 1:
    names = ", ".join(f"{d} ({'reward model' if k else 'policy'})"
                      for d, k in zip(directories, kinds))
    raise ValueError(f"Cannot merge reward models with policies: {names}.")
  cfg = configs[0]
  for d, other in zip(directories[1:], configs[1:]):
    if not _same_architecture(cfg, other):
      diff = [f"{f.name}: {getattr(cfg, f.name)!r} vs {getattr(other, f.name)!r}"
              for f in dataclasses.fields(cfg)
              if getattr(cfg, f.name) != getattr(other, f.name)]
      raise ValueError(f"Cannot merge {directories[0]} with {d}: different "
                       f"architectures ({'; '.join(diff)}).")
  return cfg, kinds[0]


def load_models(directories: Sequence[str]) -> list[LoadedModel]:
  """Host (numpy) parameters of model directories, all in model 0's layout."""
  cfg, is_rm = check_models(directories)
  kinds = [is_rm] * len(directories)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  out = []
  for d, is_rm in zip(directories, kinds):
    if is_rm:
      abstract = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
          reward_model.abstract_params(cfg))
      params = reward_model.restore_reward_params(d, abstract, cfg)
    else:
      params = params_checkpoint.restore_params(
          d, params_checkpoint.abstract_params(cfg, device), cfg)
    out.append(LoadedModel(d, cfg, jax.tree.map(np.asarray, params), is_rm))
  return out


def write_model(output: str, like: LoadedModel, params, info: dict[str, Any]) -> LoadedModel:
  """Writes `params` as a model directory of `like`'s kind and architecture."""
  if like.is_reward_model:
    reward_model.save_reward_model(output, params, like.config, info=info)
  else:
    metadata = params_checkpoint.read_hf_metadata(like.directory)
    params_checkpoint.save(output, params, like.config, hf_metadata=metadata,
                           header=f"Merged ({info['merge']}) from "
                                  f"{', '.join(info['merged_from'])}")
  return LoadedModel(os.path.abspath(output), like.config, params, like.is_reward_model)


def merge_model_dirs(directories: Sequence[str], output: str,
                     weights: Sequence[float] | None = None) -> LoadedModel:
  """WARM: the (weighted) average of model directories, written to `output`."""
  models = load_models(directories)
  w = normalized_weights(weights, len(models))
  info = {"merged_from": [os.path.abspath(d) for d in directories],
          "merge_weights": w.tolist(), "merge": "average"}
  return write_model(output, models[0], average([m.params for m in models], w), info)


def slerp_model_dirs(init: str, directories: Sequence[str], output: str,
                     lam: float | None = None) -> LoadedModel:
  """WARP: recursive SLERP of model directories around `init`, written to `output`."""
  models = load_models([init, *directories])
  info = {"merged_from": [os.path.abspath(d) for d in directories],
          "init": os.path.abspath(init), "merge": "slerp", "lambda": lam}
  merged = slerp_many(models[0].params, [m.params for m in models[1:]], lam)
  return write_model(output, models[1], merged, info)


def liti_model_dirs(init: str, merged: str, output: str, eta: float) -> LoadedModel:
  """WARP: (1 - eta) init + eta merged, written to `output`."""
  models = load_models([init, merged])
  info = {"merged_from": [os.path.abspath(merged)], "init": os.path.abspath(init),
          "merge": "liti", "eta": eta}
  return write_model(output, models[1], liti(models[0].params, models[1].params, eta), info)


def stream_merge_dirs(rule: Rule, directories: Sequence[str], output: str, info: dict[str, Any],
                      init: str | None = None) -> LoadedModel:
  """Merges directories with a per-tensor `rule` leaf by leaf from their orbax
  checkpoints (merging.streaming) and writes a model directory of their kind.

  The init (when the rule takes one) must be of the same architecture; a policy
  init (e.g. the SFT model) of reward models is rejected: give the reward model
  the fine-tunings started from.
  """
  cfg, is_rm = check_models(([init] if init else []) + list(directories))
  params = stream_merge(rule, directories, init)
  like = LoadedModel(os.path.abspath(directories[0]), cfg, None, is_rm)
  info = {"merged_from": [os.path.abspath(d) for d in directories],
          **({"init": os.path.abspath(init)} if init else {}), **info}
  return write_model(output, like, params, info)
