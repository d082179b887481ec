"""The CLP experiment's figure and tables (docs/experiments/clp.md).

  python tools/plot_clp.py --fronts runs/clp/fronts --out docs/experiments/clp.png

Reads the tools/eval_front.py JSONs of tools/run_clp.sh (sft.json, soups.json and
one per CLP variant: prompt, full, attn, logit; every point with reward_0 = E[gold],
reward_1 = E[brevity] and the KL to the SFT model) and writes the fronts E[r_0] vs
E[r_1] over the w grid, one line per method, plus a markdown table per method on
stdout with the monotonicity of each E[r_i] in w_i (Spearman-free: the number of
grid steps where E[r_i] falls while w_i rises) and the hypervolume of the front
above the SFT point.
"""

from __future__ import annotations

import argparse
import json
import os

METHODS = (("soups", "rewarded soups (LERP of 2 runs)"), ("prompt", "prompt conditioning"),
           ("full", "full-CLP"), ("attn", "attn-CLP"), ("logit", "logit-CLP"), ("full_200", "full-CLP, 200 steps"),
           ("logit_200", "logit-CLP, 200 steps"))


def load(path):
  with open(path) as f:
    return json.load(f)["points"]


def violations(values):
  """Grid steps at which a value falls while its weight rises (0 = monotone)."""
  return sum(b < a for a, b in zip(values, values[1:]))


def hypervolume(points, ref):
  """Area dominated by the points above the reference point (r0, r1) (2-D)."""
  pts = sorted({(p[0], p[1]) for p in points if p[0] > ref[0] and p[1] > ref[1]},
               reverse=True)
  area, best1 = 0.0, ref[1]
  for i, (x, y) in enumerate(pts):
    if y > best1:
      nxt = ref[0]
      area += (x - nxt) * (y - best1)
      best1 = y
  return area


def table(fronts, sft):
  rows = ["| method | w_1 grid | E[gold] (r_0) | E[brevity] (r_1) | KL to SFT | "
          "r_0 falls as w_0 rises | r_1 falls as w_1 rises | hypervolume over SFT |",
          "|---|---|---|---|---|---|---|---|"]
  ref = (sft["reward_0"], sft["reward_1"])
  for name, label in METHODS:
    if name not in fronts:
      continue
    pts = sorted(fronts[name], key=lambda p: p["coefficient"])
    r0 = [p["reward_0"] for p in pts]
    r1 = [p["reward_1"] for p in pts]
    grid = ", ".join(f"{q['coefficient']:g}" for q in pts)
    kl = ", ".join(f"{q['kl_sft_token_sum']:.2f}" for q in pts)
    fmt = lambda vs: ", ".join(f"{v:.3f}" for v in vs)
    rows.append(f"| {label} | {grid} | {fmt(r0)} | {fmt(r1)} | {kl} | "
                f"{violations(r0[::-1])}/{len(r0) - 1} | {violations(r1)}/{len(r1) - 1} | "
                f"{hypervolume(list(zip(r0, r1)), ref):.4f} |")
  rows.append(f"| SFT | - | {ref[0]:.3f} | {ref[1]:.3f} | 0 | - | - | - |")
  return "\n".join(rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="plot_clp.py", description=__doc__.split("\n")[0])
  p.add_argument("--fronts", required=True)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  fronts = {name: load(os.path.join(args.fronts, f"{name}.json")) for name, _ in METHODS
            if os.path.isfile(os.path.join(args.fronts, f"{name}.json"))}
  sft = load(os.path.join(args.fronts, "sft.json"))[0]
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 5))
  for (name, label), marker in zip(METHODS, "osd^v<>"):
    if name not in fronts:
      continue
    pts = sorted(fronts[name], key=lambda q: q["coefficient"])
    line, = ax.plot([q["reward_1"] for q in pts], [q["reward_0"] for q in pts],
                    marker=marker, label=label)
    for q in (pts[0], pts[-1]):
      ax.annotate(f"w1={q['coefficient']:g}", (q["reward_1"], q["reward_0"]), fontsize=7,
                  color=line.get_color())
  ax.plot([sft["reward_1"]], [sft["reward_0"]], "k*", markersize=12, label="SFT")
  ax.set_xlabel("E[brevity] (r_1)")
  ax.set_ylabel("E[gold] (r_0)")
  ax.set_title("CLP vs rewarded soups: fronts over w = (1 - w1, w1)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(table(fronts, sft))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
