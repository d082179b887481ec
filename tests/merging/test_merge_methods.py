"""Task arithmetic, TIES, DARE, model stock, greedy soup: hand computations on
tiny trees, limiting cases, no-op on identical models, bad input."""

import numpy as np
import pytest

from posttrain_jax import merging


def tree(w, b=0.0):
  return {"layer": {"w": np.asarray(w, np.float64)}, "b": np.asarray(b, np.float64)}


def close(a, b, **kw):
  np.testing.assert_allclose(a["layer"]["w"], b["layer"]["w"], **kw)
  np.testing.assert_allclose(a["b"], b["b"], **kw)


INIT = tree([1.0, 1.0, 1.0, 1.0], 0.5)
TAUS = [np.array([3.0, -1.0, 0.5, 2.0]), np.array([-1.0, -2.0, 4.0, 1.0]),
        np.array([2.0, 1.0, -0.1, -3.0])]
MODELS = [tree(INIT["layer"]["w"] + t, 0.5 + i) for i, t in enumerate(TAUS)]


def test_task_arithmetic_by_hand():
  init, a, b = tree([1.0, 2.0]), tree([2.0, 2.0], 1.0), tree([1.0, 5.0], -2.0)
  out = merging.task_arithmetic(init, [a, b], [0.5, 1.0])
  close(out, tree([1.5, 5.0], 0.5 * 1.0 + 1.0 * -2.0))
  # default lambda = 1/M is the plain average; one scalar applies to every model
  close(merging.task_arithmetic(init, [a, b]), merging.average([a, b]), atol=1e-12)
  close(merging.task_arithmetic(init, [a, b], 2.0), tree([3.0, 8.0], -2.0))
  with pytest.raises(ValueError, match="one lambda per model"):
    merging.task_arithmetic(init, [a, b], [1.0, 2.0, 3.0])


def test_ties_by_hand():
  # density 0.5 keeps the top 2 |tau| of each model's w:
  #   [3, 0, 0, 2], [0, -2, 4, 0], [2, 0, 0, -3]; sum [5, -2, 4, -1] -> signs [+, -, +, -]
  #   disjoint means: (3 + 2)/2, -2, 4, -3 (model 0's +2 disagrees with the elected -)
  out = merging.ties(INIT, MODELS, density=0.5, lam=1.0)
  np.testing.assert_allclose(out["layer"]["w"], 1.0 + np.array([2.5, -2.0, 4.0, -3.0]))
  # b: tau = 0, 1, 2 (a scalar: ceil(0.5) = 1 entry kept each); elected +, mean (1 + 2)/2
  np.testing.assert_allclose(out["b"], 0.5 + 1.5)
  half = merging.ties(INIT, MODELS, density=0.5, lam=0.5)
  np.testing.assert_allclose(half["layer"]["w"], 1.0 + 0.5 * np.array([2.5, -2.0, 4.0, -3.0]))
  with pytest.raises(ValueError, match="density must be in"):
    merging.ties(INIT, MODELS, density=0.0)


def test_ties_and_dare_with_nothing_trimmed_or_dropped_are_task_arithmetic():
  m = len(MODELS)
  ta = merging.task_arithmetic(INIT, MODELS, 1.0 / m)
  # no trim, no sign election: the mean task vector (entries are all non-zero)
  nonzero = [tree(x["layer"]["w"], 0.5 + 1.0 + i) for i, x in enumerate(MODELS)]
  close(merging.ties(INIT, nonzero, density=1.0, elect_sign=False),
        merging.task_arithmetic(INIT, nonzero, 1.0 / m), atol=1e-12)
  # with the sign election, the same when the task vectors agree in sign
  agree = [tree(1.0 + np.abs(t), 1.0 + i) for i, t in enumerate(TAUS)]
  close(merging.ties(INIT, agree, density=1.0), merging.task_arithmetic(INIT, agree, 1 / m),
        atol=1e-12)
  # ... and not in general (the election drops the minority sign)
  assert not np.allclose(merging.ties(INIT, MODELS, density=1.0)["layer"]["w"],
                         ta["layer"]["w"])
  for lambdas in (None, [0.2, 0.3, 1.5]):
    close(merging.dare(INIT, MODELS, drop=0.0, lambdas=lambdas),
          merging.task_arithmetic(INIT, MODELS, lambdas), atol=1e-12)


def test_dare_drops_and_rescales_seeded():
  rng = np.random.default_rng(0)
  init = {"w": rng.normal(size=(200, 50))}
  tau = rng.normal(size=(200, 50))
  model = {"w": init["w"] + tau}
  p = 0.7
  out = merging.dare(init, [model], drop=p, lambdas=1.0, seed=3)
  delta = out["w"] - init["w"]
  kept = delta != 0
  # kept entries are tau / (1 - p), the rest exactly 0; about 1 - p of them kept
  np.testing.assert_allclose(delta[kept], tau[kept] / (1 - p), rtol=1e-12)
  assert abs(kept.mean() - (1 - p)) < 0.02
  # seeded: same seed same merge, another seed another mask
  np.testing.assert_array_equal(out["w"], merging.dare(init, [model], p, 1.0, seed=3)["w"])
  assert not np.array_equal(out["w"], merging.dare(init, [model], p, 1.0, seed=4)["w"])
  # two models get independent masks, and the rescaling is unbiased on average
  two = merging.dare(init, [model, model], drop=p, lambdas=[0.5, 0.5], seed=3)
  d2 = two["w"] - init["w"]
  assert not np.array_equal(d2, delta * 0.5)
  mean = np.mean([merging.dare(init, [model], p, 1.0, seed=s)["w"] - init["w"]
                  for s in range(200)], axis=0)
  assert abs(np.mean(mean - tau)) < 0.01 and np.mean(np.abs(mean - tau)) < 0.15
  with pytest.raises(ValueError, match="drop rate must be in"):
    merging.dare(init, [model], drop=1.0)


