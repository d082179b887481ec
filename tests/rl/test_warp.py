"""WARP's pure parts (rl/warp.py) and its per-tensor SLERP (Ramé et al. 2024, arXiv 2406.16768;
endpoints, symmetry, norms, LERP fallback, recursive SLERP and LITI are in
tests/merging/test_merging.py, mu = 0 in tests/rl/test_policy_training.py)."""

import math
import os

import numpy as np
import pytest

from posttrain_jax.merging.interpolation import slerp, slerp_many, task_vector_angles
from posttrain_jax.rl import warp


def _pair(cos, dim, rng, norm=1.0):
  q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
  return norm * q[:, 0], norm * (cos * q[:, 0] + math.sqrt(1 - cos ** 2) * q[:, 1])


def _closed_form(d1, d2, lam):
  omega = math.acos(np.dot(d1, d2) / (np.linalg.norm(d1) * np.linalg.norm(d2)))
  return (math.sin((1 - lam) * omega) * d1 + math.sin(lam * omega) * d2) / math.sin(omega)


def test_slerp_is_per_tensor_with_its_own_angle():
  """Two tensors at 30 and 120 degrees: each is slerped with its own Omega, which
  differs from one SLERP of the concatenated task vector."""
  rng = np.random.default_rng(0)
  a1, a2 = _pair(math.cos(math.radians(30)), 6, rng, norm=2.0)
  b1, b2 = _pair(math.cos(math.radians(120)), 4, rng, norm=0.5)
  init = {"a": rng.normal(size=6), "b": rng.normal(size=4)}
  t1 = {"a": init["a"] + a1, "b": init["b"] + b1}
  t2 = {"a": init["a"] + a2, "b": init["b"] + b2}
  angles = task_vector_angles(init, t1, t2)
  assert angles == pytest.approx({"['a']": 30.0, "['b']": 120.0}, abs=1e-9)
  longer = {k: init[k] + 3.0 * (t2[k] - init[k]) for k in init}   # the angle ignores norms
  assert task_vector_angles(init, t1, longer) == pytest.approx(angles, abs=1e-9)
  out = slerp(init, t1, t2, 0.3)
  np.testing.assert_allclose(out["a"] - init["a"], _closed_form(a1, a2, 0.3), atol=1e-12)
  np.testing.assert_allclose(out["b"] - init["b"], _closed_form(b1, b2, 0.3), atol=1e-12)
  whole = _closed_form(np.concatenate([a1, b1]), np.concatenate([a2, b2]), 0.3)
  assert not np.allclose(np.concatenate([out["a"] - init["a"], out["b"] - init["b"]]), whole)


def test_scanned_leaves_get_one_angle_per_layer():
  """A scanned leaf (models/layout.py: layers/{type}_{j}, layers stacked on axis 0)
  holding a 30- and a 120-degree layer: each layer is slerped with its own angle,
  reported under its unscanned path."""
  rng = np.random.default_rng(2)
  (a1, a2), (b1, b2) = (_pair(math.cos(math.radians(d)), 6, rng) for d in (30, 120))
  init = {"layers": {"local_0": {"w": rng.normal(size=(2, 6))}}}
  t1 = {"layers": {"local_0": {"w": init["layers"]["local_0"]["w"] + np.stack([a1, b1])}}}
  t2 = {"layers": {"local_0": {"w": init["layers"]["local_0"]["w"] + np.stack([a2, b2])}}}
  assert task_vector_angles(init, t1, t2) == pytest.approx(
      {"['layer_0']['w']": 30.0, "['layer_1']['w']": 120.0}, abs=1e-9)
  out = slerp(init, t1, t2, 0.3)["layers"]["local_0"]["w"] - init["layers"]["local_0"]["w"]
  np.testing.assert_allclose(out, np.stack([_closed_form(a1, a2, 0.3),
                                            _closed_form(b1, b2, 0.3)]), atol=1e-12)
  # a "layers" node not named like the scanned layout is an ordinary leaf
  other = lambda t: {"layers": {"dense": t["layers"]["local_0"]}}
  assert list(task_vector_angles(other(init), other(t1), other(t2))) == ["['layers']['dense']['w']"]


def test_recursive_slerp_with_two_models_is_the_closed_form():
  rng = np.random.default_rng(1)
  d1, d2 = rng.normal(size=5), rng.normal(size=5)
  init = {"w": rng.normal(size=5)}
  merged = slerp_many(init, [{"w": init["w"] + d1}, {"w": init["w"] + d2}])
  np.testing.assert_allclose(merged["w"], init["w"] + _closed_form(d1, d2, 0.5), atol=1e-12)


def test_angles_of_zero_task_vectors_are_nan_and_ignored_in_the_summary():
  init = {"a": np.zeros(3), "b": np.ones(2)}
  t1 = {"a": np.array([1.0, 0, 0]), "b": np.ones(2)}      # b did not move
  t2 = {"a": np.array([0.0, 1, 0]), "b": np.array([2.0, 1])}
  angles = task_vector_angles(init, t1, t2)
  assert angles["['a']"] == pytest.approx(90.0) and math.isnan(angles["['b']"])
  assert warp.angle_summary(angles) == {"mean": pytest.approx(90.0), "min": pytest.approx(90.0),
                                        "max": pytest.approx(90.0), "count": 1}
  # Opposite task vectors are 180 degrees apart (clipped arccos, no NaN).
  assert task_vector_angles(init, t1, {"a": -t1["a"], "b": np.ones(2) + 1})["['a']"] == \
      pytest.approx(180.0)


def test_plan_rejects_bad_settings_with_the_fix():
  plan = warp.WarpPlan(2, [5, 3], eta=0.3)
  assert plan.num_iterations == 2 and plan.steps_per_iteration == (5, 3)
  with pytest.raises(ValueError, match="num_runs \\(M\\) >= 2"):
    warp.WarpPlan(1, [5])
  with pytest.raises(ValueError, match="one positive step count per iteration"):
    warp.WarpPlan(2, [])
  with pytest.raises(ValueError, match="one positive step count"):
    warp.WarpPlan(2, [5, 0])
  with pytest.raises(ValueError, match="eta must be in \\(0, 1\\]"):
    warp.WarpPlan(2, [5], eta=0.0)
  with pytest.raises(ValueError, match="applies to num_runs = 2 only"):
    warp.WarpPlan(3, [5], slerp_lambda=0.5)
  with pytest.raises(ValueError, match="slerp_lambda must be in"):
    warp.WarpPlan(2, [5], slerp_lambda=1.5)


def test_prompt_seeds_differ_between_every_run_of_a_job():
  seeds = {warp.prompt_seed(7, i, m, 3) for i in (1, 2, 3) for m in range(3)}
  assert len(seeds) == 9 and min(seeds) == 7


def test_pending_follows_the_done_markers(tmp_path):
  root = str(tmp_path)
  plan = warp.WarpPlan(2, [1, 1])
  assert warp.pending(plan, root)[:4] == [(1, "run", 0), (1, "run", 1), (1, "slerp", None),
                                          (1, "liti", None)]
  assert len(warp.pending(plan, root)) == 8
  d = warp.run_dir(root, 1, 0)
  os.makedirs(d)
  warp.mark_done(d, {"x": 1})
  assert warp.read_done(d) == {"x": 1}
  assert warp.pending(plan, root)[0] == (1, "run", 1)
  assert warp.init_of(root, 1, "sft") == "sft"
  assert warp.init_of(root, 2, "sft") == warp.liti_dir(root, 1)
