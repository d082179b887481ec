"""Weight-space merges of fine-tuned models (reward models or policies).

`average` is WARM's merge (Ramé et al., 2024, "WARM: On the Benefits of Weight
Averaged Reward Models", arXiv 2401.12187, Eq. 2):

  phi_WARM = sum_i lambda_i phi_i,   lambda_i = 1/M by default,

over M models fine-tuned from a shared initialisation (linear mode
connectivity makes the average a good model). For a reward model that is
linear in its parameters (a head on fixed features) the averaged model's
prediction equals the average of the predictions exactly. WARP's SLERP and
LITI merges (Ramé et al., 2024, arXiv 2406.16768) will live here too.

`average` is pure (pytrees in, pytree out); `merge_model_dirs` reads model
directories (params_checkpoint / reward_model layouts), checks that they
share one architecture, merges and writes a model directory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import os
from typing import Any

import jax
import numpy as np

from posttrain_jax import params_checkpoint, reward_model
from posttrain_jax.models import ModelConfig

# Fields that change the parameter layout or the compute, not the function.
_LAYOUT_FIELDS = ("scan_layers", "remat_policy", "dtype")


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}


def _check_same_structure(params_list: Sequence[Any]) -> None:
  first = _shapes(params_list[0])
  for i, other in enumerate(params_list[1:], 1):
    shapes = _shapes(other)
    problems = [f"{k}: model 0 has {first[k]}, model {i} has {shapes[k]}"
                for k in first if k in shapes and first[k] != shapes[k]]
    problems += [f"{k}: missing from model {i}" for k in first if k not in shapes]
    problems += [f"{k}: only in model {i}" for k in shapes if k not in first]
    if problems:
      raise ValueError(
          f"Cannot merge: model {i}'s parameters differ from model 0's "
          f"({len(problems)} problem(s)): " + "; ".join(problems[:6]) +
          ". Fix: merge models of one architecture fine-tuned from a shared init.")


def normalized_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
  """lambda_i: uniform 1/M, or the given non-negative weights divided by their sum."""
  if count < 1:
    raise ValueError("Nothing to merge: give at least one model.")
  if weights is None:
    return np.full((count,), 1.0 / count, np.float64)
  w = np.asarray(weights, np.float64)
  if w.shape != (count,):
    raise ValueError(f"Got {w.size} weights for {count} models; give one weight per model.")
  if np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"Merge weights must be non-negative with a positive sum, got "
                     f"{w.tolist()}.")
  return w / w.sum()


def average(params_list: Sequence[Any], weights: Sequence[float] | None = None):
  """sum_i lambda_i params_i leaf by leaf (in float32, cast back to each dtype).

  Args:
    params_list: M parameter pytrees of identical structure and shapes.
    weights: M non-negative weights (normalised to sum 1); default uniform.
  """
  w = normalized_weights(weights, len(params_list))
  _check_same_structure(params_list)
  if len(params_list) == 1:
    return params_list[0]

  def combine(*leaves):
    acc = sum(float(wi) * np.asarray(x, np.float32) if isinstance(x, np.ndarray)
              else float(wi) * x.astype(np.float32) for wi, x in zip(w, leaves))
    return acc.astype(leaves[0].dtype)
  return jax.tree.map(combine, *params_list)


@dataclasses.dataclass
class LoadedModel:
  directory: str
  config: ModelConfig
  params: Any
  is_reward_model: bool


def _same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
  neutral = {f: getattr(a, f) for f in _LAYOUT_FIELDS}
  return dataclasses.replace(b, **neutral) == a


def load_models(directories: Sequence[str]) -> list[LoadedModel]:
  """Host (numpy) parameters of model directories, all in model 0's layout."""
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


def merge_model_dirs(directories: Sequence[str], output: str,
                     weights: Sequence[float] | None = None,
                     merge: Callable[..., Any] = average) -> LoadedModel:
  """Merges model directories with `merge(params_list, weights)`; writes `output`."""
  models = load_models(directories)
  w = normalized_weights(weights, len(models))
  merged = merge([m.params for m in models], w)
  first = models[0]
  info = {"merged_from": [os.path.abspath(d) for d in directories],
          "merge_weights": w.tolist(), "merge": getattr(merge, "__name__", str(merge))}
  if first.is_reward_model:
    reward_model.save_reward_model(output, merged, first.config, info=info)
  else:
    metadata = params_checkpoint.read_hf_metadata(first.directory)
    params_checkpoint.save(output, merged, first.config, hf_metadata=metadata,
                           header=f"Merged ({info['merge']}) from "
                                  f"{', '.join(info['merged_from'])}")
  return LoadedModel(os.path.abspath(output), first.config, merged, first.is_reward_model)
