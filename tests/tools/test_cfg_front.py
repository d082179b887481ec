"""tools/cfg_front.py: distinct n-grams, combining seeds, the table and the plot."""

import importlib.util
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("cfg_front",
                                               os.path.join(REPO, "tools", "cfg_front.py"))
cfg_front = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg_front)


def test_distinct_n_pools_the_samples_of_one_prompt():
  tokens = np.array([[5, 6, 5, 6], [5, 6, 7, 8], [1, 2, 3, 4], [1, 2, 3, 4]])
  mask = np.ones_like(tokens, bool)
  # prompt 1: bigrams 56 65 56 | 56 67 78 -> 4 distinct of 6; prompt 2: 3 of 6
  assert abs(cfg_front.distinct_n(tokens, mask, 2) - (4 / 6 + 3 / 6) / 2) < 1e-9


def _point(kind, value, **kw):
  return dict(kind=kind, teacher_logp=value, gold_reward=value, diversity=value,
              distinct_2=value, ms_per_token=1.0, response_length=3.0,
              forward_rows_per_token=2 if kind == "cfg" else 1, **kw)


def test_combine_averages_matching_points_and_plots(tmp_path):
  files = []
  for seed, v in enumerate((1.0, 3.0)):
    pts = [_point("cfg", v, gamma=3.0), _point("lerp", -v, **{"lambda": 0.0}),
           _point("lerp", v, **{"lambda": 1.0}), _point("student", 0.0, name="beta=5")]
    files.append(str(tmp_path / f"front{seed}.json"))
    with open(files[-1], "w") as f:
      json.dump(pts, f)
  out = cfg_front.combine(files)
  assert out[0]["teacher_logp"] == 2.0 and out[0]["seeds"] == 2
  assert abs(out[0]["teacher_logp_seed_stderr"] - 1.0) < 1e-9
  assert out[1]["diversity"] == -2.0
  assert "cfg gamma=3" in cfg_front.table(out) and "beta=5" in cfg_front.table(out)
  cfg_front.plot(out, str(tmp_path / "front.png"))
  assert os.path.getsize(tmp_path / "front.png") > 1000
