"""DARE (Yu et al., 2023, "Language Models are Super Mario: Absorbing
Abilities from Homologous Models as a Free Lunch", arXiv 2311.03099, Eq. 2-3):
drop and rescale each task vector, then task arithmetic:

  m_i ~ Bernoulli(1 - p)  elementwise,   tau~_i = m_i * (theta_i - theta_0) / (1 - p),
  theta = theta_0 + sum_i lambda_i tau~_i.

E[tau~_i] = tau_i; p = 0 is task arithmetic exactly. The masks are seeded by
(seed, model index, tensor path), so a merge is reproducible and the
leaf-by-leaf merge of checkpoints equals the in-memory one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
import zlib

import numpy as np

from posttrain_jax.merging.leafwise import as_float64, merge_leaves
from posttrain_jax.merging.task_arithmetic import task_lambdas


def keep_mask(shape, drop: float, seed: int, model: int, path: str) -> np.ndarray:
  """The Bernoulli(1 - drop) keep mask of one model's tensor at `path`."""
  rng = np.random.default_rng([seed, model, zlib.crc32(path.encode())])
  return rng.random(shape) >= drop


def dare_rule(drop: float, lambdas: np.ndarray, seed: int):
  """The per-tensor rule of `dare` (see merging.leafwise)."""
  def rule(path, init, leaves):
    t0 = as_float64(init)
    out = t0.copy()
    for i, (l, x) in enumerate(zip(lambdas, leaves)):
      tau = as_float64(x) - t0
      if drop > 0:
        tau = np.where(keep_mask(tau.shape, drop, seed, i, path), tau / (1.0 - drop), 0.0)
      out = out + float(l) * tau
    return out.astype(np.asarray(leaves[0]).dtype)
  return rule


def dare(init: Any, params_list: Sequence[Any], drop: float = 0.9,
         lambdas: float | Sequence[float] | None = None, seed: int = 0):
  """DARE merge: task arithmetic of randomly dropped, 1/(1 - p)-rescaled task vectors.

  Args:
    init: theta_0, the shared initialisation.
    params_list: the M fine-tuned trees.
    drop: the drop rate p in [0, 1) (the paper drops up to 90-99%).
    lambdas: task-arithmetic scalings (one, one per model, or None: 1/M).
    seed: seeds the masks together with model index and tensor path.
  """
  if not 0.0 <= drop < 1.0:
    raise ValueError(f"DARE drop rate must be in [0, 1), got {drop}.")
  lam = task_lambdas(lambdas, len(params_list))
  return merge_leaves(dare_rule(drop, lam, seed), params_list, init)
