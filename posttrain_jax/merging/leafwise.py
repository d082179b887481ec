"""Per-tensor merge rules applied over parameter trees.

Every merge of this package except SLERP's recursion is a rule on one tensor at
a time: `rule(path, init, leaves) -> merged`, with `path` the tensor's key
string (e.g. "['backbone']['layers_0']['mlp']['wi']['kernel']"), `init` the
shared initialisation's tensor theta_0 (None for merges without one) and
`leaves` the M fine-tuned tensors theta_i. `merge_leaves` applies a rule to
trees in memory; `merging.streaming` applies the same rule to orbax checkpoints
one tensor at a time, so both give the same result by construction. Rules
compute in float64 on the host and return the first model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

Rule = Callable[[str, "np.ndarray | None", list], np.ndarray]


def shapes(tree) -> dict[str, tuple[int, ...]]:
  """{key string: shape} of a tree's leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}


def check_same_shapes(all_shapes: Sequence[dict[str, tuple[int, ...]]],
                      names: Sequence[str] | None = None) -> None:
  """One clear ValueError naming every mis-shaped, missing or extra tensor."""
  names = list(names) if names else [f"model {i}" for i in range(len(all_shapes))]
  first = all_shapes[0]
  for name, other in zip(names[1:], all_shapes[1:]):
    problems = [f"{k}: {names[0]} has {first[k]}, {name} has {other[k]}"
                for k in first if k in other and first[k] != other[k]]
    problems += [f"{k}: missing from {name}" for k in first if k not in other]
    problems += [f"{k}: only in {name}" for k in other if k not in first]
    if problems:
      raise ValueError(
          f"Cannot merge: {name}'s parameters differ from {names[0]}'s "
          f"({len(problems)} problem(s)): " + "; ".join(problems[:6]) +
          ". Fix: merge models of one architecture (and one parameter layout) "
          "fine-tuned from a shared init.")


def as_float64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def merge_leaves(rule: Rule, params_list: Sequence[Any], init: Any = None):
  """Applies `rule` tensor by tensor to M trees (and their init, if given)."""
  if not params_list:
    raise ValueError("Nothing to merge: give at least one model.")
  trees = ([init] if init is not None else []) + list(params_list)
  names = (["init"] if init is not None else []) + [
      f"model {i}" for i in range(len(params_list))]
  check_same_shapes([shapes(t) for t in trees], names)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params_list[0])
  others = [jax.tree_util.tree_leaves(t) for t in params_list[1:]]
  init_leaves = jax.tree_util.tree_leaves(init) if init is not None else None
  out = []
  for i, (path, leaf) in enumerate(flat):
    leaves = [leaf] + [o[i] for o in others]
    out.append(rule(jax.tree_util.keystr(path),
                    None if init_leaves is None else init_leaves[i], leaves))
  return jax.tree_util.tree_unflatten(treedef, out)


def weighted_mean_rule(weights: Sequence[float]) -> Rule:
  """sum_i w_i theta_i per tensor (weights already normalised): WARM's average."""
  def rule(path, init, leaves):
    del path, init
    acc = sum(float(w) * as_float64(x) for w, x in zip(weights, leaves))
    return acc.astype(np.asarray(leaves[0]).dtype)
  return rule
