"""Streaming DiLoCo's exchange: the reference, and over the "replica" mesh axis.

`exchange` (the unsharded reference, also `streaming_diloco.exchange`) passes
each replica's Δ_{m,p} through `quantization.fake_quantize` (bit-identical to
dequantize(quantize(.))) and takes the fp32 mean over replicas
(`replica_mean`): a sharded replica axis would move fp32. `sharded_exchange`
returns what `exchange` returns, bit for bit, for one fragment p:

  Δ_{m,p} = θ̃_p - θ_{m,p}  (fp32),
  Δ_p = Σ_m w_m D(Q(Δ_{m,p})) / max(Σ_m w_m, 1),   w = participating (0/1)

with Q / D the quantization.py encode / decode of the exchange format. It runs
under `jax.shard_map` over the mesh of the params' shardings, where the replica
params are sharded P("replica", *param_spec) (`DiLoCoTrainer`, mesh replica axis
r > 1; M = k r replicas, k per device group). Each device holds its k replicas'
block of Δ and its shard over the other mesh axes, and:

  1. scale (int8, fp4_e3m0, one per tensor or per row of a scanned slice):
     s_m = max |Δ_{m,p}| over the tensor = the shard's max, then a `pmax` over
     the non-replica mesh axes sharding the tensor (one float per tensor and
     replica), so s_m is the global scale and the codes those of the
     unsharded tensor;
  2. encodes its shard: fp4_e3m0 -> uint8 codes packed two per byte, int8 ->
     int8 codes, bf16 -> bfloat16 values, none -> float32 values (that format
     is fp32);
  3. `all_gather`s the codes and the float32 scales over "replica" only, as
     one uint8 payload per tensor (the scales' bytes after the codes). The n
     devices of a replica group that hold the same shard (mesh axes that do
     not split the tensor, e.g. "data") each send a 1/n piece of it over
     "replica", and an all-gather over those axes (ICI) completes it, so a
     replica sends each shard once. This is all that crosses the replica
     axis: per tensor and shard, its codes (fp4: ceil(n_shard / 2) bytes) and
     its copy of the scales (4 bytes each), the pieces rounded up to whole
     bytes; over a replica that is `quantization.bytes_of` of the tensor plus
     at most one pad nibble per shard, the scales repeated once per shard and
     the pieces' rounding (`chip_wire_bytes`; `Traffic` counts exactly this,
     M - 1 of it per replica, when given the shardings, as DiLoCoTrainer does);
  4. unpacks and decodes the M replicas' codes and takes the weighted fp32 mean
     locally (`streaming_diloco.replica_mean`, the reference's fixed order of
     summation): Δ_p comes out sharded like the param (replicated over
     "replica").

Per-block scales (block K, one scale per K consecutive elements of the
row-major flattened tensor) take the packed path when every block lies in one
shard: K divides the tensor's last dimension and its shard's (the blocks are
then pieces of the last dimension, as `fake_quantize` computes them), or the
tensor is not sharded over the non-replica axes (each device has whole
tensors; then `quantization.quantize` / `dequantize` per tensor). Otherwise
(blocks crossing shard boundaries) the tensor falls back to the reference
`exchange` (fake quantization, then a mean that XLA lowers to an fp32
all-reduce over "replica": exact numerics, fp32 on the wire);
`fallback_names` lists those tensors (`DiLoCoTrainer` logs them at start-up
and `Traffic` counts them as fp32 all-reduces; block_fallback="error" refuses
them). Mesh axes of size 1 do not count as sharding. Per-tensor scales (the default) and
bf16 / none always take the packed path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import quantization as q

REPLICA_AXIS = "replica"


def _quantize_selected(delta, frag: fr.Fragment, fmt: str, block: int | None):
  """Per-replica, per-tensor fake quantization of a fragment's Δ ([M, ...])."""
  rows = {s.name: s.rows is not None and s.row_tensors for s in frag.selectors}

  def one(name, x):
    fq = functools.partial(q.fake_quantize, format=fmt, block=block)
    if rows[name]:  # scanned slice: one tensor per layer (group) row
      fq = jax.vmap(fq)
    return jax.vmap(fq)(x)
  return {k: one(k, v) for k, v in delta.items()}


