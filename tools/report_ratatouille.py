"""Scores the reward models of tools/run_ratatouille.sh on held-out and OOD pairs.

  python tools/report_ratatouille.py --root runs/ratatouille \
      --out docs/experiments/ratatouille.png

Pairwise accuracy (r(chosen) > r(rejected)) of every reward model and merge on
ROOT/preferences_validation.jsonl (clean, the target distribution) and
ROOT/preferences_ood.jsonl (shorter prompts sampled at temperature 1.5), with
its binomial standard error; a markdown table on stdout and a bar plot. Also
writes ROOT/accuracies.json (every row) and ROOT/best_merge.json, the reward model
that the `policy` stage of tools/run_ratatouille.sh trains against, chosen by
`pick_best` (a rule fixed before any policy was trained).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))
sys.path.insert(0, _TOOLS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from posttrain_jax import cli
from posttrain_jax.rl.reward_model import is_reward_model, load_reward_fn, read_reward_info
import score

ROWS = [  # (label, directory under ROOT)
    ("probe only (init)", "rm/probe/reward_model"),
    ("single RM (warm_0)", "rm/warm_0/reward_model"),
    ("WARM member warm_1", "rm/warm_1/reward_model"),
    ("WARM M=2 (uniform)", "merge/warm"),
    ("inter-training M=1 (rat_a)", "rm/rat_a/reward_model"),
    ("inter-training M=1 (rat_b)", "rm/rat_b/reward_model"),
    ("ratatouille M=2 (uniform)", "merge/ratatouille"),
    ("ratatouille M=2 (greedy)", "merge/ratatouille_greedy"),
    ("4 RMs: average", "merge/all_average"),
    ("4 RMs: task arithmetic (lambda 0.4)", "merge/all_task_arithmetic"),
    ("4 RMs: TIES (k 0.2, lambda 1)", "merge/all_ties"),
    ("4 RMs: DARE (p 0.9)", "merge/all_dare"),
    ("4 RMs: model stock", "merge/all_model_stock"),
    ("4 RMs: greedy soup", "merge/all_greedy"),
]


def accuracy(fn, path: str, batch_size: int) -> tuple[float, float, int]:
  _, records = score.read_records(path)
  length = max(len(r["prompt"]) + len(r[s]) for r in records for s in ("chosen", "rejected"))
  batch = -(-batch_size // jax.device_count()) * jax.device_count()
  scored = score.score_rows(fn, records, ("chosen", "rejected"), length, batch)
  correct = scored["chosen"][0] - scored["rejected"][0] > 0
  acc = float(np.mean(correct))
  return acc, float(np.sqrt(acc * (1 - acc) / len(correct))), len(correct)


def pick_best(rows: list[dict]) -> dict:
  """The merge the policy stage trains against (rule fixed before the RL runs).

  Candidates: the rows under merge/ that average at least two reward models (a
  greedy soup that kept a single model is not a merge). Best: the highest OOD
  accuracy; ties -> the higher validation accuracy; remaining ties -> the first
  in table order. Each row: {"label", "directory", "members", "validation",
  "OOD"} with accuracies as (accuracy, standard error, pairs).
  """
  candidates = [r for r in rows if r["directory"].startswith("merge/") and r["members"] >= 2]
  if not candidates:
    raise cli.ConfigError("No merge of two or more reward models to pick from; run the "
                          "merge stage of tools/run_ratatouille.sh first.")
  # max() keeps the first of equal keys: table order breaks the remaining ties.
  return max(candidates, key=lambda r: (r["OOD"][0], r["validation"][0]))


def main(argv) -> int:
  p = argparse.ArgumentParser(prog="report_ratatouille.py")
  p.add_argument("--root", default="runs/ratatouille")
  p.add_argument("--out", default="docs/experiments/ratatouille.png")
  p.add_argument("--batch_size", type=int, default=64)
  args = p.parse_args(argv)
  splits = {"validation": os.path.join(args.root, "preferences_validation.jsonl"),
            "OOD": os.path.join(args.root, "preferences_ood.jsonl")}
  results, rows = [], []
  for label, rel in ROWS:
    d = os.path.join(args.root, rel)
    if not is_reward_model(d):
      print(f"(missing: {d})", file=sys.stderr)
      continue
    fn = load_reward_fn(d)
    results.append((label, {s: accuracy(fn, f, args.batch_size) for s, f in splits.items()}))
    members = len(read_reward_info(d).get("merged_from", [d]))
    rows.append({"label": label, "directory": rel, "members": members, **results[-1][1]})
  if not results:
    raise cli.ConfigError(f"No reward models under {args.root}; run tools/run_ratatouille.sh.")
  n = {s: results[0][1][s][2] for s in splits}
  print(f"| reward model | validation accuracy ({n['validation']} pairs) | "
        f"OOD accuracy ({n['OOD']} pairs) |\n|---|---|---|")
  for label, r in results:
    print(f"| {label} | {r['validation'][0]:.3f} ± {r['validation'][1]:.3f} | "
          f"{r['OOD'][0]:.3f} ± {r['OOD'][1]:.3f} |")
  with open(os.path.join(args.root, "accuracies.json"), "w") as f:
    json.dump(rows, f, indent=2)
  if any(r["directory"].startswith("merge/") for r in rows):
    best = pick_best(rows)
    best = {**best, "path": os.path.join(args.root, best["directory"])}
    with open(os.path.join(args.root, "best_merge.json"), "w") as f:
      json.dump(best, f, indent=2)
    print(f"\nbest merge (highest OOD accuracy, ties -> validation): {best['label']} "
          f"({best['path']}; OOD {best['OOD'][0]:.3f}, validation {best['validation'][0]:.3f})")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(10, 5))
  y = np.arange(len(results))
  for k, (s, color) in enumerate((("validation", "tab:blue"), ("OOD", "tab:orange"))):
    ax.barh(y + 0.4 * k - 0.2, [r[s][0] for _, r in results], 0.4,
            xerr=[r[s][1] for _, r in results], color=color, label=s)
  ax.set_yticks(y, [label for label, _ in results])
  ax.invert_yaxis()
  ax.axvline(0.5, color="gray", lw=0.8, ls="--")
  ax.set_xlabel("pairwise accuracy vs gold (± binomial s.e.)")
  ax.set_title("Reward models and merges: held-out and OOD accuracy")
  ax.legend(loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
