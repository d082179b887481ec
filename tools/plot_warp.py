"""Plots and tabulates the WARP experiment (tools/run_warp.sh).

  python tools/plot_warp.py --root runs/warp --out_dir docs/experiments

Writes
  warp_anchor.png  (1) proxy and gold reward vs KL(pi || pi_sft) over training
                   (held-out eval every 25 steps) for REINFORCE with the SFT
                   anchor and with the EMA anchor (TensorBoard eval/* scalars)
  warp_slerp.png   (2) SLERP vs LERP of iteration 1's two runs, lambda in [0, 1]
                   (fronts/slerp.json, fronts/lerp.json)
  warp_liti.png    (3) the LITI fronts (1 - eta) SFT + eta slerp^i, i = 1..I, each
                   with the straight line between its end points (fronts/*_liti_*.json)
and prints markdown tables of every front point and of the task-vector angles
(warp_*/iteration_*/slerp/angles.json).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
if _TOOLS not in sys.path:
  sys.path.insert(0, _TOOLS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from detect_hacking import read_curve  # also puts the repo root on sys.path

KL = "kl_sft_token_sum"
REWARDS = (("proxy_reward", "proxy reward (RM member 0)"), ("gold_reward", "gold reward"))


def load_front(path: str) -> list[dict] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["points"]


def table(name: str, points: list[dict]) -> list[str]:
  lines = [f"\n{name}\n", "| point | proxy reward | gold reward (± se) | KL to SFT |",
           "|---|---|---|---|"]
  for p in points:
    lines.append(f"| {p['label']} | {p['proxy_reward']:.3f} | {p['gold_reward']:.3f} ± "
                 f"{p['gold_reward_stderr']:.3f} | {p[KL]:.2f} |")
  return lines


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_anchor(root: str, path: str) -> list[str]:
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  lines = ["\n(1) anchors, held-out eval over training\n",
           "| run | step | proxy reward | gold reward | KL to SFT |", "|---|---|---|---|---|"]
  for name in ("anchor_sft", "anchor_ema"):
    run = os.path.join(root, name)
    kl = read_curve(run, "eval/" + KL) or read_curve(run, "eval/kl_sft")
    if kl is None:
      continue
    for ax, (key, label) in zip(axes, (("eval/reward", "proxy"), ("eval/gold_reward", "gold"))):
      c = read_curve(run, key)
      if c is not None:
        ax.plot(kl[1], c[1], "o-", label=name)
        for s, x, y in zip(c[0], kl[1], c[1]):
          ax.annotate(str(int(s)), (x, y), fontsize=7)
        ax.set_ylabel(f"{label} reward (eval)")
    proxy, gold = read_curve(run, "eval/reward"), read_curve(run, "eval/gold_reward")
    for i, s in enumerate(kl[0]):
      lines.append(f"| {name} | {int(s)} | {proxy[1][i]:.3f} | {gold[1][i]:.3f} | {kl[1][i]:.2f} |")
  for ax in axes:
    ax.set_xlabel("KL(pi || pi_sft) (eval, token sum)")
    ax.legend()
  fig.suptitle("(1) REINFORCE, SFT anchor vs EMA anchor (labels: step)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return lines


def plot_fronts(fronts: dict[str, list[dict]], path: str, title: str, chords: bool) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, (key, label) in zip(axes, REWARDS):
    for name, points in fronts.items():
      x = np.array([p[KL] for p in points])
      y = np.array([p[key] for p in points])
      (line,) = ax.plot(x, y, "o-", label=name)
      for p in points:
        ax.annotate(p["label"].split("=")[-1], (p[KL], p[key]), fontsize=7)
      if chords:
        ax.plot(x[[0, -1]], y[[0, -1]], "--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("KL(pi || pi_sft) (token sum)")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def angle_lines(root: str) -> list[str]:
  lines = ["\nTask-vector angles (degrees, per tensor)\n",
           "| job | iteration | pair | mean | min | max | tensors |", "|---|---|---|---|---|---|---|"]
  for path in sorted(glob.glob(os.path.join(root, "warp_*", "iteration_*", "slerp", "angles.json"))):
    with open(path) as f:
      summary = json.load(f)["summary"]
    job = path.split(os.sep)[-4]
    it = path.split(os.sep)[-3].split("_")[-1]
    for pair, s in summary.items():
      lines.append(f"| {job} | {it} | {pair} | {s['mean']:.1f} | {s['min']:.1f} | "
                   f"{s['max']:.1f} | {s['count']} |")
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default="runs/warp")
  p.add_argument("--out_dir", default="docs/experiments")
  args = p.parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  fdir = os.path.join(args.root, "fronts")
  lines = plot_anchor(args.root, os.path.join(args.out_dir, "warp_anchor.png"))
  endpoints = load_front(os.path.join(fdir, "endpoints.json"))
  if endpoints:
    lines += table("Endpoints (SFT, final policies of (1))", endpoints)
  pair = {n: load_front(os.path.join(fdir, f"{n}.json")) for n in ("slerp", "lerp")}
  pair = {n: v for n, v in pair.items() if v}
  if pair:
    plot_fronts(pair, os.path.join(args.out_dir, "warp_slerp.png"),
                "(2) SLERP vs LERP of iteration 1's runs (labels: lambda)", chords=False)
    for n, v in pair.items():
      lines += table(f"(2) {n}", v)
  liti = {}
  for path in sorted(glob.glob(os.path.join(fdir, "m*_liti_*.json"))):
    name = os.path.basename(path)[:-5]
    liti[name.replace("_liti_", " iteration ")] = load_front(path)
  if liti:
    plot_fronts(liti, os.path.join(args.out_dir, "warp_liti.png"),
                "(3) LITI fronts (1-eta) SFT + eta slerp^i (labels: eta; dashed: chord)",
                chords=True)
    for n, v in liti.items():
      lines += table(f"(3) {n}", v)
  lines += angle_lines(args.root)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
