"""Streaming DiLoCo fragments: static partitions of the parameters, and the
staggered schedule on which each fragment is synchronised.

Layers. The transformer layers are found in the parameter tree itself:
  - unscanned trees have top-level entries `layer_{i}`; layer i is one of them;
  - scanned trees have a top-level `layers` subtree whose leaves carry a leading
    group axis G (nn.scan); a "layer" is then one group (one period of the
    attention pattern, e.g. a local + global pair), i.e. one index of axis 0.
Every other top-level entry (embedder, final_norm, ...) is "non-layer".
Trees must be unboxed (nn.unbox): a LogicallyPartitioned box adds a key.

Assignment of L layers to P layer fragments:
  strided     fragment p = layers {p, p + P, p + 2P, ...} (the paper's default [V])
  sequential  contiguous blocks; the first L mod P fragments get one extra layer.
Non-layer parameters (`embeddings`):
  "join"      joined to fragment 0 (so P = 1 is vanilla DiLoCo's whole model);
  "separate"  a fragment of their own, appended last (P + 1 fragments in all);
  "split"     each non-layer leaf cut along its axis 0 (the embedding table by
              vocabulary rows, a norm scale by elements) into P contiguous
              slices, slice p joining fragment p, so fragments are balanced:
              with equal layer counts every fragment is 1/P of the model (a
              joined embedding makes fragment 0 the largest, hence the peak
              per-sync traffic; for Gemma-2-2B the embedding is 23% of it).
The paper does not say where embeddings go; all three are reconstructions [M].

A `Fragment` is static (hashable): a tuple of `Selector`s, each naming one leaf
by its key path and, for scanned leaves, a static slice of axis 0. `take(tree,
frag)` returns the selected values as a flat dict {"a/b/c": array}; `put(tree,
frag, values)` writes such a dict back. Both work on any tree with the params'
structure (params, gradients, optimizer moments); use jax.vmap for trees with a
leading replica axis.

Schedule. With F fragments in all and sync period H, fragment p has offset
t_p = floor(p * H / F + 1/2) (evenly staggered; a reconstruction [M]: the
paper only says offsets are staggered). Steps t count inner steps taken, the
current one included (t = 1 after the first inner step). Fragment p starts its
exchange after step t when t >= 1 and (t - t_p) mod H == 0, and its outer update
(apply + merge) happens after step t when t - tau >= 1 and
(t - t_p - tau) mod H == 0, i.e. tau steps after each exchange start. So each
fragment syncs exactly once in every window of H consecutive steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np

PATTERNS = ("strided", "sequential")
EMBEDDINGS = ("join", "separate", "split")

_LAYER_RE = re.compile(r"layer_(\d+)$")
SCANNED_KEY = "layers"


@dataclasses.dataclass(frozen=True)
class Selector:
  """One leaf (key path) and, for scanned leaves, the slice (start, stop, step)
  of its axis 0; rows None means the whole leaf. row_tensors: each selected row
  is a tensor of its own (a scanned layer: quantized with its own scale) or,
  False, the slice is one tensor (a "split" embedding slice)."""

  path: tuple[str, ...]
  rows: tuple[int, int, int] | None = None
  row_tensors: bool = True

  @property
  def name(self) -> str:
    return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class Fragment:
  index: int
  layers: tuple[int, ...]  # layer (unscanned) or group (scanned) indices
  has_non_layer: bool      # holds the embeddings / final norm
  selectors: tuple[Selector, ...]

  def size(self, tree) -> int:
    """Number of elements of `tree` (arrays or ShapeDtypeStructs) it selects."""
    return sum(math.prod(shape) for shape in self.shapes(tree).values())

  def shapes(self, tree) -> dict[str, tuple[int, ...]]:
    leaves = _leaves_by_path(tree)
    return {s.name: selected_shape(leaves[s.path].shape, s.rows)
            for s in self.selectors}


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves_by_path(tree) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key(k) for k in path): leaf for path, leaf in flat}


def selected_shape(shape, rows):
  """Shape of leaf[rows] (the whole shape when rows is None)."""
  if rows is None:
    return tuple(shape)
  return (len(range(*rows)),) + tuple(shape[1:])


def _as_slice(indices: Sequence[int]) -> tuple[int, int, int]:
  """Sorted arithmetic progression -> (start, stop, step)."""
  indices = sorted(indices)
  step = indices[1] - indices[0] if len(indices) > 1 else 1
  if list(range(indices[0], indices[-1] + 1, step)) != indices:
    raise ValueError(f"Layer indices {indices} are not an arithmetic progression.")
  return indices[0], indices[-1] + 1, step


def assign_layers(num_layers: int, num_fragments: int, pattern: str = "strided"
                  ) -> list[tuple[int, ...]]:
  """Layer indices of each of the P layer fragments."""
  if pattern not in PATTERNS:
    raise ValueError(f"Unknown fragment pattern {pattern!r}; valid: {PATTERNS}.")
  if not 1 <= num_fragments <= num_layers:
    raise ValueError(f"num_fragments must be in [1, {num_layers}] (the number of "
                     f"layers, or of scanned groups), got {num_fragments}.")
  if pattern == "strided":
    return [tuple(range(p, num_layers, num_fragments)) for p in range(num_fragments)]
  return [tuple(int(i) for i in chunk)
          for chunk in np.array_split(np.arange(num_layers), num_fragments)]


def layer_structure(params) -> tuple[bool, int]:
  """(scanned, number of layers or groups) of a parameter tree."""
  if isinstance(params, Mapping) and SCANNED_KEY in params:
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(params[SCANNED_KEY])}
    if len(sizes) != 1:
      raise ValueError(f"Scanned '{SCANNED_KEY}' leaves disagree on the group axis: "
                       f"{sorted(sizes)}.")
    return True, sizes.pop()
  layers = [k for k in params if _LAYER_RE.match(str(k))] if isinstance(
      params, Mapping) else []
  if not layers:
    raise ValueError("No transformer layers found: expected top-level 'layer_{i}' "
                     f"entries or a scanned '{SCANNED_KEY}' subtree.")
  ids = sorted(int(_LAYER_RE.match(k).group(1)) for k in layers)
  if ids != list(range(len(ids))):
    raise ValueError(f"Layer entries are not layer_0..layer_{len(ids) - 1}: {ids}.")
  return False, len(ids)


def make_fragments(params, num_fragments: int, pattern: str = "strided",
                   embeddings: str = "join") -> tuple[Fragment, ...]:
  """Partitions `params` (arrays or ShapeDtypeStructs) into fragments."""
  if embeddings not in EMBEDDINGS:
    raise ValueError(f"Unknown embeddings option {embeddings!r}; valid: {EMBEDDINGS}.")
  scanned, num_layers = layer_structure(params)
  assignment = assign_layers(num_layers, num_fragments, pattern)
  leaves = _leaves_by_path(params)

  def is_layer(path):
    return path[0] == SCANNED_KEY if scanned else bool(_LAYER_RE.match(path[0]))

  non_layer = tuple(Selector(p) for p in leaves if not is_layer(p))
  split = [() for _ in assignment]
  if embeddings == "split":
    for path in (p for p in leaves if not is_layer(p)):
      shape = leaves[path].shape
      if not shape or shape[0] < len(assignment):  # too small to cut: fragment 0
        split[0] += (Selector(path),)
        continue
      for p, chunk in enumerate(np.array_split(np.arange(shape[0]), len(assignment))):
        split[p] += (Selector(path, (int(chunk[0]), int(chunk[-1]) + 1, 1), False),)
  fragments = []
  for p, layer_ids in enumerate(assignment):
    if scanned:
      rows = _as_slice(layer_ids)
      sel = tuple(Selector(path, rows) for path in leaves if is_layer(path))
    else:
      wanted = {f"layer_{i}" for i in layer_ids}
      sel = tuple(Selector(path) for path in leaves if path[0] in wanted)
    join = embeddings == "join" and p == 0
    fragments.append(Fragment(p, layer_ids, join or bool(split[p]),
                              (non_layer if join else split[p]) + sel))
  if embeddings == "separate" and non_layer:
    fragments.append(Fragment(len(fragments), (), True, non_layer))
  return tuple(fragments)


def _slice(rows):
  return slice(*rows)


def take(tree, frag: Fragment) -> dict[str, Any]:
  """The fragment's values: {selector name: leaf or leaf[rows]}."""
  leaves = _leaves_by_path(tree)
  out = {}
  for s in frag.selectors:
    leaf = leaves[s.path]
    out[s.name] = leaf if s.rows is None else leaf[_slice(s.rows)]
  return out


