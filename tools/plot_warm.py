"""Plots and tabulates the WARM experiment (tools/run_warm.sh).

  python tools/plot_warm.py --root runs/warm_rl --out_dir docs/experiments \
      [--out_name warm_curves.png]

Reads the TensorBoard scalars of the two RL runs under --root (policy_single:
REINFORCE against one proxy reward model; policy_warm: against the WARM
average), both for the training batches (`reward`, `gold_reward`, `kl_sft`:
means over each logging window) and for the held-out prompts (`eval/reward`,
`eval/gold_reward`, `eval/kl_sft`), and writes

  warm_curves.png   (--out_name) proxy reward, gold reward and KL(pi || pi_sft) vs step, and
                    gold reward vs KL, for both runs (lines: training batches,
                    markers: held-out eval)

and prints a markdown table per source (eval / train): start, peak and final
gold reward, the step of the gold peak, the gold drop from the peak to the
end, the first step where gold is at least --drop (default 0.1, about three
standard errors of a 64-sample eval point) below its running maximum, start
and final proxy reward and the final KL. Reward hacking shows as gold falling
after its peak while the proxy keeps rising.
"""

from __future__ import annotations

import argparse
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
if _TOOLS not in sys.path:
  sys.path.insert(0, _TOOLS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from detect_hacking import read_curve  # also puts the repo root on sys.path

RUNS = ("policy_single", "policy_warm")
LABELS = {"policy_single": "single RM (member 0)", "policy_warm": "WARM (M=3)"}
METRICS = ("reward", "gold_reward", "kl_sft")
SOURCES = {"eval": "eval/", "train": ""}


def curves(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps, values)} of the train and eval reward/gold/KL scalars present."""
  out = {}
  for prefix in SOURCES.values():
    for metric in METRICS:
      c = read_curve(run_dir, prefix + metric)
      if c is not None:
        out[prefix + metric] = c
  return out


def first_drop_step(steps: np.ndarray, values: np.ndarray, drop: float) -> int | None:
  """The first step where values <= (running maximum so far) - drop, or None."""
  below = values <= np.maximum.accumulate(values) - drop
  return int(steps[np.argmax(below)]) if below.any() else None


def summarize(c: dict, source: str, drop: float = 0.1) -> dict[str, float] | None:
  """Start / peak / final gold, peak step, drop, first-drop step, proxy, final KL."""
  prefix = SOURCES[source]
  if any(prefix + m not in c for m in METRICS):
    return None
  gs, gv = c[prefix + "gold_reward"]
  _, pv = c[prefix + "reward"]
  _, kv = c[prefix + "kl_sft"]
  i = int(np.argmax(gv))
  return {"gold_start": gv[0], "gold_peak": gv[i], "gold_peak_step": int(gs[i]),
          "gold_final": gv[-1], "gold_drop": gv[i] - gv[-1], "proxy_start": pv[0],
          "proxy_final": pv[-1], "kl_final": kv[-1], "first_step": int(gs[0]),
          "last_step": int(gs[-1]), "drop_step": first_drop_step(gs, gv, drop)}


def table(runs: dict, source: str, drop: float = 0.1,
          names: dict[str, str] | None = None) -> list[str]:
  """Markdown rows per run of `names` (in its order; default LABELS) in runs."""
  names = names or LABELS
  lines = [f"| run ({source}) | gold: start (step) | peak (step) | final (step) "
           f"| drop after peak | first step {drop:g} below running max "
           "| proxy: start -> final | KL to SFT (final) |",
           "|---|---|---|---|---|---|---|---|"]
  for name in names:
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


def plot(runs: dict, path: str, names: dict[str, str] | None = None,
         title: str = "RL against one proxy reward model vs against WARM "
                      "(CPU scale, one seed)") -> None:
  """Proxy, gold and KL vs step, and gold vs KL, per run of `names` in runs."""
  names = names or LABELS
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
  titles = {"reward": "proxy reward (each run's own RM)", "gold_reward": "gold reward",
            "kl_sft": "KL(pi || pi_sft), nats / sequence"}
  for k, name in enumerate(n for n in names if n in runs):
    c, color = runs[name], f"C{k}"
    for ax, metric in zip(axes[:3], METRICS):
      if metric in c:
        ax.plot(*c[metric], color=color, alpha=0.7, label=f"{names[name]} (train)")
      if "eval/" + metric in c:
        ax.plot(*c["eval/" + metric], color=color, marker="o", linestyle="--",
                label=f"{names[name]} (eval)")
    for prefix, style in (("", dict(alpha=0.7)),
                          ("eval/", dict(marker="o", linestyle="--"))):
      if prefix + "kl_sft" in c and prefix + "gold_reward" in c:
        ks, kv = c[prefix + "kl_sft"]
        gs, gv = c[prefix + "gold_reward"]
        common, ki, gi = np.intersect1d(ks, gs, return_indices=True)
        if len(common):
          axes[3].plot(kv[ki], gv[gi], color=color, **style,
                       label=f"{names[name]} ({'eval' if prefix else 'train'})")
  for ax, metric in zip(axes[:3], METRICS):
    ax.set(title=titles[metric], xlabel="RL step")
  axes[3].set(title="gold reward vs KL to SFT", xlabel="KL(pi || pi_sft)",
              ylabel="gold reward")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def load_runs(root: str, names) -> dict:
  """{name: curves} of the runs under root that logged gold_reward."""
  runs = {}
  for name in names:
    d = os.path.join(root, name)
    if os.path.isdir(d):
      c = curves(d)
      if "gold_reward" in c or "eval/gold_reward" in c:
        runs[name] = c
  return runs


def print_tables(runs: dict, drop: float, names: dict[str, str] | None = None) -> None:
  for source in SOURCES:
    lines = table(runs, source, drop, names)
    if len(lines) > 2:
      print()
      print("\n".join(lines))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/warm_rl")
  parser.add_argument("--out_dir", default="docs/experiments")
  parser.add_argument("--out_name", default="warm_curves.png", help="the figure's file name")
  parser.add_argument("--drop", type=float, default=0.1,
                      help="gold drop below its running maximum that the table dates")
  args = parser.parse_args(argv)
  runs = load_runs(args.root, RUNS)
  if not runs:
    print(f"plot_warm: no RL runs with gold_reward scalars under {args.root} "
          f"(expected {' and '.join(RUNS)}; run bash tools/run_warm.sh)", file=sys.stderr)
    return 2
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, args.out_name)
  plot(runs, path)
  print(f"wrote {path}")
  print_tables(runs, args.drop)
  return 0


if __name__ == "__main__":
  sys.exit(main())
