"""Plots and tabulates the teacher-hacking study (tools/run_teacher_hacking.sh).

  python tools/plot_teacher_hacking.py --root runs/teacher_hacking --out_dir docs/experiments

Reads the eval/proxy_kl and eval/golden_kl scalars (Monte Carlo sequence KL on
held-out prompts, and their per-token exact variants) and the training loss of
each distillation run under --root, writes

  teacher_hacking_sources.png    proxy and golden vs step, offline vs online sources
  teacher_hacking_diversity.png  the same for the prompts x generations ablation
  teacher_hacking_lever.png      issue 24's lever cells (teacher-size student,
                                 128 x 1 and 32 x 1 offline vs online), when run
  teacher_hacking_lever2.png     issue 24's second round (constant learning
                                 rate; the weak teacher), when run
  teacher_hacking_const_diversity.png  the diversity ablation under it
  teacher_hacking_headline.png   offline on 32 teacher samples (32 x 1, 16 x 2,
                                 8 x 4) vs online teacher under the constant
                                 learning rate, mean +- s.e. over seeds

and prints a markdown table: the training loss (per-token forward KL on the
training batches), start / minimum / final golden and proxy, the
step of the golden minimum, and the hacking detector's verdict on the proxy
and golden curves (posttrain_jax/distillation/hacking_detector.py); then, for
runs that saved per-prompt values (eval_per_prompt/), the golden turn and the
proxy over the same steps with paired standard errors (`paired_turn`).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
if _TOOLS not in sys.path:
  sys.path.insert(0, _TOOLS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from detect_hacking import read_curve  # also puts the repo root on sys.path
from posttrain_jax.distillation import eval as eval_lib
from posttrain_jax.distillation import hacking_detector

SOURCES = ("offline", "online_teacher", "online_student")
DIVERSITY = ("offline", "diversity_p256_g2", "diversity_p128_g4")
LEVER = ("lever_offline", "lever_offline_p32", "lever_online_teacher")
LEVER_DIVERSITY = ("lever_offline_p32", "lever_diversity_p16_g2", "lever_diversity_p8_g4")
LEVER2 = ("const_offline_p32", "const_offline_p64", "const_online_teacher", "weak_offline",
          "weak_offline_p32", "weak_online_teacher")
LABELS = {"offline": "offline (512 prompts x 1)", "online_teacher": "online teacher",
          "online_student": "online student",
          "diversity_p256_g2": "offline (256 prompts x 2)",
          "diversity_p128_g4": "offline (128 prompts x 4)",
          "lever_offline": "lever: teacher-size student, offline (128 x 1)",
          "lever_offline_p32": "lever: teacher-size student, offline (32 x 1)",
          "lever_online_teacher": "lever: teacher-size student, online teacher",
          "lever_diversity_p16_g2": "lever: offline (16 x 2)",
          "lever_diversity_p8_g4": "lever: offline (8 x 4)",
          "const_offline_p32": "constant LR: offline (32 x 1)",
          "const_offline_p64": "constant LR: offline (64 x 1)",
          "const_online_teacher": "constant LR: online teacher",
          "weak_offline": "weak teacher: offline (128 x 1)",
          "weak_offline_p32": "weak teacher: offline (32 x 1)",
          "weak_online_teacher": "weak teacher: online teacher",
          "const_diversity_p16_g2": "constant LR: offline (16 x 2)",
          "const_diversity_p8_g4": "constant LR: offline (8 x 4)"}
GAPS = {"teacher_gap": "teacher", "weak_gap": "weak teacher"}
CONST_DIVERSITY = ("const_offline_p32", "const_diversity_p16_g2", "const_diversity_p8_g4")
# The headline figure: the configurations that show hacking (a budget of 32
# teacher samples, three prompt counts) against their online counterpart, every
# seed (runs NAME, NAME_seed1, ...), mean +- standard error.
HEADLINE = ("const_offline_p32", "const_diversity_p16_g2", "const_diversity_p8_g4",
            "const_online_teacher")
ALL = tuple(dict.fromkeys(SOURCES + DIVERSITY + LEVER + LEVER_DIVERSITY + LEVER2
                          + CONST_DIVERSITY))


@functools.lru_cache(maxsize=None)  # seed summaries and figures read a run again
def curves(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  out = {}
  for tag in ("eval/proxy_kl", "eval/golden_kl", "eval/proxy_kl_token_sum",
              "eval/golden_kl_token_sum", "eval/golden_kl_stderr", "loss"):
    c = read_curve(run_dir, tag)
    if c is None and tag.endswith("_token_sum"):  # runs written before the rename
      c = read_curve(run_dir, tag.replace("_token_sum", "_per_token"))
    if c is not None:
      out[tag] = c
  return out


def _detect(steps, values) -> str:
  keep = steps > 0
  try:
    r = hacking_detector.detect_hacking(steps[keep], values[keep])
  except ValueError as e:
    return f"n/a ({e})"
  return f"step {int(r.step)}" if r.flagged else "no"


def summary_row(name: str, c) -> str:
  ps, pv = c["eval/proxy_kl"]
  gs, gv = c["eval/golden_kl"]
  i = int(np.argmin(gv))
  loss = c.get("loss")
  train = f"{loss[1][0]:.3f} -> {loss[1][-1]:.3f}" if loss is not None else "n/a"
  stderr = c.get("eval/golden_kl_stderr")
  rise = f"{gv[-1] - gv[i]:+.2f}" + (f" (stderr {stderr[1][-1]:.2f})" if stderr else "")
  return (f"| {LABELS.get(name, name)} | {train} "
          f"| {pv[0]:.2f} -> {pv[-1]:.2f} (min {pv.min():.2f}) "
          f"| {gv[0]:.2f} -> {gv[-1]:.2f} | {gv[i]:.2f} at step {int(gs[i])} "
          f"| {rise} | {_detect(ps, pv)} | {_detect(gs, gv)} "
          f"| {_detect(*loss) if loss is not None else 'n/a'} |")


def _finish(fig, axes, title: str, path: str, path_title: str) -> None:
  """Titles, grids and legends of the three panels; saves and closes `fig`."""
  import matplotlib.pyplot as plt
  axes[0].set(title="proxy = KL(teacher || student)", xlabel="step", ylabel="nats / sequence")
  axes[1].set(title="golden = KL(oracle || student)", xlabel="step", ylabel="nats / sequence")
  axes[2].set(title=path_title, xlabel="proxy", ylabel="golden")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot(runs: dict, names, title: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for name in names:
    if name not in runs:
      continue
    c = runs[name]
    label = LABELS.get(name, name)
    for ax, tag in zip(axes[:2], ("eval/proxy_kl", "eval/golden_kl")):
      s, v = c[tag]
      ax.plot(s, v, marker=".", label=label)
    axes[2].plot(c["eval/proxy_kl"][1], c["eval/golden_kl"][1], marker=".", label=label)
  _finish(fig, axes, title, path, "golden vs proxy (time runs right to left)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/teacher_hacking")
  parser.add_argument("--out_dir", default="docs/experiments")
  args = parser.parse_args(argv)
  runs = {}
  for name in ALL:
    d = os.path.join(args.root, name)
    if os.path.isdir(d):
      c = curves(d)
      if "eval/proxy_kl" in c and "eval/golden_kl" in c:
        runs[name] = c
  if not runs:
    print(f"plot_teacher_hacking: no distillation runs with proxy/golden metrics under "
          f"{args.root}", file=sys.stderr)
    return 2
  os.makedirs(args.out_dir, exist_ok=True)
  groups = (
      (SOURCES, "Teacher hacking: data sources (CPU scale)", "teacher_hacking_sources.png"),
      (DIVERSITY, "Teacher hacking: prompts x generations at a fixed budget of 512",
       "teacher_hacking_diversity.png"),
      (LEVER, "Teacher hacking, issue 24 levers: teacher-size student, offline 128 x 1 and "
       "32 x 1 vs online", "teacher_hacking_lever.png"),
      (LEVER_DIVERSITY, "Teacher hacking, issue 24: prompts x generations at a fixed budget "
       "of 32", "teacher_hacking_lever_diversity.png"),
      (LEVER2, "Teacher hacking, issue 24 second round: constant LR, weak teacher",
       "teacher_hacking_lever2.png"),
      (CONST_DIVERSITY, "Teacher hacking, issue 24: prompts x generations at a budget of 32, "
       "constant LR", "teacher_hacking_const_diversity.png"))
  for names, title, png in groups:
    if any(name in runs for name in names):  # a group not run keeps its old figure
      plot(runs, names, title, os.path.join(args.out_dir, png))
  for gap_name, who in GAPS.items():
    gap_dir = os.path.join(args.root, gap_name)
    gap = curves(gap_dir) if os.path.isdir(gap_dir) else {}
    if "eval/golden_kl" in gap:
      print(f"G_T of the {who} = KL(oracle || {who}) = {gap['eval/golden_kl'][1][0]:.2f} "
            f"nats per sequence (proxy check {gap['eval/proxy_kl'][1][0]:.2f})\n")
  print("| run | train loss (first -> last logged) | proxy: start -> end (min) "
        "| golden: start -> end | golden minimum | golden rise after min "
        "| detector (proxy) | detector (golden) | detector (train loss) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name in ALL:
    if name in runs:
      print(summary_row(name, runs[name]))
  if any(name in runs for name in HEADLINE):
    plot_seeds(args.root, HEADLINE, "Teacher hacking at CPU scale: offline on 32 teacher "
               "samples (32 x 1, 16 x 2, 8 x 4) vs online teacher (constant LR; mean +- "
               "standard error over seeds)",
               os.path.join(args.out_dir, "teacher_hacking_headline.png"))
  for name in LEVER + LEVER2 + CONST_DIVERSITY[1:]:
    line = seed_summary(args.root, name)
    if line:
      print(line)
  rows = [(name, turn) for name in ALL
          if (turn := paired_turn(os.path.join(args.root, name))) is not None]
  if rows:
    print("\nPaired over the same evaluation samples (eval_per_prompt/; value +- paired "
          "standard error, nats per sequence):\n")
    print("| run | golden maximum - start (step) | proxy change over the same steps "
          "| golden minimum (step) | golden end - minimum | proxy change over the "
          "same steps | golden end - start | proxy end - start |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in rows:
      print(f"| {LABELS.get(name, name)} | {t['up']:+.2f} +- {t['up_se']:.2f} ({t['max_step']}) "
            f"| {t['proxy_up']:+.2f} +- {t['proxy_up_se']:.2f} "
            f"| {t['golden_min']:.2f} ({t['min_step']}) "
            f"| {t['rise']:+.2f} +- {t['rise_se']:.2f} "
            f"| {t['proxy_after']:+.2f} +- {t['proxy_after_se']:.2f} "
            f"| {t['golden_change']:+.2f} +- {t['golden_change_se']:.2f} "
            f"| {t['proxy_change']:+.2f} +- {t['proxy_change_se']:.2f} |")
  return 0


def paired_turn(run_dir: str) -> dict | None:
  """The golden curve's turns, paired: from the per-prompt values the run saved at
  each evaluation, golden's maximum and its rise from the start, with the proxy's
  change over the same steps (early hacking: the first > 0 while the second
  <= 0); the golden minimum over steps > 0, golden's rise from it to the end and
  the proxy's change over the same steps (the paper's late hacking: the first >
  0 while the second < 0, each beyond its paired standard error); and both end -
  start changes. None for runs without per-prompt values."""
  saved = eval_lib.load_per_prompt(run_dir)
  steps = [s for s in saved if "golden" in saved[s] and "proxy" in saved[s]]
  if len(steps) < 3 or steps[0] != 0:
    return None
  golden = {s: saved[s]["golden"] for s in steps}
  proxy = {s: saved[s]["proxy"] for s in steps}
  m = min(steps[1:], key=lambda s: golden[s].mean())
  first, last = steps[0], steps[-1]
  d = lambda v, a, b: (float((v[b] - v[a]).mean()), eval_lib.paired_stderr(v[b], v[a]))
  (rise, rise_se), (pa, pa_se) = d(golden, m, last), d(proxy, m, last)
  (gc, gc_se), (pc, pc_se) = d(golden, first, last), d(proxy, first, last)
  top = max(steps, key=lambda s: golden[s].mean())
  (up, up_se), (pu, pu_se) = d(golden, first, top), d(proxy, first, top)
  return {"max_step": top, "up": up, "up_se": up_se, "proxy_up": pu, "proxy_up_se": pu_se,
          "golden_min": float(golden[m].mean()), "min_step": m, "rise": rise,
          "rise_se": rise_se, "proxy_after": pa, "proxy_after_se": pa_se,
          "golden_change": gc, "golden_change_se": gc_se, "proxy_change": pc,
          "proxy_change_se": pc_se}


def seed_dirs(root: str, name: str) -> list[str]:
  """NAME's run directory and its seeds' (NAME_seed1, ...), those that exist."""
  dirs = [os.path.join(root, name)] + sorted(
      os.path.join(root, d) for d in os.listdir(root) if d.startswith(name + "_seed"))
  return [d for d in dirs if os.path.isdir(d)]


def plot_seeds(root: str, names, title: str, path: str) -> None:
  """proxy vs step, golden vs step (G_T dashed) and golden vs proxy, each run's
  mean over its seeds with a +- standard error band, on the steps all seeds
  evaluated."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for name in names:
    seeds = [c for c in map(curves, seed_dirs(root, name))
             if "eval/proxy_kl" in c and "eval/golden_kl" in c]
    if not seeds:
      continue
    common = sorted(set.intersection(*(set(c["eval/golden_kl"][0].tolist()) for c in seeds)))
    stats = {}
    for tag in ("eval/proxy_kl", "eval/golden_kl"):
      v = np.array([[dict(zip(*c[tag]))[s] for s in common] for c in seeds])
      se = v.std(0, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.zeros(len(common))
      stats[tag] = (v.mean(0), se)
    label = f"{LABELS.get(name, name)} ({len(seeds)} seeds)"
    for ax, tag in zip(axes[:2], ("eval/proxy_kl", "eval/golden_kl")):
      mean, se = stats[tag]
      line, = ax.plot(common, mean, marker=".", label=label)
      ax.fill_between(common, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    axes[2].plot(stats["eval/proxy_kl"][0], stats["eval/golden_kl"][0], marker=".", label=label)
  gap = curves(os.path.join(root, "teacher_gap")) if os.path.isdir(
      os.path.join(root, "teacher_gap")) else {}
  if "eval/golden_kl" in gap:
    axes[1].axhline(gap["eval/golden_kl"][1][0], color="gray", ls="--", label="G_T (teacher)")
  _finish(fig, axes, title, path, "golden vs proxy")


def seed_summary(root: str, name: str) -> str | None:
  """Mean +- standard error over seeds (runs NAME, NAME_seed1, ...) of the end -
  start change of golden and proxy, and of golden's rise after its minimum
  (step > 0); None with fewer than 2 seeds."""
  deltas = []
  for c in map(curves, seed_dirs(root, name)):
    if "eval/golden_kl" not in c or "eval/proxy_kl" not in c or len(c["eval/golden_kl"][1]) < 2:
      continue  # not run, or only its step-0 evaluation so far
    gv, pv = c["eval/golden_kl"][1], c["eval/proxy_kl"][1]
    deltas.append((gv[-1] - gv[0], pv[-1] - pv[0], gv[-1] - gv[1:].min()))
  if len(deltas) < 2:
    return None
  a = np.asarray(deltas)
  mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a))
  return (f"{LABELS.get(name, name)}, {len(a)} seeds: golden end - start {mean[0]:+.2f} +- "
          f"{se[0]:.2f}, proxy end - start {mean[1]:+.2f} +- {se[1]:.2f}, golden rise after "
          f"its minimum {mean[2]:+.2f} +- {se[2]:.2f} (mean +- standard error)")


if __name__ == "__main__":
  sys.exit(main())
