"""pick_best of tools/report_ratatouille.py: the rule that names the policy stage's RM."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))

import report_ratatouille  # pylint: disable=g-import-not-at-top,wrong-import-position

from posttrain_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def _row(name, val, ood, members=2):
  return {"label": name, "directory": name, "members": members,
          "validation": (val, 0.05, 98), "OOD": (ood, 0.05, 98)}


def test_highest_ood_wins_over_validation():
  rows = [_row("rm/warm_0", 0.9, 0.9, 1), _row("merge/a", 0.8, 0.60),
          _row("merge/b", 0.6, 0.65), _row("merge/c", 0.7, 0.62)]
  # Single RMs are not candidates even when better; OOD decides before validation.
  assert report_ratatouille.pick_best(rows)["directory"] == "merge/b"


def test_ties_go_to_validation_then_table_order():
  rows = [_row("merge/a", 0.60, 0.64), _row("merge/b", 0.70, 0.64),
          _row("merge/c", 0.70, 0.64), _row("merge/d", 0.90, 0.63)]
  assert report_ratatouille.pick_best(rows)["directory"] == "merge/b"


def test_single_member_greedy_soup_is_not_a_merge():
  rows = [_row("merge/greedy", 0.9, 0.9, members=1), _row("merge/avg", 0.6, 0.6)]
  assert report_ratatouille.pick_best(rows)["directory"] == "merge/avg"


def test_only_rows_under_merge_are_candidates():
  # A fine-tune whose reward_model.json carries its init's merge info is still one RM.
  rows = [_row("rm/rat_a/reward_model", 0.9, 0.9, members=2), _row("merge/avg", 0.6, 0.6)]
  assert report_ratatouille.pick_best(rows)["directory"] == "merge/avg"


def test_no_merge_one_clear_error():
  with pytest.raises(cli.ConfigError, match="run the merge stage"):
    report_ratatouille.pick_best([_row("rm/warm_0", 0.9, 0.9, 1)])
