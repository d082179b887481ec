"""WARM weight averaging: linear-model exactness, identity, weights, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax import merging
from posttrain_jax.models import ModelConfig
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl.reward_model import RewardModel, is_reward_model, save_reward_model

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)


def rm_params(seed, backbone_seed=None):
  params = nn.unbox(RewardModel(CFG).init(jax.random.key(
      seed if backbone_seed is None else backbone_seed), jnp.zeros((1, 1), jnp.int32))["params"])
  head = jax.random.normal(jax.random.key(100 + seed), params["head"]["kernel"].shape)
  return jax.tree.map(np.asarray, dict(params, head={"kernel": head}))


def test_linear_reward_model_weight_average_equals_prediction_average():
  # linear model: heads on fixed features (shared backbone): averaging is exact
  members = [rm_params(i, backbone_seed=0) for i in range(4)]
  weights = [0.1, 0.2, 0.3, 0.4]
  tokens = jax.random.randint(jax.random.key(5), (6, 7), 1, 64)
  score = lambda p: RewardModel(CFG).apply({"params": p}, tokens)
  merged = merging.average(members, weights)
  ensemble = sum(w * score(p) for w, p in zip(weights, members))
  np.testing.assert_allclose(score(merged), ensemble, rtol=1e-5, atol=1e-6)
  # a plain linear model on random features, too
  x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
  ws = [{"w": np.random.default_rng(i).normal(size=(5,)).astype(np.float32), "b": np.float32(i)}
        for i in range(3)]
  avg = merging.average(ws)
  np.testing.assert_allclose(x @ avg["w"] + avg["b"],
                             np.mean([x @ w["w"] + w["b"] for w in ws], 0), rtol=1e-5)


def test_one_model_is_the_identity_and_identical_models_are_a_no_op():
  p = rm_params(0)
  assert merging.average([p]) is p
  same = merging.average([p, p, p], [1.0, 2.0, 3.0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), same, p)


def test_weights_are_normalised_and_validated():
  np.testing.assert_allclose(merging.normalized_weights([1, 3], 2), [0.25, 0.75])
  with pytest.raises(ValueError, match="one weight per model"):
    merging.normalized_weights([1.0], 2)
  with pytest.raises(ValueError, match="non-negative"):
    merging.normalized_weights([1.0, -1.0], 2)


def test_mismatched_shapes_are_rejected():
  a = {"w": np.zeros((2, 3), np.float32)}
  with pytest.raises(ValueError, match=r"model 1.*\(2, 4\)"):
    merging.average([a, {"w": np.zeros((2, 4), np.float32)}])
  with pytest.raises(ValueError, match="missing"):
    merging.average([a, {"v": np.zeros((2, 3), np.float32)}])


def test_merge_model_dirs_reward_models_and_architecture_check(tmp_path):
  dirs = []
  for i in range(3):
    dirs.append(str(tmp_path / f"rm{i}"))
    save_reward_model(dirs[-1], rm_params(i, backbone_seed=0), CFG)
  out = merging.merge_model_dirs(dirs, str(tmp_path / "warm"), weights=[1.0, 2.0, 1.0])
  assert is_reward_model(str(tmp_path / "warm"))
  # By hand: (phi_0 + 2 phi_1 + phi_2) / 4, leaf by leaf in float64.
  members = [rm_params(i, backbone_seed=0) for i in range(3)]
  expected = jax.tree.map(
      lambda a, b, c: (np.asarray(a, np.float64) + 2 * np.asarray(b, np.float64)
                       + np.asarray(c, np.float64)) / 4, *members)
  written = merging.load_models([str(tmp_path / "warm")])[0].params  # what is on disk
  for merged in (out.params, written):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float64), b,
                                                         rtol=1e-6, atol=1e-7),
                 merged, expected)
  other = ModelConfig(**{**CFG.__dict__, "mlp_dim": 48})
  params = nn.unbox(RewardModel(other).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
      "params"])
  save_reward_model(str(tmp_path / "big"), params, other)
  with pytest.raises(ValueError, match="different architectures.*mlp_dim"):
    merging.merge_model_dirs([dirs[0], str(tmp_path / "big")], str(tmp_path / "bad"))
  params_checkpoint.save(str(tmp_path / "policy"), rm_params(0)["backbone"], CFG)
  with pytest.raises(ValueError, match="reward models with policies"):
    merging.merge_model_dirs([dirs[0], str(tmp_path / "policy")], str(tmp_path / "bad2"))


# WARP merges (Ramé et al. 2024, arXiv 2406.16768): SLERP and LITI.
def _vectors(cos, norm=2.0, dim=8, seed=0):
  """init, theta_1, theta_2 whose task vectors have equal norm and the given cosine."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
  d1 = norm * q[:, 0]
  d2 = norm * (cos * q[:, 0] + np.sqrt(1 - cos ** 2) * q[:, 1])
  init = rng.normal(size=dim)
  return ({"w": init}, {"w": init + d1}, {"w": init + d2})


