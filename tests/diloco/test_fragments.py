"""Streaming DiLoCo fragments: exact partition, strided/sequential, schedule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.diloco import fragments as fr
from posttrain_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=6, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)


def abstract_params(scan=False, num_layers=6):
  cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": scan, "num_layers": num_layers})
  return nn.unbox(jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))


def total_size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("pattern", fr.PATTERNS)
@pytest.mark.parametrize("embeddings", fr.EMBEDDINGS)
def test_fragments_partition_every_element_once(scan, pattern, embeddings):
  params = abstract_params(scan, num_layers=12)  # 12 layers or 6 scanned groups
  for p in (1, 2, 3):
    frags = fr.make_fragments(params, p, pattern, embeddings)
    assert len(frags) == p + (embeddings == "separate")
    for name, count in fr.element_owners(params, frags).items():
      assert np.all(count == 1), name
    assert sum(f.size(params) for f in frags) == total_size(params)


@pytest.mark.parametrize("scan", [False, True])
def test_strided_and_sequential_assignment(scan):
  params = abstract_params(scan, num_layers=12)
  n = 6 if scan else 12
  strided = fr.make_fragments(params, 3, "strided")
  sequential = fr.make_fragments(params, 3, "sequential")
  assert [f.layers for f in strided] == [tuple(range(p, n, 3)) for p in range(3)]
  assert [f.layers for f in sequential] == [tuple(range(p * n // 3, (p + 1) * n // 3))
                                            for p in range(3)]
  assert [f.has_non_layer for f in strided] == [True, False, False]
  names = {s.name for s in strided[1].selectors}
  if scan:  # slices of the group axis, every scanned leaf
    assert all(s.rows == (1, 5, 3) for s in strided[1].selectors)  # groups 1, 4
    assert "layers/local_0/attn/q" in names
  else:
    assert {n.split("/")[0] for n in names} == {"layer_1", "layer_4", "layer_7",
                                                "layer_10"}
  assert fr.assign_layers(5, 2, "sequential") == [(0, 1, 2), (3, 4)]


def test_take_put_round_trip_scanned():
  params = abstract_params(True, num_layers=8)
  rng = np.random.default_rng(0)
  tree = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  frags = fr.make_fragments(tree, 2, "strided", "separate")
  zero = jax.tree.map(jnp.zeros_like, tree)
  rebuilt = zero
  for f in frags:
    vals = fr.take(tree, f)
    assert {k: v.shape for k, v in vals.items()} == f.shapes(tree)
    rebuilt = fr.put(rebuilt, f, vals)
  jax.tree.map(np.testing.assert_array_equal, rebuilt, tree)
  # put touches only the fragment: rows 0 and 2 of the group axis
  one = fr.put(zero, frags[0], jax.tree.map(jnp.ones_like, fr.take(zero, frags[0])))
  q = np.asarray(one["layers"]["local_0"]["attn"]["q"])
  assert q[0].min() == 1 and q[2].min() == 1 and q[1].max() == 0 and q[3].max() == 0
  assert np.asarray(one["embedder"]["embedding"]).max() == 0
  # vmapped over a leading replica axis
  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree)
  vals = jax.vmap(lambda t: fr.take(t, frags[1]))(stacked)
  np.testing.assert_array_equal(vals["layers/global_1/mlp/up"][1],
                                2 * tree["layers"]["global_1"]["mlp"]["up"][1::2])


@pytest.mark.parametrize("h,num,tau", [(100, 4, 1), (30, 8, 5), (6, 3, 0), (1, 1, 0),
                                       (4, 5, 2)])
def test_each_fragment_syncs_once_per_window(h, num, tau):
  sched = fr.SyncSchedule(num, h, tau)
  t_p = sched.offsets
  assert t_p[0] == 0 and list(t_p) == sorted(t_p) and t_p[-1] < h
  events = {t: sched.event(t) for t in range(1, 5 * h + 1)}
  for start in range(1, 4 * h + 1):  # every window of H consecutive steps
    window = [p for t in range(start, start + h) for p in events[t].sync]
    assert sorted(window) == list(range(num))
  for t, e in events.items():  # applies follow syncs by exactly tau steps
    assert e.apply == (events[t - tau].sync if t - tau >= 1 else ())
  assert len(sched.events()) <= 2 * num + 1
  assert set(events.values()) <= sched.events()


def test_offsets_and_vanilla_schedule():
  assert fr.offsets(4, 100) == (0, 25, 50, 75)
  assert fr.offsets(3, 100) == (0, 33, 67)
  sched = fr.SyncSchedule(1, 3, 0)
  assert [sched.event(t).sync for t in range(1, 7)] == [(), (), (0,), (), (), (0,)]
  with pytest.raises(ValueError, match="overlap"):
    fr.SyncSchedule(2, 4, 4)


def test_errors():
  with pytest.raises(ValueError, match="No transformer layers"):
    fr.make_fragments({"w": jnp.zeros(3)}, 1)
  with pytest.raises(ValueError, match="num_fragments"):
    fr.make_fragments(abstract_params(), 7)
  with pytest.raises(ValueError, match="pattern"):
    fr.make_fragments(abstract_params(), 2, "random")


@pytest.mark.parametrize("scan", [False, True])
def test_split_embeddings_balance_fragments_and_peak_traffic(scan):
  # "split" cuts the embedding table (vocab rows) and the final norm into P
  # slices, one per fragment: equal fragments, so the peak per-sync payload is
  # exactly 1/P of a full sync; "join" puts it all in fragment 0.
  from posttrain_jax.diloco.streaming_diloco import Traffic  # pylint: disable=import-outside-toplevel
  params = abstract_params(scan, num_layers=4)
  split = fr.make_fragments(params, 2, "strided", "split")
  joined = fr.make_fragments(params, 2, "strided", "join")
  assert split[0].size(params) == split[1].size(params) == total_size(params) // 2
  assert joined[0].size(params) > joined[1].size(params)
  emb = [s for f in split for s in f.selectors if s.name == "embedder/embedding"]
  assert [s.rows for s in emb] == [(0, 32, 1), (32, 64, 1)] and not emb[0].row_tensors
  assert all(f.has_non_layer for f in split)
  for fmt in ("fp4_e3m0", "int8", "none"):
    t = Traffic.build(params, split, fmt, None)
    assert t.payload_bytes[0] == t.payload_bytes[1] == t.full_sync_bytes // 2
    assert max(Traffic.build(params, joined, fmt, None).payload_bytes) > t.full_sync_bytes // 2
  # an embedding slice is one tensor: FP4 payload = its codes + one fp32 scale
  fp4 = Traffic.build(params, split, "fp4_e3m0", None).payload_bytes[0]
  one = {s.name: s for s in split[0].selectors}
  layer_bytes = Traffic.build(params, (fr.Fragment(0, (), False, tuple(
      s for s in split[0].selectors if s.rows is None or s.row_tensors)),),
                              "fp4_e3m0", None).payload_bytes[0]
  assert fp4 - layer_bytes == (32 * 16) // 2 + 4 + 8 // 2 + 4  # embedding + norm slices
  assert "final_norm/scale" in one
  # take / put round trip on real arrays
  values = jax.tree.map(lambda x: jnp.arange(np.prod(x.shape), dtype=jnp.float32).reshape(
      x.shape), params)
  for f in split:
    got = fr.take(values, f)
    np.testing.assert_array_equal(got["embedder/embedding"], np.asarray(
        values["embedder"]["embedding"])[slice(*emb[f.index].rows)])
    back = fr.put(values, f, got)
    jax.tree.map(np.testing.assert_array_equal, back, values)