def _pair(cos, norm_1=2.0, norm_2=3.0, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
  init = rng.normal(size=dim)
  d1 = norm_1 * q[:, 0]
  d2 = norm_2 * (cos * q[:, 0] + np.sqrt(1 - cos ** 2) * q[:, 1])
  return {"w": init}, {"w": init + d1}, {"w": init + d2}


def test_model_stock_on_two_models_matches_its_closed_form():
  for cos in (0.2, 0.5, 0.9):
    init, a, b = _pair(cos)
    t = 2 * cos / (1 + cos)
    expected = t * (a["w"] + b["w"]) / 2 + (1 - t) * init["w"]
    np.testing.assert_allclose(merging.model_stock(init, [a, b])["w"], expected, atol=1e-12)
  init, a, b = _pair(0.0)  # orthogonal task vectors: back to the init
  np.testing.assert_allclose(merging.model_stock(init, [a, b])["w"], init["w"], atol=1e-12)
  with pytest.raises(ValueError, match="at least 2"):
    merging.model_stock(init, [a])


def test_model_stock_three_models_by_hand_and_per_tensor():
  init = {"x": np.zeros(2), "y": np.ones(3)}
  ms = [{"x": np.array([1.0, 0.0]), "y": np.ones(3) + 1.0},
        {"x": np.array([0.0, 1.0]), "y": np.ones(3) + 2.0},
        {"x": np.array([1.0, 1.0]), "y": np.ones(3) + 3.0}]
  out = merging.model_stock(init, ms)
  # x: pairwise cosines 0, 1/sqrt2, 1/sqrt2 -> mean c; t = 3c / (1 + 2c)
  c = (2 / np.sqrt(2)) / 3
  t = 3 * c / (1 + 2 * c)
  np.testing.assert_allclose(out["x"], t * np.array([2 / 3, 2 / 3]), atol=1e-12)
  # y: parallel task vectors (cos 1, t 1): the mean, independent of x's angle
  np.testing.assert_allclose(out["y"], np.ones(3) + 2.0, atol=1e-12)


def test_identical_models_are_a_no_op_for_every_merge():
  p = MODELS[1]
  same = [p, p, p]
  close(merging.average(same), p, atol=1e-12)
  close(merging.task_arithmetic(INIT, same), p, atol=1e-12)
  close(merging.ties(INIT, same, density=1.0), p, atol=1e-12)
  close(merging.dare(INIT, same, drop=0.0), p, atol=1e-12)
  close(merging.model_stock(INIT, same), p, atol=1e-12)
  close(merging.greedy_soup(same, lambda q: 0.0).params, p, atol=1e-12)


def test_greedy_soup_by_hand():
  cands = [{"w": np.array(x)} for x in (1.0, 3.0, 10.0, 2.5)]
  metric = lambda q: -float((q["w"] - 2.0) ** 2)
  res = merging.greedy_soup(cands, metric)
  # alone: -1, -1, -64, -0.25; start from 2.5; + 1 -> 1.75 (-0.0625) kept;
  # + 3 -> 6.5/3 (-0.0278) kept; + 10 -> 4.125 (-4.52) dropped
  assert res.members == [3, 0, 1]
  np.testing.assert_allclose(res.individual, [-1, -1, -64, -0.25])
  np.testing.assert_allclose(res.params["w"], 6.5 / 3)
  assert [h[2] for h in res.history] == [True, True, True, False]
  # an equal score joins (the paper's >=), not with strict=True
  flat = merging.greedy_soup(cands[:2], lambda q: 1.0)
  assert flat.members == [0, 1]
  assert merging.greedy_soup(cands[:2], lambda q: 1.0, strict=True).members == [0]


def test_bad_input_gives_one_clear_error():
  a = {"w": np.zeros((2, 3))}
  for merge in (lambda ms: merging.task_arithmetic(a, ms), lambda ms: merging.ties(a, ms),
                lambda ms: merging.dare(a, ms), lambda ms: merging.model_stock(a, ms)):
    with pytest.raises(ValueError, match=r"model 1's parameters differ.*\(2, 4\).*Fix"):
      merge([a, {"w": np.zeros((2, 4))}])
    with pytest.raises(ValueError, match=r"model 0's parameters differ from init's.*missing"):
      merge([{"v": np.zeros((2, 3))}, a])
  with pytest.raises(ValueError, match="Nothing to merge"):
    merging.task_arithmetic(a, [])
