"""Merges model directories in weight space (reward models or policies).

  python tools/merge.py average --output OUT DIR1 DIR2 ... [--weights W1 W2 ...]
  python tools/merge.py slerp --init INIT --output OUT DIR1 DIR2 ... [--lambda L]
  python tools/merge.py liti --init INIT --merged MERGED --eta 0.3 --output OUT

`average` is WARM's weight averaging: sum_i w_i theta_i with w uniform by
default (given weights are normalised to sum 1). `slerp` is WARP's spherical
interpolation of the task vectors theta_m - theta_init, tensor by tensor
(M = 2: lambda, default 0.5; M > 2: model m merged in with lambda = 1/m);
`liti` is WARP's (1 - eta) theta_init + eta theta_merged.

  python tools/merge.py task_arithmetic --init INIT --output OUT DIR ... [--lambdas L ...]
  python tools/merge.py ties --init INIT --output OUT DIR ... [--density 0.2] [--lambda 1]
  python tools/merge.py dare --init INIT --output OUT DIR ... [--drop 0.9] [--seed 0]
                             [--lambdas L ...]
  python tools/merge.py model_stock --init INIT --output OUT DIR1 DIR2 ...
  python tools/merge.py greedy_soup --pairs HELDOUT.jsonl --output OUT RM1 RM2 ...
  python tools/merge.py swap_head --probe PROBE_RM --output OUT RM

swap_head (model ratatouille, merging/ratatouille.py) writes RM's backbone with
PROBE_RM's head (the target task's linear probe).

task_arithmetic: theta_0 + sum_i lambda_i (theta_i - theta_0) (lambdas: one
for all, one per model, default 1/M); ties: trim to the top --density of each
task vector, elect the sign, disjoint mean, scaled by --lambda; dare: drop
--drop of each task vector's entries (seeded), rescale by 1/(1 - drop), then
task arithmetic; model_stock: per tensor t mean_i theta_i + (1 - t) theta_0 with
t from the task vectors' angle; greedy_soup (reward models): add a model to the
uniform soup only if the pairwise accuracy on the held-out --pairs (tools/score.py
format) does not drop. average, task_arithmetic, ties, dare, model_stock and
greedy_soup merge leaf by leaf from the orbax checkpoints (one tensor of each
model in memory at a time, plus the merged tree). See posttrain_jax/merging/.
All directories (and --init) must hold the same architecture (model.gin), kind
(all reward models, or all policies) and parameter layout; a training run
directory stands for its newest checkpoint. OUT is a model directory of the
merged models' kind: a new or empty directory (--overwrite replaces the model
files of an earlier merge there; a training run directory is always refused, as
its own checkpoints would be loaded in place of the merge). Per-tensor statistics (SLERP angles, TIES thresholds,
model stock ratios, DARE masks) are per layer in the scanned layout too, so a
scanned checkpoint merges as the same checkpoint saved unscanned.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from posttrain_jax import cli
from posttrain_jax import merging
from posttrain_jax.rl.reward_model import load_reward_fn


def parse_args(argv):
  p = argparse.ArgumentParser(prog="merge.py", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="method", required=True)
  avg = sub.add_parser("average", help="(weighted) average of the parameters (WARM)")
  avg.add_argument("directories", nargs="+", help="model or run directories")
  avg.add_argument("--output", required=True)
  avg.add_argument("--weights", type=float, nargs="+", default=None)
  sl = sub.add_parser("slerp", help="SLERP of task vectors around --init (WARP)")
  sl.add_argument("directories", nargs="+", help="fine-tuned model or run directories")
  sl.add_argument("--init", required=True, help="the shared initialisation")
  sl.add_argument("--output", required=True)
  sl.add_argument("--lambda", dest="lam", type=float, default=None,
                  help="interpolation weight of the second model (2 models only)")
  li = sub.add_parser("liti", help="(1 - eta) init + eta merged (WARP)")
  li.add_argument("--init", required=True)
  li.add_argument("--merged", required=True)
  li.add_argument("--eta", type=float, default=0.3)
  li.add_argument("--output", required=True)
  def task_parser(name, help_):
    t = sub.add_parser(name, help=help_)
    t.add_argument("directories", nargs="+", help="fine-tuned model or run directories")
    t.add_argument("--init", required=True, help="the shared initialisation theta_0")
    t.add_argument("--output", required=True)
    return t
  ta = task_parser("task_arithmetic", "theta_0 + sum_i lambda_i (theta_i - theta_0)")
  ta.add_argument("--lambdas", type=float, nargs="+", default=None)
  ti = task_parser("ties", "TIES: trim, elect sign, disjoint merge")
  ti.add_argument("--density", type=float, default=0.2)
  ti.add_argument("--lambda", dest="lam", type=float, default=1.0)
  ti.add_argument("--no_sign_election", action="store_true")
  da = task_parser("dare", "DARE: drop and rescale, then task arithmetic")
  da.add_argument("--drop", type=float, default=0.9)
  da.add_argument("--seed", type=int, default=0)
  da.add_argument("--lambdas", type=float, nargs="+", default=None)
  task_parser("model_stock", "model stock: per-tensor interpolation towards the init")
  gs = sub.add_parser("greedy_soup", help="greedy soup of reward models on held-out pairs")
  gs.add_argument("directories", nargs="+", help="reward model or run directories")
  gs.add_argument("--pairs", required=True, help="held-out preference pairs (JSON lines)")
  gs.add_argument("--output", required=True)
  gs.add_argument("--batch_size", type=int, default=64)
  gs.add_argument("--strict", action="store_true", help="require a strict improvement")
  sw = sub.add_parser("swap_head", help="a reward model's backbone with another's head")
  sw.add_argument("directories", nargs=1, help="the reward model giving the backbone")
  sw.add_argument("--probe", required=True, help="the reward model giving the head")
  sw.add_argument("--output", required=True)
  for sp in sub.choices.values():
    sp.add_argument("--overwrite", action="store_true",
                    help="replace the model files (checkpoint/, model.gin, ...) of an "
                         "earlier merge in --output")
  return p.parse_args(argv)


# What a model directory holds (params_checkpoint.save, save_reward_model).
_MODEL_FILES = ("checkpoint", "model.gin", "hf_metadata.json", "hf_files", "reward_model.json")


def check_output(output: str, inputs, overwrite: bool) -> None:
  """A new or empty --output; with overwrite, a former model directory (its
  model files removed here). Never one of the inputs, never a run directory."""
  if os.path.abspath(output) in [os.path.abspath(d) for d in inputs]:
    raise cli.ConfigError("--output must differ from the merged directories.")
  if not os.path.isdir(output):
    if os.path.exists(output):
      raise cli.ConfigError(f"--output {output} is a file; give a directory.")
    return
  entries = sorted(os.listdir(output))
  if not entries:
    return
  if "checkpoints" in entries or "config.gin" in entries:
    raise cli.ConfigError(
        f"--output {output} is a training run directory (it holds "
        f"{'checkpoints/' if 'checkpoints' in entries else 'config.gin'}): the run's own "
        "checkpoints would be loaded, not the merge; choose a new directory.")
  shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
  if not overwrite:
    raise cli.ConfigError(f"--output {output} is not empty ({shown}); choose a new "
                          "directory, or pass --overwrite to replace an earlier merge there.")
  others = [e for e in entries if e not in _MODEL_FILES]
  if others:
    raise cli.ConfigError(f"--output {output} holds more than a model directory "
                          f"({', '.join(others[:4])}); --overwrite replaces only a model "
                          "directory's files: choose a new directory.")
  for entry in entries:
    path = os.path.join(output, entry)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def _swap_head(args):
  models = merging.load_models([args.directories[0], args.probe])
  if not models[0].is_reward_model:
    raise ValueError("swap_head takes reward model directories.")
  params = merging.with_head(models[0].params, models[1].params)
  info = {"merge": "swap_head", "merged_from": [os.path.abspath(args.directories[0])],
          "head_from": os.path.abspath(args.probe)}
  return merging.write_model(args.output, models[0], params, info), (
      f"head swap (head from {args.probe})")


def _task_merge(args):
  """(merged LoadedModel, description) of the task-vector merges, leaf by leaf."""
  n = len(args.directories)
  if args.method == "task_arithmetic":
    lam = merging.task_lambdas(args.lambdas, n)
    rule, info = merging.task_arithmetic_rule(lam), {"lambdas": lam.tolist()}
    how = f"task arithmetic (lambdas {', '.join(f'{x:.4g}' for x in lam)})"
  elif args.method == "ties":
    if not 0.0 < args.density <= 1.0:
      raise ValueError(f"--density must be in (0, 1], got {args.density}.")
    rule = merging.ties_rule(args.density, args.lam, not args.no_sign_election)
    info = {"density": args.density, "lambda": args.lam,
            "elect_sign": not args.no_sign_election}
    how = f"TIES merge (density {args.density:g}, lambda {args.lam:g})"
  elif args.method == "dare":
    if not 0.0 <= args.drop < 1.0:
      raise ValueError(f"--drop must be in [0, 1), got {args.drop}.")
    lam = merging.task_lambdas(args.lambdas, n)
    rule = merging.dare_rule(args.drop, lam, args.seed)
    info = {"drop": args.drop, "seed": args.seed, "lambdas": lam.tolist()}
    how = f"DARE merge (drop {args.drop:g}, seed {args.seed})"
  else:
    if n < 2:
      raise ValueError(f"model_stock needs at least 2 fine-tuned models, got {n}.")
    rule, info, how = merging.model_stock_rule(), {}, "model stock"
  info["merge"] = args.method
  return merging.stream_merge_dirs(rule, args.directories, args.output, info,
                                   init=args.init), how


def _greedy_soup(args):
  """Greedy soup of reward models scored on held-out pairs; candidates under OUT.soups/."""
  import score  # pylint: disable=import-outside-toplevel  (tools/score.py)
  _, is_rm = merging.check_models(args.directories)
  if not is_rm:
    raise ValueError("greedy_soup needs a held-out metric; tools/merge.py scores reward "
                     "models on --pairs. Fix: pass reward model directories (for policies "
                     "call merging.greedy_soup with your own metric).")
  kind, records = score.read_records(args.pairs)
  if kind != "pairs":
    raise ValueError(f"--pairs {args.pairs} holds samples; give preference pairs.")
  length = max(len(r["prompt"]) + len(r[s]) for r in records for s in ("chosen", "rejected"))
  batch = -(-args.batch_size // jax.device_count()) * jax.device_count()
  scratch = args.output.rstrip("/") + ".soups"
  os.makedirs(scratch, exist_ok=True)

  def make_soup(members):
    out = os.path.join(scratch, "_".join(map(str, sorted(members))))
    if not os.path.isdir(out):
      merging.stream_merge_dirs(merging.leafwise.weighted_mean_rule(
          [1.0 / len(members)] * len(members)), [args.directories[i] for i in members],
          out, {"merge": "average"})
    return out

  def accuracy(directory):
    scored = score.score_rows(load_reward_fn(directory), records, ("chosen", "rejected"),
                              length, batch)
    return float(np.mean(scored["chosen"][0] - scored["rejected"][0] > 0))

  result = merging.greedy_soup(args.directories, accuracy, strict=args.strict,
                               make_soup=make_soup)
  for i, acc, kept in result.history:
    print(f"  {args.directories[i]}: alone {result.individual[i]:.4f}, soup with it "
          f"{acc:.4f} -> {'kept' if kept else 'dropped'}")
  info = {"merge": "greedy_soup", "pairs": os.path.abspath(args.pairs),
          "members": [os.path.abspath(args.directories[i]) for i in result.members],
          "heldout_accuracy": result.metric}
  members = [args.directories[i] for i in result.members]
  merged = merging.stream_merge_dirs(merging.leafwise.weighted_mean_rule(
      [1.0 / len(members)] * len(members)), members, args.output, info)
  return merged, (f"greedy soup ({len(members)} of {len(args.directories)} kept, held-out "
                  f"accuracy {result.metric:.4f})")


def main(argv) -> int:
  args = parse_args(argv)
  inputs = (args.directories if args.method != "liti" else [args.merged]) + (
      [args.init] if getattr(args, "init", None) else []) + (
      [args.probe] if getattr(args, "probe", None) else [])
  check_output(args.output, inputs, args.overwrite)
  try:
    if args.method == "average":
      weights = merging.normalized_weights(args.weights, len(args.directories))
      merged = merging.stream_merge_dirs(
          merging.leafwise.weighted_mean_rule(weights), args.directories, args.output,
          {"merge": "average", "merge_weights": weights.tolist()})
      how = f"average (weights {', '.join(f'{w:.4g}' for w in weights)})"
    elif args.method in ("task_arithmetic", "ties", "dare", "model_stock"):
      merged, how = _task_merge(args)
    elif args.method == "greedy_soup":
      merged, how = _greedy_soup(args)
    elif args.method == "swap_head":
      merged, how = _swap_head(args)
    elif args.method == "slerp":
      merged = merging.slerp_model_dirs(args.init, args.directories, args.output, args.lam)
      how = f"SLERP around {args.init}"
    else:
      merged = merging.liti_model_dirs(args.init, args.merged, args.output, args.eta)
      how = f"LITI (eta {args.eta:g}) between {args.init} and {args.merged}"
  except (ValueError, FileNotFoundError) as e:
    raise cli.ConfigError(str(e)) from e
  count = len(args.directories) if args.method != "liti" else 1
  kind = "reward model" if merged.is_reward_model else "policy"
  print(f"wrote the {how} of {count} {kind} directories to {merged.directory}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
