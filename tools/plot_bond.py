"""Plots and tabulates the BOND experiment (tools/run_bond.sh).

  python tools/plot_bond.py --root runs/bond --out docs/experiments/bond.png

Reads, under --root, the runs NAME_seedS (jbond, reinforce_bBETA, bond_oneshot,
bond_iterative): their TensorBoard curves eval/gold_reward and eval/kl_sft
(held-out prompts, one sample each) and the training scalars bond/*. The
Best-of-N sampler's point: the one-shot run's bond/best_of_n_reward (Best-of-N
of SFT samples on the training prompts, averaged over the run) at the analytic
KL log N - (N - 1) / N, next to bond/anchor_reward (the SFT samples' mean).

Figure: left, eval gold reward vs eval KL to SFT (the reward-KL fronts);
right, eval gold reward vs step. Prints a markdown table of the final values.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
if _TOOLS not in sys.path:
  sys.path.insert(0, _TOOLS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from detect_hacking import read_curve  # also puts the repo root on sys.path


def runs(root: str) -> dict[str, str]:
  return {name: os.path.join(root, name) for name in sorted(os.listdir(root))
          if "_seed" in name and os.path.isdir(os.path.join(root, name))}


def label(name: str) -> str:
  arm = name.rpartition("_seed")[0]
  if arm.startswith("reinforce_b"):
    return f"REINFORCE beta_RL={arm[len('reinforce_b'):]}"
  return {"jbond": "J-BOND", "bond_oneshot": "BOND one-shot (N=4)",
          "bond_iterative": "iterative BOND (n=2)"}.get(arm, arm)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/bond")
  parser.add_argument("--out", default="docs/experiments/bond.png")
  parser.add_argument("--n", type=int, default=4, help="N of the one-shot run")
  args = parser.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_front, ax_step) = plt.subplots(1, 2, figsize=(12, 4.5))
  rows = ["| run | final eval gold reward | final eval KL to SFT | mean train quantile vs "
          "anchor |", "|---|---|---|---|"]
  for name, run_dir in runs(args.root).items():
    gold, kl = read_curve(run_dir, "eval/gold_reward"), read_curve(run_dir, "eval/kl_sft")
    if gold is None or kl is None:
      continue
    style = "--" if "reinforce" in name else "-"
    ax_front.plot(kl[1], gold[1], style, marker="o", label=label(name))
    ax_step.plot(gold[0], gold[1], style, marker="o", label=label(name))
    quant = read_curve(run_dir, "bond/quantile")
    q = f"{np.mean(quant[1]):.3f}" if quant is not None else "-"
    rows.append(f"| {label(name)} | {gold[1][-1]:.3f} | {kl[1][-1]:.2f} | {q} |")
  oneshot = [d for n, d in runs(args.root).items() if n.startswith("bond_oneshot")]
  if oneshot:
    bon = read_curve(oneshot[0], "bond/best_of_n_reward")
    sft = read_curve(oneshot[0], "bond/anchor_reward")
    if bon is not None and sft is not None:
      bound = math.log(args.n) - (args.n - 1) / args.n
      ax_front.scatter([0.0, bound], [np.mean(sft[1]), np.mean(bon[1])], marker="*", s=200,
                       color="k", zorder=5, label=f"SFT / Best-of-{args.n} sampling (train)")
      rows.append(f"| SFT samples (train prompts) | {np.mean(sft[1]):.3f} | 0 | - |")
      rows.append(f"| Best-of-{args.n} sampling (train prompts) | {np.mean(bon[1]):.3f} | "
                  f"<= {bound:.3f} (analytic) | - |")
  ax_front.set_xlabel("KL(pi || pi_sft), eval (Monte Carlo)")
  ax_front.set_ylabel("gold reward, eval")
  ax_front.set_title("reward-KL front")
  ax_step.set_xlabel("step")
  ax_step.set_ylabel("gold reward, eval")
  ax_step.set_title("gold reward vs step")
  ax_front.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print("\n".join(rows))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
