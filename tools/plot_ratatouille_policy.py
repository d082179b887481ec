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
import numpy as np

from plot_warm import METRICS, SOURCES, curves, summarize  # puts the repo root on sys.path

RUNS = ("policy_single", "policy_best")


def labels(best_json: str | None) -> dict[str, str]:
  """Legend labels; the best merge is named from best_merge.json when given."""
  best = "best merge"
  if best_json and os.path.isfile(best_json):
    with open(best_json) as f:
      info = json.load(f)
    best = f"best merge: {info['label']}"
  return {"policy_single": "single RM (warm_0)", "policy_best": best}


def table(runs: dict, names: dict[str, str], source: str, drop: float) -> list[str]:
  lines = [f"| run ({source}) | gold: start (step) | peak (step) | final (step) "
           f"| drop after peak | first step {drop:g} below running max "
           "| proxy: start -> final | KL to SFT (final) |",
           "|---|---|---|---|---|---|---|---|"]
  for name in RUNS:
    s = summarize(runs[name], source, drop) if name in runs else None
    if s is None:
      continue
    lines.append(
        f"| {names[name]} | {s['gold_start']:.3f} ({s['first_step']}) "
        f"| {s['gold_peak']:.3f} ({s['gold_peak_step']}) "
        f"| {s['gold_final']:.3f} ({s['last_step']}) | {s['gold_drop']:.3f} "
        f"| {'none' if s['drop_step'] is None else s['drop_step']} "
        f"| {s['proxy_start']:.3f} -> {s['proxy_final']:.3f} | {s['kl_final']:.2f} |")
  return lines


def plot(runs: dict, names: dict[str, str], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
  titles = {"reward": "proxy reward (each run's own RM)", "gold_reward": "gold reward",
            "kl_sft": "KL(pi || pi_sft), nats / sequence"}
  for k, name in enumerate(n for n in RUNS if n in runs):
    c, color = runs[name], f"C{k}"
    for ax, metric in zip(axes[:3], METRICS):
      if metric in c:
        ax.plot(*c[metric], color=color, alpha=0.7, label=f"{names[name]} (train)")
      if "eval/" + metric in c:
        ax.plot(*c["eval/" + metric], color=color, marker="o", linestyle="--",
                label=f"{names[name]} (eval)")
    for prefix, style in (("", dict(alpha=0.7)), ("eval/", dict(marker="o", linestyle="--"))):
      if prefix + "kl_sft" in c and prefix + "gold_reward" in c:
        ks, kv = c[prefix + "kl_sft"]
        gs, gv = c[prefix + "gold_reward"]
        _, ki, gi = np.intersect1d(ks, gs, return_indices=True)
        axes[3].plot(kv[ki], gv[gi], color=color, **style,
                     label=f"{names[name]} ({'eval' if prefix else 'train'})")
  for ax, metric in zip(axes[:3], METRICS):
    ax.set(title=titles[metric], xlabel="RL step")
  axes[3].set(title="gold reward vs KL to SFT", xlabel="KL(pi || pi_sft)", ylabel="gold reward")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("RL against the single RM vs against the best merge (ratatouille, CPU scale)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/ratatouille/policy")
  parser.add_argument("--best", default="runs/ratatouille/best_merge.json",
                      help="best_merge.json of tools/report_ratatouille.py (for the label)")
  parser.add_argument("--out", default="docs/experiments/ratatouille_policy.png")
  parser.add_argument("--drop", type=float, default=0.1,
                      help="gold drop below its running maximum that the table dates")
  args = parser.parse_args(argv)
  runs = {}
  for name in RUNS:
    d = os.path.join(args.root, name)
    if os.path.isdir(d):
      c = curves(d)
      if "gold_reward" in c or "eval/gold_reward" in c:
        runs[name] = c
  if not runs:
    print(f"plot_ratatouille_policy: no RL runs with gold_reward scalars under {args.root} "
          f"(expected {' and '.join(RUNS)}; run bash tools/run_ratatouille.sh policy)",
          file=sys.stderr)
    return 2
  names = labels(args.best)
  plot(runs, names, args.out)
  print(f"wrote {args.out}")
  for source in SOURCES:
    lines = table(runs, names, source, args.drop)
    if len(lines) > 2:
      print()
      print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
