"""tools/plot_clp.py: monotonicity counts, hypervolume, the figure and table."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))

import plot_clp  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_violations_and_hypervolume():
  assert plot_clp.violations([0.1, 0.2, 0.3]) == 0
  assert plot_clp.violations([0.1, 0.3, 0.2, 0.4]) == 1
  # two points dominating (0, 0): the union of [0,1]x[0,2] and [0,2]x[0,1] has area 3
  assert plot_clp.hypervolume([(1.0, 2.0), (2.0, 1.0)], (0.0, 0.0)) == pytest.approx(3.0)
  assert plot_clp.hypervolume([(1.0, 1.0), (0.5, 0.5)], (0.0, 0.0)) == pytest.approx(1.0)
  assert plot_clp.hypervolume([(-1.0, 2.0)], (0.0, 0.0)) == 0.0


def test_figure_and_table(tmp_path, capsys):
  def write(name, pts):
    (tmp_path / f"{name}.json").write_text(json.dumps({"points": pts}))
  point = lambda c, r0, r1: {"coefficient": c, "reward_0": r0, "reward_1": r1,
                             "kl_sft_token_sum": 1.0}
  write("sft", [point(None, 0.3, 0.2)])
  write("soups", [point(0.0, 0.5, 0.1), point(1.0, 0.1, 0.7)])
  write("full", [point(0.0, 0.55, 0.15), point(0.5, 0.4, 0.4), point(1.0, 0.2, 0.7)])
  assert plot_clp.main(["--fronts", str(tmp_path), "--out", str(tmp_path / "f.png")]) == 0
  assert (tmp_path / "f.png").stat().st_size > 0
  table = capsys.readouterr().out
  assert "| full-CLP | 0, 0.5, 1 | 0.550, 0.400, 0.200 | 0.150, 0.400, 0.700 |" in table
  assert "0/2 | 0/2 |" in table and "prompt" not in table
