"""tools/eval_front.py: the points of each front mode (LITI, SLERP, LERP, models)
and the bad-grid error; the sampling side is tools/eval_policy.py's."""

import importlib.util
import os

import numpy as np
import pytest

from posttrain_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("eval_front",
                                               os.path.join(REPO, "tools", "eval_front.py"))
eval_front = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_front)

SFT = {"w": np.array([1.0, 0.0, 0.0])}
MODELS = {"sft": SFT, "a": {"w": np.array([1.0, 1.0, 0.0])},
          "b": {"w": np.array([1.0, 0.0, 1.0])}}


def _points(argv):
  args = eval_front.parse_args(["--sft", "sft", "--reward", "gold", "--out", "x"] + argv)
  return [(label, c, p["w"]) for label, c, p in eval_front.points(args, SFT, MODELS.__getitem__)]


def test_liti_front_interpolates_from_the_sft_model():
  pts = _points(["liti", "--merge", "a", "--grid", "0,0.3,1"])
  assert [c for _, c, _ in pts] == [0.0, 0.3, 1.0]
  np.testing.assert_allclose(pts[1][2], [1.0, 0.3, 0.0])
  np.testing.assert_allclose(pts[0][2], SFT["w"])
  np.testing.assert_allclose(pts[2][2], MODELS["a"]["w"])


def test_slerp_and_lerp_fronts_between_two_policies():
  slerp = _points(["slerp", "--init", "sft", "--a", "a", "--b", "b", "--grid", "0,0.5,1"])
  lerp = _points(["slerp", "--init", "sft", "--a", "a", "--b", "b", "--grid", "0,0.5,1",
                  "--lerp"])
  for pts in (slerp, lerp):
    np.testing.assert_allclose(pts[0][2], MODELS["a"]["w"])
    np.testing.assert_allclose(pts[2][2], MODELS["b"]["w"])
  # Orthogonal unit task vectors: SLERP keeps the norm 1, LERP shrinks it to 1/sqrt(2).
  np.testing.assert_allclose(slerp[1][2], [1.0, np.sqrt(0.5), np.sqrt(0.5)])
  np.testing.assert_allclose(lerp[1][2], [1.0, 0.5, 0.5])
  assert slerp[1][0] == "slerp lambda=0.5" and lerp[1][0] == "lerp lambda=0.5"


def test_models_mode_and_bad_input():
  assert [label for label, _, _ in _points(["models", "a", "b", "--labels", "x,y"])] == ["x", "y"]
  with pytest.raises(cli.ConfigError, match="--labels has 1 entries for 2 dirs"):
    _points(["models", "a", "b", "--labels", "x"])
  with pytest.raises(ValueError, match=r"--grid \(eta\) must be a non-empty list of values in"):
    _points(["liti", "--merge", "a", "--grid", "0,1.5"])
