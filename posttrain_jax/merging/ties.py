"""TIES-merging (Yadav et al., 2023, "TIES-Merging: Resolving Interference
When Merging Models", arXiv 2306.01708, Alg. 1), tensor by tensor:

  tau_i   = theta_i - theta_0                                  task vectors
  trim:   tau^_i = tau_i on its top-k% magnitudes, 0 elsewhere  (k = density)
  elect:  gamma  = sgn(sum_i tau^_i)
  merge:  tau_m  = sum_{i in A} tau^_i / |A|,  A = {i : tau^_i != 0, sgn(tau^_i) = gamma}
  theta   = theta_0 + lambda tau_m.

With density 1 and without sign election (or with task vectors that agree in
sign), tau_m is the mean task vector and TIES is task arithmetic with
lambda_i = lambda / M. The paper keeps k = 20% and tunes lambda (~1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from posttrain_jax.merging.leafwise import as_float64, merge_leaves


def trim(tau: np.ndarray, density: float) -> np.ndarray:
  """tau on its ceil(density * n) largest magnitudes, 0 elsewhere (ties kept by order)."""
  if density >= 1.0:
    return tau
  flat = tau.reshape(-1)
  k = int(np.ceil(density * flat.size))
  if k <= 0:
    return np.zeros_like(tau)
  keep = np.argpartition(-np.abs(flat), k - 1)[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(tau.shape)


def ties_rule(density: float, lam: float, elect_sign: bool = True):
  """The per-tensor rule of `ties` (see merging.leafwise)."""
  def rule(path, init, leaves):
    del path
    t0 = as_float64(init)
    taus = np.stack([trim(as_float64(x) - t0, density) for x in leaves])
    if elect_sign:
      gamma = np.sign(taus.sum(0))
      selected = (taus != 0) & (np.sign(taus) == gamma)
    else:
      selected = taus != 0
    count = selected.sum(0)
    tau_m = np.where(selected, taus, 0.0).sum(0) / np.maximum(count, 1)
    return (t0 + lam * tau_m).astype(np.asarray(leaves[0]).dtype)
  return rule


def ties(init: Any, params_list: Sequence[Any], density: float = 0.2, lam: float = 1.0,
         elect_sign: bool = True):
  """TIES merge of M fine-tunings of `init` (trim, elect sign, disjoint mean).

  Args:
    init: theta_0, the shared initialisation.
    params_list: the M fine-tuned trees.
    density: fraction k of each task vector's entries kept (per tensor), in (0, 1].
    lam: scaling of the merged task vector.
    elect_sign: False skips the sign election (mean over the kept entries).
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f"TIES density must be in (0, 1], got {density}.")
  return merge_leaves(ties_rule(density, lam, elect_sign), params_list, init)
