"""Device mesh and the one table of logical-axis rules.

Model code names axes logically ("batch", "embed", "heads", ...); this module
maps them onto a mesh with axes (replica, data, fsdp, tensor):

  replica  slices / DiLoCo replicas across the data-centre network (DCN)
  data     pure data parallelism
  fsdp     data parallelism with parameters and optimizer state sharded
  tensor   tensor (model) parallelism over heads, MLP and vocabulary

Each axis has an ICI degree (within a slice) and a DCN degree (across slices).
With a DCN degree > 1 and devices of several TPU slices (one process or many)
or several processes, the mesh comes from `mesh_utils.create_hybrid_device_mesh`
(one granule per slice, else per process; the DCN part of each axis outermost);
otherwise (one process, one slice) DCN degrees simply multiply the axis size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ("replica", "data", "fsdp", "tensor")

# First matching rule whose mesh axes are still free wins (flax semantics), so
# activations' "embed" stays unsharded once "batch" has taken fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("replica", "data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("norm", None),
    ("layers", None),
)


def _axis_shape(parallelism: Mapping[str, int] | None, name: str) -> list[int]:
  parallelism = dict(parallelism or {})
  unknown = sorted(set(parallelism) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"Unknown mesh axes in {name}: {unknown}; valid axes are "
                     f"{list(MESH_AXES)}.")
  return [int(parallelism.get(axis, 1)) for axis in MESH_AXES]


def _fill(shape: list[int], total: int, name: str) -> list[int]:
  """Replace one -1 entry so that prod(shape) == total."""
  if shape.count(-1) > 1:
    raise ValueError(f"At most one axis of {name} may be -1, got {shape}.")
  known = math.prod(d for d in shape if d != -1)
  if -1 in shape:
    if known == 0 or total % known:
      raise ValueError(f"{name} {dict(zip(MESH_AXES, shape))}: {total} devices "
                       f"are not divisible by {known}.")
    shape[shape.index(-1)] = total // known
  if math.prod(shape) != total:
    raise ValueError(
        f"{name} {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices "
        f"but {total} are available; change the degrees or use -1 for one axis.")
  return shape


def create_mesh(ici_parallelism: Mapping[str, int] | None = None,
                dcn_parallelism: Mapping[str, int] | None = None,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (replica, data, fsdp, tensor) mesh.

  Args:
    ici_parallelism: degree per axis within a slice, e.g. {"fsdp": -1,
      "tensor": 2}; one axis may be -1 (fill); missing axes are 1.
    dcn_parallelism: degree per axis across slices, e.g. {"replica": 2}.
    devices: defaults to jax.devices().
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn = _axis_shape(dcn_parallelism, "dcn_parallelism")
  dcn = _fill(dcn, _num_slices(devices) if -1 in dcn else math.prod(dcn),
              "dcn_parallelism")
  num_slices = math.prod(dcn)
  if len(devices) % num_slices:
    raise ValueError(f"{len(devices)} devices cannot form {num_slices} slices.")
  ici = _fill(_axis_shape(ici_parallelism, "ici_parallelism"),
              len(devices) // num_slices, "ici_parallelism")
  multi_process = jax.process_count() > 1
  device_slices = _num_device_slices(devices)
  if device_slices > 1 and device_slices != num_slices:
    raise ValueError(
        f"The {len(devices)} devices lie in {device_slices} TPU slices but "
        f"dcn_parallelism {dict(zip(MESH_AXES, dcn))} makes {num_slices}; set the DCN "
        f"degrees to multiply to {device_slices} (e.g. {{'replica': {device_slices}}}).")
  if num_slices > 1 and (multi_process or device_slices > 1):
    # One granule per slice (TPU slice_index; else per process), DCN degrees
    # outermost on each axis: with dcn {"replica": S}, replica row r is slice r.
    # Also in one process over several slices (compile-only TPU topologies,
    # single-controller runtimes).
    array = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=device_slices <= 1,
        allow_split_physical_axes=True)
  else:
    shape = [i * d for i, d in zip(ici, dcn)]
    array = mesh_utils.create_device_mesh(shape, devices,
                                          allow_split_physical_axes=True)
  return Mesh(array, MESH_AXES)


def _num_device_slices(devices: Sequence[jax.Device]) -> int:
  """Distinct TPU slices (CPU/GPU devices report one slice or none)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def _num_slices(devices: Sequence[jax.Device]) -> int:
  """Slices for a DCN degree of -1: TPU slices, else processes."""
  slices = _num_device_slices(devices)
  return slices if slices > 1 else jax.process_count()


def mesh_axes(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
              rules=DEFAULT_RULES) -> PartitionSpec:
  """Logical names -> PartitionSpec, replicating dims the mesh does not divide."""
  spec = nn.logical_to_mesh_axes(tuple(logical), rules)
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return PartitionSpec(*out)


def logical_shardings(logical_specs, abstract, mesh: Mesh, rules=DEFAULT_RULES):
  """Maps a tree of logical PartitionSpecs (from nn.get_partition_spec) to
  NamedShardings, given the matching tree of shapes."""
  def one(spec, x):
    return NamedSharding(mesh, mesh_axes(tuple(spec), x.shape, mesh, rules))
  return jax.tree.map(one, logical_specs, abstract,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def params_and_shardings(init_boxed, mesh: Mesh, rules=DEFAULT_RULES):
  """Abstract (unboxed) params and their NamedShardings from a boxed init fn.

  init_boxed: a no-argument function returning flax params whose leaves are
  `nn.LogicallyPartitioned` boxes (as `Transformer.init` gives); it is only
  traced with jax.eval_shape.
  """
  abstract_boxed = jax.eval_shape(init_boxed)
  abstract = nn.unbox(abstract_boxed)
  shardings = logical_shardings(nn.get_partition_spec(abstract_boxed), abstract,
                                mesh, rules)
  return abstract, shardings


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of [batch, length] input arrays."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 rules=DEFAULT_RULES) -> dict[str, jax.Array]:
  """Assembles this process's rows into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh, rules)
  axes = sharding.spec[0] or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  shards = math.prod(mesh.shape[a] for a in axes)
  for key, value in local_batch.items():
    rows = value.shape[0] * jax.process_count()
    if rows % shards:
      raise ValueError(
          f"Global batch size {rows} ('{key}') is not divisible by the {shards} "
          f"batch shards of the mesh ({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}); "
          "change the batch size or the mesh's data/fsdp degrees.")
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