def exchange(outer, replica_params_, frag: fr.Fragment, participating: jax.Array,
             fmt: str = "fp4_e3m0", block: int | None = None):
  """Averaged pseudo-gradient of one fragment: (Δ_p by selector name, count).

  Δ_{m,p} = θ̃_p - θ_{m,p} in fp32, quantized per replica and tensor, then the
  fp32 mean over replicas with participating[m] = 1.
  """
  theta, local = _selected(outer, replica_params_, frag)
  delta = {k: _pseudo_gradient(theta[k], local[k]) for k in theta}
  delta = _quantize_selected(delta, frag, fmt, block)
  w = participating.astype(jnp.float32)
  return {k: replica_mean(w, v) for k, v in delta.items()}, jnp.sum(w)


def _selected(outer, replica_params_, frag: fr.Fragment):
  """(θ̃_p, θ_{m,p} with a leading [M] axis), both by selector name."""
  return (fr.take(outer, frag),
          jax.vmap(lambda t: fr.take(t, frag))(replica_params_))


def _pseudo_gradient(theta, local):
  """Δ_{m,p} = θ̃_p - θ_{m,p} in fp32 ([M, ...] from θ̃ [...] and θ_m [M, ...])."""
  return theta.astype(jnp.float32)[None] - local.astype(jnp.float32)


def replica_mean(w: jax.Array, values: jax.Array) -> jax.Array:
  """Σ_m w_m values[m] / max(Σ_m w_m, 1) in fp32, summed in the fixed order
  m = 0, 1, ... and scaled by the scalar reciprocal (a division of the tensor
  may compile to either), so that sharded exchanges give the same bits."""
  total = functools.reduce(lambda acc, m: acc + w[m] * values[m],
                           range(1, values.shape[0]), w[0] * values[0])
  return total * (1.0 / jnp.maximum(jnp.sum(w), 1.0))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """How one selected tensor is exchanged.

  kind: "raw" (bf16 / none values), "tensor" (one scale per tensor or row,
  pmax over `reduce_axes`), "blocks" (K-blocks along the last dimension, all
  within the shard), "flat" (unsharded tensor: quantize the flattened
  tensor); lead: leading dims of independent tensors in Δ ([M] or [M, rows]);
  tensor_shape: the shape of one tensor.
  """

  kind: str
  spec: tuple
  lead: int
  tensor_shape: tuple[int, ...]
  reduce_axes: tuple[str, ...] = ()


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _plan(shape, spec, row_tensors: bool, mesh, fmt: str, block: int | None):
  """_Plan for a selected tensor of `shape` ([rows, ...] when row_tensors)
  sharded as `spec` (None: fall back to the reference exchange)."""
  lead = 2 if row_tensors else 1
  tensor_shape = tuple(shape[lead - 1:])
  tensor_spec = spec[lead - 1:]
  # mesh axes that really split the tensor (a size-1 axis leaves it whole)
  axes = tuple(a for e in tensor_spec for a in _axes_of(e) if mesh.shape[a] > 1)
  if fmt in ("none", "bf16"):
    return _Plan("raw", spec, lead, tensor_shape)
  if block is None:
    return _Plan("tensor", spec, lead, tensor_shape, axes)
  k = int(block)
  if tensor_shape and tensor_shape[-1] % k == 0:  # fake_quantize's blocks view
    local_last = tensor_shape[-1] // math.prod(mesh.shape[a] for a in
                                               _axes_of(tensor_spec[-1]))
    if local_last % k == 0:
      return _Plan("blocks", spec, lead, tensor_shape)
    return None
  return _Plan("flat", spec, lead, tensor_shape) if not axes else None


def _selection_spec(sharding: NamedSharding, rows, ndim: int) -> tuple:
  """The spec of leaf[rows] (axis 0 unsharded for row slices, as the trainer's
  fragment shardings), padded to ndim."""
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return spec if rows is None else (None,) + spec[1:]


def plans(frag: fr.Fragment, param_shardings, shapes, fmt: str,
          block: int | None) -> dict[str, _Plan | None]:
  """{selector name: _Plan, or None where the tensor falls back}; `shapes`
  gives each selected tensor's shape (fr.Fragment.shapes)."""
  sel = {s.name: s for s in frag.selectors}
  shardings = fr.take_like(param_shardings, frag, lambda s, rows: s)
  out = {}
  for name, shape in shapes.items():
    s = sel[name]
    sh = shardings[name]
    spec = _selection_spec(sh, s.rows, len(shape))
    out[name] = _plan(shape, spec, s.rows is not None and s.row_tensors, sh.mesh,
                      fmt, block)
  return out


