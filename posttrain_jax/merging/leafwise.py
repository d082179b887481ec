"""Per-tensor merge rules applied over parameter trees.

Every merge of this package except SLERP's recursion is a rule on one tensor at
a time: `rule(path, init, leaves) -> merged`, with `path` the tensor's key
string (e.g. "['backbone']['layers_0']['mlp']['wi']['kernel']"), `init` the
shared initialisation's tensor theta_0 (None for merges without one) and
`leaves` the M fine-tuned tensors theta_i. `merge_leaves` applies a rule to
trees in memory; `merging.streaming` applies the same rule to orbax checkpoints
one tensor at a time, so both give the same result by construction. Rules
compute in float64 on the host and return the first model's dtype.

"One tensor" is one layer's tensor whatever the saved layout: a leaf of the
scanned layout (models/layout.py: `...['layers']['{type}_{j}']...`, the
layers of pattern position j stacked on axis 0) is cut into its layers, the
rule runs on each with that layer's unscanned path (`...['layer_{i}']...`,
i = g * len(pattern) + j) and the results are stacked back. So every
per-tensor statistic (SLERP's angle, TIES' trim threshold, model stock's
cosine, DARE's path-seeded mask) is per (layer, parameter), and a merge of a
scanned tree is the merge of the same tree unscanned, rescanned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import re
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


_SCANNED_KEY = "layers"                 # models.layout: layers/{type}_{j}/...
_POSITION = re.compile(r".+_(\d+)$")     # layout.scanned_name: f"{type}_{j}"


@dataclasses.dataclass(frozen=True)
class Scan:
  """Where a scanned leaf's layers are: path[index] is "layers", path[index + 1]
  pattern position `position` of `period` = len(attention_pattern)."""
  index: int
  position: int
  period: int


def _name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def scanned_leaves(paths: Iterable[tuple]) -> dict[str, Scan]:
  """{key string: Scan} of the leaves (jax key paths) in the scanned layout: those
  under a "layers" node whose children are the pattern positions {type}_0 ..
  {type}_{P-1} (models/layout.py). Other trees have none."""
  paths = list(paths)
  children: dict[tuple[str, ...], set[str]] = {}
  for path in paths:
    names = [_name(k) for k in path]
    if _SCANNED_KEY in names[:-1]:
      k = names.index(_SCANNED_KEY)
      children.setdefault(tuple(names[:k + 1]), set()).add(names[k + 1])
  periods = {}
  for prefix, kids in children.items():
    found = [_POSITION.match(c) for c in kids]
    if all(found) and sorted(int(m.group(1)) for m in found) == list(range(len(kids))):
      periods[prefix] = len(kids)
  out = {}
  for path in paths:
    names = [_name(k) for k in path]
    if _SCANNED_KEY in names[:-1]:
      k = names.index(_SCANNED_KEY)
      period = periods.get(tuple(names[:k + 1]))
      if period is not None:
        position = int(_POSITION.match(names[k + 1]).group(1))
        out[jax.tree_util.keystr(tuple(path))] = Scan(k, position, period)
  return out


def layer_slices(path: tuple, scan: Scan | None, arrays: Sequence[Any]):
  """[(key string, [arrays' slices])] of one leaf: [(its key, arrays)] unscanned;
  for a scanned leaf one entry per layer, keyed by the layer's unscanned path,
  holding slice g of each array (None stays None)."""
  if scan is None:
    return [(jax.tree_util.keystr(tuple(path)), list(arrays))]
  arrays = [None if a is None else np.asarray(a) for a in arrays]
  first = next(a for a in arrays if a is not None)
  if first.ndim == 0:
    raise ValueError(f"{jax.tree_util.keystr(tuple(path))} is under the scanned layout's "
                     "'layers' but has no layer axis.")
  out = []
  for g in range(first.shape[0]):
    layer = jax.tree_util.DictKey(f"layer_{g * scan.period + scan.position}")
    key = tuple(path[:scan.index]) + (layer,) + tuple(path[scan.index + 2:])
    out.append((jax.tree_util.keystr(key), [None if a is None else a[g] for a in arrays]))
  return out


def apply_rule(rule: Rule, path: tuple, scan: Scan | None, init, leaves: Sequence[Any]):
  """`rule` on one leaf: on the whole leaf, or layer by layer (stacked) if scanned."""
  merged = [rule(key, parts[0], parts[1:])
            for key, parts in layer_slices(path, scan, [init, *leaves])]
  return merged[0] if scan is None else np.stack(merged)


def merge_leaves(rule: Rule, params_list: Sequence[Any], init: Any = None):
  """Applies `rule` tensor by tensor (layer by layer in scanned leaves) to M trees
  (and their init, if given)."""
  if not params_list:
    raise ValueError("Nothing to merge: give at least one model.")
  trees = ([init] if init is not None else []) + list(params_list)
  names = (["init"] if init is not None else []) + [
      f"model {i}" for i in range(len(params_list))]
  check_same_shapes([shapes(t) for t in trees], names)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params_list[0])
  others = [jax.tree_util.tree_leaves(t) for t in params_list[1:]]
  init_leaves = jax.tree_util.tree_leaves(init) if init is not None else None
  scans = scanned_leaves(path for path, _ in flat)
  out = []
  for i, (path, leaf) in enumerate(flat):
    leaves = [leaf] + [o[i] for o in others]
    out.append(apply_rule(rule, path, scans.get(jax.tree_util.keystr(path)),
                          None if init_leaves is None else init_leaves[i], leaves))
  return jax.tree_util.tree_unflatten(treedef, out)


def weighted_mean_rule(weights: Sequence[float]) -> Rule:
  """sum_i w_i theta_i per tensor (weights already normalised): WARM's average."""
  def rule(path, init, leaves):
    del path, init
    acc = sum(float(w) * as_float64(x) for w, x in zip(weights, leaves))
    return acc.astype(np.asarray(leaves[0]).dtype)
  return rule
