"""Model stock (Jang et al., 2024, "Model Stock: All we need is just a few
fine-tuned models", arXiv 2403.19522, Eq. 2-3), per weight tensor ("layer"):

  cos(theta) = mean over pairs i < j of cos(theta_i - theta_0, theta_j - theta_0)
  t          = N cos(theta) / (1 + (N - 1) cos(theta))
  theta_H    = t * mean_i theta_i + (1 - t) * theta_0.

For N = 2 fine-tunings at angle theta: t = 2 cos(theta) / (1 + cos(theta)).
Orthogonal task vectors (cos = 0) give back theta_0; identical ones (cos = 1)
their average. A tensor whose task vectors are all ~0 is theta_0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from posttrain_jax.merging.leafwise import as_float64, merge_leaves


def interpolation_ratio(cos: float, count: int) -> float:
  """t = N cos / (1 + (N - 1) cos)."""
  return count * cos / (1.0 + (count - 1) * cos)


def model_stock_rule(eps: float = 1e-12):
  """The per-tensor rule of `model_stock` (see merging.leafwise)."""
  def rule(path, init, leaves):
    del path
    t0 = as_float64(init)
    taus = [(as_float64(x) - t0).reshape(-1) for x in leaves]
    norms = [np.linalg.norm(t) for t in taus]
    cosines = [np.dot(taus[i], taus[j]) / (norms[i] * norms[j])
               for i in range(len(taus)) for j in range(i + 1, len(taus))
               if norms[i] > eps and norms[j] > eps]
    if not cosines:
      return t0.astype(np.asarray(leaves[0]).dtype)
    t = interpolation_ratio(float(np.mean(cosines)), len(leaves))
    mean = np.mean([as_float64(x) for x in leaves], axis=0)
    return (t * mean + (1.0 - t) * t0).astype(np.asarray(leaves[0]).dtype)
  return rule


def model_stock(init: Any, params_list: Sequence[Any]):
  """Model stock of N >= 2 fine-tunings of `init`, tensor by tensor."""
  if len(params_list) < 2:
    raise ValueError(f"Model stock needs at least 2 fine-tuned models, got "
                     f"{len(params_list)}.")
  return merge_leaves(model_stock_rule(), params_list, init)
