"""Merges are per layer whatever the parameter layout: merging a scanned tree
(scan_layers=True: each leaf stacks the layers of one pattern position) gives
the merge of the same tree unscanned, rescanned (SLERP angles, TIES trims,
model stock ratios, DARE masks), in memory and from model directories."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from posttrain_jax import merging
from posttrain_jax.merging.interpolation import task_vector_angles
from posttrain_jax.models import ModelConfig, layout, params_checkpoint

# 4 layers, pattern (local, global): 2 groups, so a scanned leaf holds 2 layers.
CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)
SCANNED_CFG = dataclasses.replace(CFG, scan_layers=True)
# Per layer: task-vector scale and the cosine between models 1 and 2's task
# vectors, so that per-layer and whole-leaf statistics differ a lot.
SCALES, COSINES = (1.0, 0.5, 0.02, 0.3), (0.9, 0.6, -0.5, 0.1)


@functools.cache
def _trees():
  """(init, [3 fine-tunings]) in the unscanned layout, float32 (random values on the
  model's parameter shapes: no model init to compile)."""
  rng = np.random.default_rng(0)
  init = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                      params_checkpoint.abstract_params(CFG))
  models = [{}, {}, {}]
  for name, sub in init.items():
    layer = int(name.split("_")[1]) if name.startswith("layer_") else None
    scale, cos = (0.1, 0.3) if layer is None else (SCALES[layer], COSINES[layer])
    def fine_tune(x):
      n1, n2, n3 = (rng.normal(size=x.shape) for _ in range(3))
      taus = (n1, cos * n1 + np.sqrt(1 - cos ** 2) * n2, n3)
      return [(x + scale * t).astype(x.dtype) for t in taus]
    tuned = jax.tree.map(fine_tune, sub)
    for m in range(3):
      models[m][name] = jax.tree.map(lambda t, m=m: t[m], tuned,
                                     is_leaf=lambda t: isinstance(t, list))
  return init, models


def _scanned(tree):
  return layout.scan_params(tree, CFG)


def _assert_close(unscanned, merged_scanned):
  assert layout.is_scanned(merged_scanned)
  back = layout.unscan_params(merged_scanned, CFG)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               back, unscanned)


MERGES = {
    "slerp": lambda init, ms: merging.slerp(init, ms[0], ms[1], 0.3),
    "slerp_many": lambda init, ms: merging.slerp_many(init, ms),
    "liti": lambda init, ms: merging.liti(init, merging.slerp_many(init, ms[:2]), 0.3),
    "ties": lambda init, ms: merging.ties(init, ms, density=0.2, lam=1.0),
    "model_stock": lambda init, ms: merging.model_stock(init, ms),
    "dare": lambda init, ms: merging.dare(init, ms, drop=0.5, seed=3),
    "task_arithmetic": lambda init, ms: merging.task_arithmetic(init, ms, [0.5, 0.3, 0.2]),
    "average": lambda init, ms: merging.average(ms, [1.0, 2.0, 3.0]),
}


def test_every_merge_of_a_scanned_tree_is_the_unscanned_merge_rescanned():
  init, models = _trees()
  init_s, models_s = _scanned(init), [_scanned(m) for m in models]
  differ = []
  for name, merge in MERGES.items():
    try:
      _assert_close(merge(init, models), merge(init_s, models_s))
    except AssertionError:
      differ.append(name)
  assert not differ, f"merges that depend on the layout: {differ}"
  # one angle per (layer, parameter), keyed by the layer's unscanned path
  angles_u = task_vector_angles(init, models[0], models[1])
  angles_s = task_vector_angles(init_s, models_s[0], models_s[1])
  assert angles_s == pytest.approx(angles_u, abs=1e-9)
  for i, cos in enumerate(COSINES):
    assert angles_s[f"['layer_{i}']['mlp']['up']"] == pytest.approx(
        np.degrees(np.arccos(cos)), abs=8.0)
  # a reward model's tree: the layers under "backbone"
  rm = lambda t: {"backbone": t, "head": {"kernel": t["final_norm"]["scale"][:, None]}}
  got = merging.ties(rm(init_s), [rm(m) for m in models_s], density=0.2)
  want = merging.ties(rm(init), [rm(m) for m in models], density=0.2)
  _assert_close(want["backbone"], got["backbone"])


def test_the_fixture_tells_whole_leaf_statistics_from_per_layer_ones():
  """One SLERP angle / TIES threshold / model stock ratio over a whole scanned
  leaf (the merges before they went per layer) differs from the per-layer
  merge, so the test above would catch that."""
  init, models = _trees()
  init_s, models_s = _scanned(init), [_scanned(m) for m in models]
  leaf = lambda t: t["layers"]["local_0"]["mlp"]["up"]
  rules = {"slerp": lambda t0, xs: merging.interpolation._slerp_leaf(t0, xs[0], xs[1], 0.3,
                                                                      1e-6),
           "ties": lambda t0, xs: merging.ties_rule(0.2, 1.0)("", t0, xs),
           "model_stock": lambda t0, xs: merging.model_stock_rule()("", t0, xs)}
  per_layer = {"slerp": merging.slerp(init_s, models_s[0], models_s[1], 0.3),
               "ties": merging.ties(init_s, models_s, density=0.2),
               "model_stock": merging.model_stock(init_s, models_s)}
  for name, rule in rules.items():
    whole = rule(leaf(init_s), [leaf(m) for m in models_s])
    assert not np.allclose(whole, leaf(per_layer[name]), rtol=1e-3, atol=1e-5), name


def test_model_directories_of_either_layout_merge_alike(tmp_path):
  """slerp_model_dirs (WARP's SLERP via load_models) and the leaf-by-leaf merges of
  tools/merge.py (stream_merge) on scanned and unscanned directories."""
  init, models = _trees()
  dirs = {}
  for scanned, cfg in ((False, CFG), (True, SCANNED_CFG)):
    dirs[scanned] = []
    for name, tree in zip(("init", "m0", "m1", "m2"), [init, *models]):
      d = str(tmp_path / f"{name}_{'scanned' if scanned else 'unscanned'}")
      params_checkpoint.save(d, _scanned(tree) if scanned else tree, cfg)
      dirs[scanned].append(d)
  out = {}
  for scanned in (False, True):
    o = str(tmp_path / f"slerp_{scanned}")
    loaded = merging.slerp_model_dirs(dirs[scanned][0], dirs[scanned][1:3], o, lam=0.3)
    assert layout.is_scanned(loaded.params) == scanned  # written in the saved layout
    out[scanned] = params_checkpoint.load_numpy_params(o, CFG)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               out[True], out[False])
  # TIES, model stock and DARE in one pass over the checkpoints (reads dominate):
  # the sum of their task vectors, wrong if any of them is
  rules = (merging.ties_rule(0.2, 1.0), merging.model_stock_rule(),
           merging.dare_rule(0.5, np.full(3, 1 / 3), 3))
  def rule(path, t0, leaves):
    return sum(r(path, t0, leaves).astype(np.float64) - t0 for r in rules) + t0
  unscanned = merging.stream_merge(rule, dirs[False][1:], init=dirs[False][0])
  scanned = merging.stream_merge(rule, dirs[True][1:], init=dirs[True][0])
  _assert_close(unscanned, scanned)
