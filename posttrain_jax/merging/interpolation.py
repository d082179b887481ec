"""Weight-space merges of fine-tuned models (reward models or policies).

`average` is WARM's merge (Ramé et al., 2024, "WARM: On the Benefits of Weight
Averaged Reward Models", arXiv 2401.12187, Eq. 2):

  phi_WARM = sum_i lambda_i phi_i,   lambda_i = 1/M by default,

over M models fine-tuned from a shared initialisation (linear mode
connectivity makes the average a good model). For a reward model that is
linear in its parameters (a head on fixed features) the averaged model's
prediction equals the average of the predictions exactly.

`slerp`, `slerp_many` and `liti` are WARP's merges (Ramé et al., 2024, "WARP:
On the Benefits of Weight Averaged Rewarded Policies", arXiv 2406.16768,
Sec. 3): spherical interpolation of task vectors delta_m = theta_m - theta_init
tensor by tensor, recursive for M > 2, and interpolation towards the init.
"Tensor" is one layer's tensor in either parameter layout: a scanned leaf's
layers each get their own angle (`merging.leafwise`).

All merges here are pure (pytrees in, pytree out); `merging.model_dirs`
applies them to model directories.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from posttrain_jax.merging.leafwise import layer_slices, merge_leaves, scanned_leaves

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
  """sum_i lambda_i params_i leaf by leaf (host float64, cast back to each dtype).

  Args:
    params_list: M parameter pytrees of identical structure and shapes.
    weights: M non-negative weights (normalised to sum 1); default uniform.
  """
  w = normalized_weights(weights, len(params_list))
  _check_same_structure(params_list)
  if len(params_list) == 1:
    return params_list[0]

  def combine(*leaves):
    acc = sum(float(wi) * np.asarray(x, np.float64) for wi, x in zip(w, leaves))
    return acc.astype(np.asarray(leaves[0]).dtype)
  return jax.tree.map(combine, *params_list)


def _slerp_leaf(t0, t1, t2, lam: float, eps: float):
  dtype = np.asarray(t1).dtype
  t0, t1, t2 = (np.asarray(t, np.float64) for t in (t0, t1, t2))
  d1, d2 = t1 - t0, t2 - t0
  n1, n2 = np.linalg.norm(d1), np.linalg.norm(d2)
  lerp = t0 + (1.0 - lam) * d1 + lam * d2
  if n1 < eps or n2 < eps:
    return lerp.astype(dtype)
  omega = np.arccos(np.clip(np.vdot(d1, d2) / (n1 * n2), -1.0, 1.0))
  if np.sin(omega) < eps:  # (anti)parallel task vectors: SLERP -> LERP
    return lerp.astype(dtype)
  out = t0 + (np.sin((1.0 - lam) * omega) * d1 + np.sin(lam * omega) * d2) / np.sin(omega)
  return out.astype(dtype)


def slerp(init, params_1, params_2, lam: float = 0.5, eps: float = 1e-6):
  """WARP's SLERP of two fine-tunings of `init`, tensor by tensor:

    slerp = theta_init + sin((1 - lam) Omega) / sin(Omega) * delta_1
                       + sin(lam Omega) / sin(Omega) * delta_2,

  delta_m = theta_m - theta_init, Omega = angle(delta_1, delta_2) of that
  tensor (of each layer, in scanned leaves too). lam = 0 gives theta_1,
  lam = 1 theta_2; equal-norm task vectors keep their norm. Falls back to
  LERP theta_init + (1 - lam) delta_1 + lam delta_2 when sin(Omega) < eps or
  a task vector is ~0. Computed in float64 on the host, returned in each
  leaf's dtype.
  """
  if not 0.0 <= lam <= 1.0:
    raise ValueError(f"SLERP lambda must be in [0, 1], got {lam}.")
  _check_same_structure([init, params_1, params_2])
  rule = lambda path, t0, leaves: _slerp_leaf(t0, leaves[0], leaves[1], lam, eps)
  return merge_leaves(rule, [params_1, params_2], init)


def slerp_many(init, params_list: Sequence[Any], lam: float | None = None):
  """M >= 2 models: slerp_m = slerp(init, slerp_{m-1}, theta_m, 1/m) (WARP, not
  associative). `lam` (M = 2 only) overrides 1/2."""
  if len(params_list) < 2:
    raise ValueError(f"SLERP needs at least 2 models, got {len(params_list)}.")
  if lam is not None and len(params_list) != 2:
    raise ValueError("An explicit SLERP lambda applies to 2 models only; with more, "
                     "model m is merged in with lambda = 1/m.")
  merged = params_list[0]
  for m, params in enumerate(params_list[1:], 2):
    merged = slerp(init, merged, params, 1.0 / m if lam is None else lam)
  return merged


def liti(init, merged, eta: float = 0.3):
  """WARP's LITI step: (1 - eta) theta_init + eta theta_merged (eta = 0: init, 1: merged)."""
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"LITI eta must be in [0, 1], got {eta}.")
  return average([init, merged], [1.0 - eta, eta]) if 0.0 < eta < 1.0 else (
      merged if eta == 1.0 else init)


def task_vector_angles(init, params_1, params_2, eps: float = 1e-6) -> dict[str, float]:
  """The angle Omega (degrees) between the task vectors delta_1 = theta_1 - init
  and delta_2 = theta_2 - init of every parameter tensor, keyed by its path:

    Omega = arccos(<delta_1, delta_2> / (|delta_1| |delta_2|)),

  the angle `slerp` uses for that tensor (WARP, arXiv 2406.16768, Sec. 3.2:
  ~90 degrees between the task vectors of two RL runs). NaN where a task
  vector is ~0 (|delta| < eps: SLERP falls back to LERP there). Scanned
  leaves give one angle per layer, keyed by the layer's unscanned path, so
  both layouts give the same dict.
  """
  _check_same_structure([init, params_1, params_2])
  flat = [jax.tree_util.tree_flatten_with_path(t)[0] for t in (init, params_1, params_2)]
  scans = scanned_leaves(path for path, _ in flat[0])
  out = {}
  for (path, t0), (_, t1), (_, t2) in zip(*flat):
    for key, parts in layer_slices(path, scans.get(jax.tree_util.keystr(path)), [t0, t1, t2]):
      t0_, t1_, t2_ = (np.asarray(t, np.float64) for t in parts)
      d1, d2 = (t1_ - t0_).ravel(), (t2_ - t0_).ravel()
      n1, n2 = np.linalg.norm(d1), np.linalg.norm(d2)
      if n1 < eps or n2 < eps:
        out[key] = float("nan")
        continue
      cos = np.clip(np.dot(d1, d2) / (n1 * n2), -1.0, 1.0)
      out[key] = float(np.degrees(np.arccos(cos)))
  return out
