"""Plots and tabulates the policy stage of the ratatouille experiment.

  python tools/plot_ratatouille_policy.py --root runs/ratatouille/policy \
      --best runs/ratatouille/best_merge.json --out docs/experiments/ratatouille_policy.png

Reads the TensorBoard scalars of the two REINFORCE runs of
tools/run_ratatouille.sh under --root: policy_single (against the single reward
model warm_0) and policy_best (against the best merge of the report, named in
--best), for the training batches (`reward`, `gold_reward`, `kl_sft`: means over
each logging window) and the held-out prompts (`eval/...`). Writes one figure
(proxy reward, gold reward and KL(pi || pi_sft) vs step, gold vs KL) and prints
the table of tools/plot_warm.py per source: start, peak and final gold, the
gold drop after its peak, the first step where gold is --drop below its running
maximum, proxy start -> final and the final KL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
if _TOOLS not in sys.path:
  sys.path.insert(0, _TOOLS)

# pylint: disable=g-import-not-at-top,wrong-import-position
from plot_warm import load_runs, plot, print_tables  # puts the repo root on sys.path

RUNS = ("policy_single", "policy_best")


def labels(best_json: str | None) -> dict[str, str]:
  """Legend labels; the best merge is named from best_merge.json when given."""
  best = "best merge"
  if best_json and os.path.isfile(best_json):
    with open(best_json) as f:
      info = json.load(f)
    best = f"best merge: {info['label']}"
  return {"policy_single": "single RM (warm_0)", "policy_best": best}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/ratatouille/policy")
  parser.add_argument("--best", default="runs/ratatouille/best_merge.json",
                      help="best_merge.json of tools/report_ratatouille.py (for the label)")
  parser.add_argument("--out", default="docs/experiments/ratatouille_policy.png")
  parser.add_argument("--drop", type=float, default=0.1,
                      help="gold drop below its running maximum that the table dates")
  args = parser.parse_args(argv)
  runs = load_runs(args.root, RUNS)
  if not runs:
    print(f"plot_ratatouille_policy: no RL runs with gold_reward scalars under {args.root} "
          f"(expected {' and '.join(RUNS)}; run bash tools/run_ratatouille.sh policy)",
          file=sys.stderr)
    return 2
  names = labels(args.best)
  plot(runs, args.out, names, "RL against the single RM vs against the best merge "
       "(ratatouille, CPU scale)")
  print(f"wrote {args.out}")
  print_tables(runs, args.drop, names)
  return 0


if __name__ == "__main__":
  sys.exit(main())
