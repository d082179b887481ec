"""Plots and tabulates the algorithm comparison (tools/run_rl_comparison.sh).

  python tools/plot_rl_comparison.py --root runs/rl_comparison \
      --out docs/rlhf_comparison.png

Reads, under --root, each run ARM_seedS (ARM in reinforce_ema, rloo, grpo, dpo):
its eval.json (tools/eval_policy.py: gold reward and KL(pi || pi_sft) of 256
samples on held-out prompts at temperature 1) and, for the RL arms, the
TensorBoard curves eval/gold_reward and eval/kl_sft_token_sum (the job's own
held-out eval, temperature 0.9, every 50 steps); sft_eval.json is the start.

Writes one figure: left, gold reward vs KL to SFT (lines: the RL runs' eval
curves; large markers: the final policies by eval_policy.py, one per seed;
star: SFT); right, held-out gold reward vs step. Prints a markdown table per
arm: per-seed final gold reward (with its standard error) and KL, and the mean
over seeds with the half-range.
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

from detect_hacking import read_curve  # also puts the repo root on sys.path

ARMS = {"reinforce_ema": "REINFORCE + EMA anchor", "rloo": "RLOO", "grpo": "GRPO",
        "dpo": "DPO (offline pairs)"}
COLORS = {"reinforce_ema": "tab:blue", "rloo": "tab:orange", "grpo": "tab:green",
          "dpo": "tab:red"}


def runs(root: str) -> dict[str, dict[int, str]]:
  """{arm: {seed: run_dir}} of the runs present."""
  out: dict[str, dict[int, str]] = {}
  for name in sorted(os.listdir(root)):
    arm, _, seed = name.rpartition("_seed")
    if arm in ARMS and seed.isdigit() and os.path.isdir(os.path.join(root, name)):
      out.setdefault(arm, {})[int(seed)] = os.path.join(root, name)
  return out


def load(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.loads(f.readline())


def table(root: str, found) -> str:
  sft = load(os.path.join(root, "sft_eval.json"))
  lines = ["| policy | seed | gold reward (± s.e.) | KL(pi ‖ pi_sft) | entropy | length |",
           "|---|---|---|---|---|---|"]
  if sft:
    lines.append(f"| SFT | - | {sft['gold_reward']:.3f} ± {sft['gold_reward_stderr']:.3f} | "
                 f"{sft['kl_sft_token_sum']:.3f} | {sft['entropy']:.2f} | "
                 f"{sft['response_length']:.1f} |")
  for arm, seeds in found.items():
    evals = {s: load(os.path.join(d, "eval.json")) for s, d in sorted(seeds.items())}
    evals = {s: e for s, e in evals.items() if e}
    for s, e in evals.items():
      lines.append(f"| {ARMS[arm]} | {s} | {e['gold_reward']:.3f} ± "
                   f"{e['gold_reward_stderr']:.3f} | {e['kl_sft_token_sum']:.3f} | "
                   f"{e['entropy']:.2f} | {e['response_length']:.1f} |")
    if len(evals) > 1:
      g = np.array([e["gold_reward"] for e in evals.values()])
      k = np.array([e["kl_sft_token_sum"] for e in evals.values()])
      lines.append(f"| **{ARMS[arm]}** | mean of {len(evals)} | **{g.mean():.3f}** "
                   f"(± {np.ptp(g) / 2:.3f}) | **{k.mean():.3f}** (± {np.ptp(k) / 2:.3f}) | | |")
  return "\n".join(lines)


def plot(root: str, found, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (front, steps) = plt.subplots(1, 2, figsize=(12, 4.5))
  sft = load(os.path.join(root, "sft_eval.json"))
  if sft:
    front.scatter([sft["kl_sft_token_sum"]], [sft["gold_reward"]], marker="*", s=200,
                  color="black", label="SFT", zorder=3)
  for arm, seeds in found.items():
    for i, (seed, run_dir) in enumerate(sorted(seeds.items())):
      label = ARMS[arm] if i == 0 else None
      gold = read_curve(run_dir, "eval/gold_reward")
      kl = read_curve(run_dir, "eval/kl_sft_token_sum")
      if gold is not None and kl is not None:
        front.plot(kl[1], gold[1], color=COLORS[arm], alpha=0.5, lw=1)
        steps.plot(gold[0], gold[1], color=COLORS[arm], alpha=0.8,
                   ls="-" if seed == 0 else "--", label=f"{ARMS[arm]} seed {seed}")
      e = load(os.path.join(run_dir, "eval.json"))
      if e:
        front.errorbar([e["kl_sft_token_sum"]], [e["gold_reward"]],
                       yerr=[e["gold_reward_stderr"]], fmt="o", ms=8, color=COLORS[arm],
                       label=label, zorder=3)
  front.set_xlabel("KL(pi || pi_sft), summed per-token exact KL on samples")
  front.set_ylabel("gold reward (held-out prompts)")
  front.set_title("gold reward vs KL: final policies (markers), eval curves (lines)")
  front.legend(fontsize=8)
  steps.set_xlabel("RL step")
  steps.set_ylabel("eval/gold_reward (job's eval, T = 0.9)")
  steps.set_title("held-out gold reward during training")
  steps.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default="runs/rl_comparison")
  p.add_argument("--out", default="docs/rlhf_comparison.png")
  args = p.parse_args(argv)
  if not os.path.isdir(args.root):
    print(f"{args.root}: no such directory; run tools/run_rl_comparison.sh first.",
          file=sys.stderr)
    return 2
  found = runs(args.root)
  print(table(args.root, found))
  plot(args.root, found, args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