def test_slerp_endpoints_and_symmetry():
  init, a, b = _vectors(0.3)
  np.testing.assert_allclose(merging.slerp(init, a, b, 0.0)["w"], a["w"], atol=1e-12)
  np.testing.assert_allclose(merging.slerp(init, a, b, 1.0)["w"], b["w"], atol=1e-12)
  for lam in (0.2, 0.5, 0.7):
    np.testing.assert_allclose(merging.slerp(init, a, b, lam)["w"],
                               merging.slerp(init, b, a, 1 - lam)["w"], atol=1e-12)


def test_slerp_keeps_the_norm_and_lerp_shrinks_it():
  for cos in (-0.5, 0.0, 0.4, 0.9):
    init, a, b = _vectors(cos, norm=3.0)
    for lam in (0.25, 0.5, 0.8):
      s = merging.slerp(init, a, b, lam)["w"] - init["w"]
      np.testing.assert_allclose(np.linalg.norm(s), 3.0, rtol=1e-10)
      lerp = merging.average([a, b], [1 - lam, lam])["w"] - init["w"]
      expected = 3.0 * np.sqrt(1 - 2 * (1 - cos) * (lam - lam ** 2))
      np.testing.assert_allclose(np.linalg.norm(lerp), expected, rtol=1e-10)


def test_slerp_falls_back_to_lerp_for_parallel_or_zero_task_vectors():
  init, a, _ = _vectors(0.0)
  b = {"w": init["w"] + 2.0 * (a["w"] - init["w"])}  # parallel, Omega = 0
  lam = 0.3
  lerp = init["w"] + (1 - lam) * (a["w"] - init["w"]) + lam * (b["w"] - init["w"])
  out = merging.slerp(init, a, b, lam)["w"]
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, lerp, atol=1e-12)
  np.testing.assert_allclose(merging.slerp(init, init, a, 0.5)["w"],
                             init["w"] + 0.5 * (a["w"] - init["w"]), atol=1e-12)


def test_recursive_slerp_and_liti():
  init, a, b = _vectors(0.2)
  c = {"w": init["w"] + np.random.default_rng(5).normal(size=8)}
  np.testing.assert_allclose(merging.slerp_many(init, [a, b])["w"],
                             merging.slerp(init, a, b, 0.5)["w"], atol=1e-12)
  three = merging.slerp(init, merging.slerp(init, a, b, 0.5), c, 1 / 3)
  np.testing.assert_allclose(merging.slerp_many(init, [a, b, c])["w"], three["w"], atol=1e-12)
  with pytest.raises(ValueError, match="2 models only"):
    merging.slerp_many(init, [a, b, c], lam=0.5)
  assert merging.liti(init, a, 0.0) is init and merging.liti(init, a, 1.0) is a
  np.testing.assert_allclose(merging.liti(init, a, 0.3)["w"],
                             0.7 * init["w"] + 0.3 * a["w"], rtol=1e-6)
  with pytest.raises(ValueError, match="eta must be in"):
    merging.liti(init, a, 1.5)