def put(tree, frag: Fragment, values: Mapping[str, Any]):
  """`tree` with the fragment's values replaced by `values` (cast to each
  leaf's dtype)."""
  by_path = {s.path: s for s in frag.selectors}

  def one(path, leaf):
    s = by_path.get(tuple(_key(k) for k in path))
    if s is None:
      return leaf
    v = values[s.name]
    if s.rows is None:
      return v.astype(leaf.dtype)
    return leaf.at[_slice(s.rows)].set(v.astype(leaf.dtype))
  return jax.tree_util.tree_map_with_path(one, tree)


def take_like(tree, frag: Fragment, fn=lambda leaf, rows: leaf) -> dict[str, Any]:
  """{selector name: fn(leaf, rows)} for non-array trees (e.g. shardings)."""
  leaves = _leaves_by_path(tree)
  return {s.name: fn(leaves[s.path], s.rows) for s in frag.selectors}


def element_owners(params, fragments: Sequence[Fragment]) -> dict[str, np.ndarray]:
  """For each leaf, an int array counting how many fragments select each
  element (1 everywhere for a partition)."""
  counts = {"/".join(p): np.zeros(leaf.shape, np.int32)
            for p, leaf in _leaves_by_path(params).items()}
  for frag in fragments:
    for s in frag.selectors:
      if s.rows is None:
        counts[s.name] += 1
      else:
        counts[s.name][_slice(s.rows)] += 1
  return counts


