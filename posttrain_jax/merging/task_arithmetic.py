"""Task arithmetic (Ilharco et al., 2023, "Editing Models with Task
Arithmetic", arXiv 2212.04089):

  theta = theta_0 + sum_i lambda_i (theta_i - theta_0),

with task vectors tau_i = theta_i - theta_0 of M fine-tunings of a shared
init theta_0. lambda_i = 1/M gives the uniform average of the theta_i (WARM);
sum_i lambda_i > 1 extrapolates. TIES (`merging.ties`) and DARE
(`merging.dare`) reduce to it with nothing trimmed / dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from posttrain_jax.merging.leafwise import as_float64, merge_leaves


def task_lambdas(lambdas: float | Sequence[float] | None, count: int) -> np.ndarray:
  """lambda_i: one scalar for every model, one per model, or 1/M by default."""
  if count < 1:
    raise ValueError("Nothing to merge: give at least one fine-tuned model.")
  if lambdas is None:
    return np.full((count,), 1.0 / count)
  lam = np.asarray(lambdas, np.float64).reshape(-1)
  if lam.size == 1:
    return np.full((count,), float(lam[0]))
  if lam.size != count:
    raise ValueError(f"Got {lam.size} lambdas for {count} models; give one lambda per "
                     "model or a single one for all.")
  return lam


def task_arithmetic_rule(lambdas: np.ndarray):
  """The per-tensor rule of `task_arithmetic` (see merging.leafwise)."""
  def rule(path, init, leaves):
    del path
    t0 = as_float64(init)
    out = t0 + sum(float(l) * (as_float64(x) - t0) for l, x in zip(lambdas, leaves))
    return out.astype(np.asarray(leaves[0]).dtype)
  return rule


def task_arithmetic(init: Any, params_list: Sequence[Any],
                    lambdas: float | Sequence[float] | None = None):
  """theta_0 + sum_i lambda_i (theta_i - theta_0), tensor by tensor.

  Args:
    init: theta_0, the shared initialisation (e.g. the SFT model).
    params_list: the M fine-tuned trees theta_i (same structure and shapes).
    lambdas: one scaling for all task vectors, one per model, or None (1/M).
  """
  lam = task_lambdas(lambdas, len(params_list))
  return merge_leaves(task_arithmetic_rule(lam), params_list, init)
