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
  3. `all_gather`s the codes and the float32 scales over "replica" only.
     This is all that crosses the replica axis: per tensor, each device sends
     its shard's codes (fp4: ceil(n_shard / 2) bytes) and its copy of the
     scales (4 bytes each); over a replica's devices that is
     `quantization.bytes_of` of the tensor (`Traffic` counts M - 1 of these
     per replica) plus at most one pad nibble per shard and the scales
     repeated once per shard;
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
      codes = gather(codes)
      scales = None if scales is None else gather(scales)
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