# ------------------------------------------------------------------ schedule

def offsets(num_fragments: int, sync_every: int) -> tuple[int, ...]:
  """t_p = floor(p * H / F + 1/2) [M]."""
  return tuple(int(math.floor(p * sync_every / num_fragments + 0.5))
               for p in range(num_fragments))


@dataclasses.dataclass(frozen=True)
class Event:
  """What happens after an inner step: exchanges started, outer updates applied."""

  sync: tuple[int, ...] = ()
  apply: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class SyncSchedule:
  num_fragments: int
  sync_every: int  # H
  overlap: int = 0  # tau

  def __post_init__(self):
    if self.sync_every < 1:
      raise ValueError(f"sync_every (H) must be >= 1, got {self.sync_every}.")
    if not 0 <= self.overlap < self.sync_every:
      raise ValueError(f"overlap (tau) must be in [0, H) = [0, {self.sync_every}), "
                       f"got {self.overlap}.")

  @property
  def offsets(self) -> tuple[int, ...]:
    return offsets(self.num_fragments, self.sync_every)

  def syncs(self, t: int, p: int) -> bool:
    return t >= 1 and (t - self.offsets[p]) % self.sync_every == 0

  def event(self, t: int) -> Event:
    """The event after inner step t (t >= 1)."""
    return Event(
        sync=tuple(p for p in range(self.num_fragments) if self.syncs(t, p)),
        apply=tuple(p for p in range(self.num_fragments)
                    if self.syncs(t - self.overlap, p)))

  def events(self) -> set[Event]:
    """Every distinct event of a run (those of t >= H + tau repeat with period H)."""
    h, tau = self.sync_every, self.overlap
    return {self.event(t) for t in range(1, 2 * h + tau + 1)}
