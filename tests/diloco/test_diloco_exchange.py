"""The sharded Streaming DiLoCo exchange (diloco_exchange.py): bit-identical to
the unsharded reference, and its collectives over "replica" carry the codes."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco.exchange import fallback_names, sharded_exchange
from posttrain_jax.diloco.trainer import DiLoCoTrainer
from posttrain_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)
SCANNED = ModelConfig(**{**CFG.__dict__, "scan_layers": True, "num_layers": 8})


@functools.cache
def trainer_for(scan: bool, fmt: str = "fp4_e3m0", num_replicas: int = 2):
  """A DiLoCoTrainer on mesh {replica: 2, fsdp: 2, tensor: 2} (nothing compiled)."""
  mesh = partitioning.create_mesh({"fsdp": 2, "tensor": 2}, {"replica": 2})
  schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
  config = sd.DiLoCoConfig(num_replicas=num_replicas, sync_every=2, num_fragments=2,
                           overlap=0, quantization=fmt)
  return DiLoCoTrainer(Transformer(SCANNED if scan else CFG), tx, schedule, mesh, config)


def inputs(trainer, seed=0):
  """θ̃ and M replicas' params, host arrays: each replica moved by its own
  scale, and (scanned) one group moved 1000x more than the others."""
  m = trainer.config.num_replicas
  rng = np.random.default_rng(seed)
  params = nn.unbox(trainer.trainer.abstract_state.params)
  theta = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)

  def move(x, k):
    d = rng.normal(size=x.shape).astype(np.float32) * 1e-3 * (k + 1)
    if x.ndim > 1 and x.shape[0] == 4:  # scanned group axis
      d[3] *= 1000.0
    return x - d
  stacked = jax.tree.map(lambda x: np.stack([move(x, k) for k in range(m)]), theta)
  return theta, stacked


@functools.cache
def jitted(scan, fmt, block, frag_index, num_replicas=2):
  """(sharded jitted exchange, reference jitted exchange, fragment)."""
  trainer = trainer_for(scan, num_replicas=num_replicas)
  frag = trainer.fragments[frag_index]
  param_sh = trainer.trainer.param_shardings
  replicated = partitioning.replicated(trainer.mesh)
  sharded = jax.jit(
      lambda o, r, w: sharded_exchange(o, r, frag, w, fmt, block,
                                       param_shardings=param_sh),
      in_shardings=(param_sh, trainer.state_shardings.replicas.params, replicated))
  ref = jax.jit(lambda o, r, w: sd.exchange(o, r, frag, w, fmt, block))
  return sharded, ref, frag


def check_equal(scan, fmt, block, frag_index, participating, num_replicas=2):
  trainer = trainer_for(scan, num_replicas=num_replicas)
  theta, stacked = inputs(trainer)
  sharded, ref, frag = jitted(scan, fmt, block, frag_index, num_replicas)
  w = np.asarray(participating, np.float32)
  got, count = sharded(theta, stacked, w)
  want, want_count = ref(theta, stacked, w)
  assert float(count) == float(want_count) == sum(participating)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  # the packed path's Δ_p comes out sharded like the param (axis 0 unsharded
  # for a row slice); the fallback's is left to XLA here (the trainer's
  # outer program fixes it with out_shardings)
  specs = fr.take_like(trainer.trainer.param_shardings, frag,
                       lambda s, rows: tuple(s.spec) if rows is None
                       else (None,) + tuple(s.spec[1:]))
  skip = fallback_names(frag, trainer.trainer.param_shardings, theta, fmt, block)
  for k, v in got.items():
    if k in skip:
      continue
    spec = tuple(v.sharding.spec) + (None,) * (len(specs[k]) - len(v.sharding.spec))
    assert spec == specs[k], k
  return frag, got, want


@pytest.mark.parametrize("fmt", ["fp4_e3m0", "int8", "bf16", "none"])
@pytest.mark.parametrize("scan", [False, True])
def test_sharded_exchange_is_bit_identical_to_the_reference(fmt, scan):
  """Per-tensor scales; unscanned fragment 0 (embedder, final norm, layers 0
  and 2, all sharded over fsdp / tensor) or scanned fragment 1 (rows 1 and 3
  of the group axis, one scale per row); every replica, then one dropped."""
  frag_index = 1 if scan else 0
  for participating in ([1, 1], [1, 0]):
    frag, got, want = check_equal(scan, fmt, None, frag_index, participating)
  if scan:
    assert frag.selectors[0].rows == (1, 4, 2) and frag.selectors[0].row_tensors
  if fmt == "fp4_e3m0":  # the dropped replica's Δ really is left out and quantized
    theta, stacked = inputs(trainer_for(scan))
    name = frag.selectors[-1].name
    delta0 = fr.take(theta, frag)[name] - fr.take(jax.tree.map(lambda x: x[0], stacked),
                                                  frag)[name]
    assert not np.array_equal(np.asarray(got[name]), delta0)
    np.testing.assert_allclose(np.asarray(got[name]), delta0,
                               atol=float(np.max(np.abs(delta0))) / 2)
  if scan:  # per-row scales: the small rows are not flushed by row 3's scale
    name = frag.selectors[0].name
    assert np.count_nonzero(np.asarray(got[name])[0]) > 0.5 * got[name][0].size


@pytest.mark.parametrize("scan,block", [(False, 8), (False, 16), (False, 5), (True, 8),
                                        (True, 5)])
def test_sharded_exchange_per_block_scales(scan, block):
  """K = 8: every block lies in a shard (packed path for every tensor);
  K = 16: mlp up / gate (last dim 32, shards of 16) and the norms take the
  packed path; mlp down (last dim 16 sharded 2 ways over fsdp) and attention
  q / k / v (last dim 8: flattened blocks span rows of sharded tensors) fall
  back to the fp32 reference exchange; K = 5: only the unsharded tensors (norm
  scales) take the packed path. Scanned fragment 1 (rows 1 and 3): the same,
  with blocks (or quantize / dequantize) per row. Bit-identical in all cases."""
  trainer = trainer_for(scan)
  frag = trainer.fragments[1 if scan else 0]
  names = fallback_names(frag, trainer.trainer.param_shardings,
                         trainer.trainer.abstract_state.params, "fp4_e3m0", block)
  if block == 8:
    assert names == ()
  else:
    assert names and len(names) < len(frag.selectors)
  if not scan and block != 8:
    assert "layer_0/mlp/down" in names and "layer_0/pre_ffw_norm/scale" not in names
    assert ("layer_0/mlp/up" in names) == (block == 5)
  for participating in ([1, 1], [0, 1]):
    check_equal(scan, "fp4_e3m0", block, 1 if scan else 0, participating)


def test_sharded_exchange_two_replicas_per_device_group():
  """M = 4 over replica axis 2: each device group encodes two replicas."""
  check_equal(False, "fp4_e3m0", None, 0, [1, 0, 1, 1], num_replicas=4)


# ------------------------------------------------------------------ HLO

_COLLECTIVE = re.compile(
    r"=\s*(?P<types>.*?)\s(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


def collectives(hlo: str):
  """[(op, [(dtype, num_elements), ...], line)] of the compiled HLO."""
  out = []
  for line in hlo.splitlines():
    match = _COLLECTIVE.search(line)
    if match:
      arrays = [(a["dtype"], int(np.prod([int(d) for d in a["dims"].split(",") if d])))
                for a in _ARRAY.finditer(match["types"])]
      out.append((match["op"], arrays, line.strip()))
  return out


def outer_hlo(trainer, event, exchange_fn=None):
  fn = trainer.algo.outer_fn(event)
  if exchange_fn is not None:
    fn = functools.partial(fn.func, **{**fn.keywords, "exchange_fn": exchange_fn})
  jitted_fn = trainer._jit_outer(fn)  # pylint: disable=protected-access
  m = trainer.config.num_replicas
  return jitted_fn.lower(trainer.abstract_state,
                         jax.ShapeDtypeStruct((m,), jnp.float32)).compile().as_text()


def test_outer_program_all_gathers_packed_fp4_codes_over_replica():
  """The trainer's compiled outer program (exchange + outer step of fragment
  0): its exchange is u8 all-gathers over the replica groups; the only f32
  collectives are the scales (at most M floats per tensor: pmax within a
  replica group, all-gather over replicas). The reference exchange under the
  same shardings moves fragment-sized f32 arrays over "replica"."""
  trainer = trainer_for(False)
  m = trainer.config.num_replicas
  mesh = trainer.mesh
  axis = mesh.axis_names.index("replica")
  groups = np.moveaxis(np.vectorize(lambda d: d.id)(mesh.devices), axis, -1).reshape(-1, m)
  replica_groups = "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in groups) + "}"
  event = fr.Event(sync=(0,), apply=(0,))

  found = collectives(outer_hlo(trainer, event))
  u8 = [(arrays, line) for op, arrays, line in found
        if op == "all-gather" and arrays and all(d == "u8" for d, _ in arrays)
        and f"replica_groups={replica_groups}" in line]
  assert u8, "no all-gather of packed u8 codes over replica"
  frag = trainer.fragments[0]
  shapes = frag.shapes(trainer.trainer.abstract_state.params)
  # one u8 all-gather per tensor: [M, payload] bytes, payload = its shard's
  # ceil(n / 2) code bytes + 4 for its scale, split among the chips holding
  # the same shard (axes of size 2 that do not split it)
  assert len(u8) == len(shapes)
  gathered = sorted(n for arrays, _ in u8 for _, n in arrays)
  specs = fr.take_like(trainer.trainer.param_shardings, frag, lambda s, rows: s.spec)
  used = {k: [a for e in specs[k] for a in ((e,) if isinstance(e, str) else e or ())]
          for k in shapes}
  shards = {k: int(np.prod(shape)) // int(np.prod([mesh.shape[a] for a in used[k]]))
            for k, shape in shapes.items()}
  copies = {k: int(np.prod([mesh.shape[a] for a in ("fsdp", "tensor") if a not in used[k]]))
            for k in shapes}
  assert gathered == sorted(m * -(-(-(-shards[k] // 2) + 4) // copies[k]) for k in shapes)
  floats = [(op, arrays, line) for op, arrays, line in found
            if any(d in ("f32", "bf16") for d, _ in arrays)]
  assert floats  # the scales
  assert all(n <= m for _, arrays, _ in floats for _, n in arrays), floats

  # the old path (reference exchange, fake quantization + fp32 mean) fails both
  old = collectives(outer_hlo(trainer, event, exchange_fn=sd.exchange))
  assert not any(op == "all-gather" and any(d == "u8" for d, _ in arrays)
                 for op, arrays, _ in old)
  assert any(n > m for _, arrays, _ in old for d, n in arrays if d == "f32")