def fallback_names(frag: fr.Fragment, param_shardings, params, fmt: str,
                   block: int | None) -> tuple[str, ...]:
  """Selected tensors exchanged as fp32 by the reference path (see the module
  docstring); `params`: arrays or ShapeDtypeStructs."""
  p = plans(frag, param_shardings, frag.shapes(params), fmt, block)
  return tuple(k for k, v in p.items() if v is None)


def _lead_map(fn, lead: int):
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn


def _encode(x, plan: _Plan, fmt: str, block: int | None):
  """Local Δ [k, (rows,) *shard] -> (codes [k, ...], scales [k, ...] or None)."""
  kdim = x.shape[0]
  if plan.kind == "raw":
    return (x if fmt == "none" else x.astype(jnp.bfloat16)), None
  if plan.kind == "flat":
    return _lead_map(lambda t: q.quantize(t, fmt, block), plan.lead)(x)
  if plan.kind == "blocks":
    view = x.reshape(x.shape[:-1] + (x.shape[-1] // int(block), int(block)))
    absmax = jnp.max(jnp.abs(view), axis=-1, keepdims=True)
  else:
    view = x
    absmax = jnp.max(jnp.abs(x), axis=tuple(range(plan.lead, x.ndim)), keepdims=True)
    if plan.reduce_axes:
      absmax = jax.lax.pmax(absmax, plan.reduce_axes)
  scale = q.scale_of(absmax, fmt)
  codes = q.encode(view, scale, fmt).reshape(kdim, -1)
  if fmt == "fp4_e3m0":
    codes = jax.vmap(q.pack_fp4)(codes)
  return codes, scale


def _wire(codes, scales):
  """[k, ...] codes (and float32 scales, or None) -> one uint8 [k, bytes]
  payload (bitcasts: the scales travel with the codes, byte for byte)."""
  k = codes.shape[0]
  as_bytes = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(k, -1)
  return jnp.concatenate([as_bytes(codes)] + ([] if scales is None else [as_bytes(scales)]),
                         axis=1)


def _replicated_axes(plan: _Plan, mesh) -> tuple[str, ...]:
  """Mesh axes (besides "replica", of size > 1) that do not split the tensor:
  its chips along them hold the same payload, so each sends a 1/n piece."""
  used = {a for e in plan.spec for a in _axes_of(e)}
  return tuple(a for a in mesh.axis_names
               if a != REPLICA_AXIS and a not in used and mesh.shape[a] > 1)


def _unwire(wire, codes, scales):
  """The gathered [M, bytes] payload -> (codes [M, ...], scales [M, ...]) of
  the dtypes and per-replica shapes of `codes` and `scales`."""
  m = wire.shape[0]

  def take(part, like):
    size = jnp.dtype(like.dtype).itemsize
    part = part.reshape((m,) + like.shape[1:] + ((size,) if size > 1 else ()))
    return jax.lax.bitcast_convert_type(part, like.dtype)
  n = math.prod(codes.shape[1:]) * jnp.dtype(codes.dtype).itemsize
  return take(wire[:, :n], codes), None if scales is None else take(wire[:, n:], scales)


def chip_wire_bytes(frag: fr.Fragment, param_shardings, params, fmt: str,
                    block: int | None) -> int:
  """Bytes one chip all-gathers over "replica" in `sharded_exchange` of
  fragment `frag`: per packed tensor, its shard's codes and scales, divided
  (rounded up) among the chips that hold the same shard; `params`: arrays or
  ShapeDtypeStructs."""
  shapes = frag.shapes(params)
  mesh = jax.tree.leaves(param_shardings)[0].mesh
  total = 0
  for name, plan in plans(frag, param_shardings, shapes, fmt, block).items():
    if plan is None:
      continue
    local = NamedSharding(mesh, PartitionSpec(*plan.spec)).shard_shape(tuple(shapes[name]))
    no_pmax = dataclasses.replace(plan, reduce_axes=())  # shapes only
    out = jax.eval_shape(lambda x, p=no_pmax: _encode(x, p, fmt, block),
                         jax.ShapeDtypeStruct((1,) + tuple(local), jnp.float32))
    payload = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                  for a in jax.tree.leaves(out))
    n = math.prod(mesh.shape[a] for a in _replicated_axes(plan, mesh))
    total += -(-payload // n)
  return total


def _decode(codes, scales, shard_shape, plan: _Plan, fmt: str, block: int | None):
  """Gathered codes and scales of the M replicas -> fp32 Δ [M, *shard_shape]."""
  m = codes.shape[0]
  if plan.kind == "raw":
    return codes.astype(jnp.float32)
  if plan.kind == "flat":
    deq = lambda c, s: q.dequantize(c, s, plan.tensor_shape, fmt, block)
    return _lead_map(deq, plan.lead)(codes, scales)
  n = math.prod(shard_shape)
  if fmt == "fp4_e3m0":
    codes = jax.vmap(lambda c: q.unpack_fp4(c, n))(codes)
  view = shard_shape if plan.kind == "tensor" else (
      shard_shape[:-1] + (shard_shape[-1] // int(block), int(block)))
  values = q.decode(codes.reshape((m,) + tuple(view)), scales, fmt)
  return values.reshape((m,) + tuple(shard_shape))


def sharded_exchange(outer, replica_params_, frag: fr.Fragment,
                     participating: jax.Array, fmt: str = "fp4_e3m0",
                     block: int | None = None, *, param_shardings):
  """`streaming_diloco.exchange` with the codes all-gathered over "replica"
  (see the module docstring): (Δ_p by selector name, count).

  param_shardings: the params' NamedShardings (a tree like `outer`); the
  replica params must be sharded P("replica", *param_spec). Use it as
  `exchange_fn=functools.partial(sharded_exchange, param_shardings=...)`.
  """
  theta, local = _selected(outer, replica_params_, frag)
  all_plans = plans(frag, param_shardings,
                    {k: v.shape for k, v in theta.items()}, fmt, block)
  packed = {k: p for k, p in all_plans.items() if p is not None}
  mean = {}
  count = jnp.sum(participating.astype(jnp.float32))
  rest = tuple(s for s in frag.selectors if all_plans[s.name] is None)
  if rest:
    mean, _ = exchange(outer, replica_params_, dataclasses.replace(frag, selectors=rest),
                       participating, fmt, block)
  if not packed:
    return mean, count
  mesh = jax.tree.leaves(param_shardings)[0].mesh

  def body(theta, local, w):
    w = w.astype(jnp.float32)
    out = {}
    for k, plan in packed.items():
      x = _pseudo_gradient(theta[k], local[k])
      codes, scales = _encode(x, plan, fmt, block)
      gather = lambda a: jax.lax.all_gather(a, REPLICA_AXIS, axis=0, tiled=True,
                                            to="invarying")
      wire = _wire(codes, scales)  # one uint8 payload: codes, then the scales' bytes
      spread = _replicated_axes(plan, mesh)
      if spread:  # each chip of the slice sends its 1/n piece; ICI completes it
        n = math.prod(mesh.shape[a] for a in spread)
        piece = -(-wire.shape[1] // n)
        padded = jnp.pad(wire, ((0, 0), (0, n * piece - wire.shape[1])))
        mine = jax.lax.dynamic_slice_in_dim(
            padded, jax.lax.axis_index(spread) * piece, piece, axis=1)
        whole = jax.lax.all_gather(gather(mine), spread, axis=1, tiled=True,
                                   to="invarying")
        gathered = whole[:, :wire.shape[1]]
      else:
        gathered = gather(wire)
      codes, scales = _unwire(gathered, codes, scales)
      values = _decode(codes, scales, x.shape[1:], plan, fmt, block)
      out[k] = replica_mean(w, values)
    return out

  specs = {k: PartitionSpec(*p.spec) for k, p in packed.items()}
  mapped = jax.shard_map(
      body, mesh=mesh,
      in_specs=(specs, {k: PartitionSpec(REPLICA_AXIS, *p.spec)
                        for k, p in packed.items()}, PartitionSpec()),
      out_specs=specs)
  mean.update(mapped({k: theta[k] for k in packed}, {k: local[k] for k in packed},
                     participating))
  return {s.name: mean[s.name] for s in frag.selectors}, count
