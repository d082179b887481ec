"""Leaf-by-leaf merges of orbax checkpoints, for trees too large for one host.

`stream_merge(rule, directories, init)` applies a per-tensor merge rule
(`merging.leafwise`) to model or run directories without restoring whole
models: for each parameter tensor it reads that one tensor from the init and
from each of the M checkpoints (orbax partial restore, so tensorstore reads
only that array), merges it and keeps only the result. Peak host memory is
the merged tree plus M + 1 tensors, instead of M + 1 trees. Because the rule
is the one the in-memory merge (`merge_leaves`) uses, the two agree exactly.

All checkpoints must hold the same tensors in the same layout (scanned or
unscanned) and shapes; the merged tree keeps that layout. A scanned tensor
(all layers of one attention-pattern position) is merged layer by layer, as
`merge_leaves` does (`leafwise.apply_rule`), so the merge does not depend on
the saved layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from posttrain_jax.merging.leafwise import Rule, apply_rule, check_same_shapes, scanned_leaves
from posttrain_jax.models import params_checkpoint


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def saved_tensors(location: params_checkpoint.Location) -> dict[str, tuple]:
  """{key string: (keys, shape, dtype)} of a checkpoint's parameters (metadata only)."""
  flat = jax.tree_util.tree_flatten_with_path(params_checkpoint.saved_params(location))[0]
  return {jax.tree_util.keystr(p): (_keys(p), tuple(m.shape), np.dtype(m.dtype))
          for p, m in flat}


def _nest(keys: Sequence[str], value) -> dict:
  for k in reversed(keys):
    value = {k: value}
  return value


def read_tensor(location: params_checkpoint.Location, keys: Sequence[str], shape,
                dtype) -> np.ndarray:
  """One parameter tensor of a checkpoint as a host numpy array."""
  full = ((location.subtree,) if location.subtree else ()) + tuple(keys)
  item = _nest(full, jax.ShapeDtypeStruct(shape, dtype))
  args = _nest(full, ocp.RestoreArgs(restore_type=np.ndarray))
  restored = ocp.PyTreeCheckpointer().restore(location.path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=args, partial_restore=True))
  for k in full:
    restored = restored[k]
  return np.asarray(restored)


def stream_merge(rule: Rule, directories: Sequence[str], init: str | None = None) -> Any:
  """Merges model/run directories tensor by tensor with `rule`; returns the merged
  tree (nested dicts of numpy arrays, in the checkpoints' saved layout)."""
  if not directories:
    raise ValueError("Nothing to merge: give at least one model directory.")
  names = ([init] if init is not None else []) + list(directories)
  locations = [params_checkpoint.locate(d) for d in names]
  tensors = [saved_tensors(loc) for loc in locations]
  check_same_shapes([{k: v[1] for k, v in t.items()} for t in tensors], names)
  init_loc = locations[0] if init is not None else None
  model_locs = locations[1:] if init is not None else locations
  model_tensors = tensors[-len(directories):]
  paths = {key: tuple(jax.tree_util.DictKey(k) for k in keys)
           for key, (keys, _, _) in model_tensors[0].items()}
  scans = scanned_leaves(paths.values())
  merged: dict = {}
  for key, (keys, shape, _) in model_tensors[0].items():
    leaves = [read_tensor(loc, keys, shape, t[key][2])
              for loc, t in zip(model_locs, model_tensors)]
    t0 = None if init_loc is None else read_tensor(init_loc, keys, shape, tensors[0][key][2])
    node = merged
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = apply_rule(rule, paths[key], scans.get(key), t0, leaves)
  return merged
