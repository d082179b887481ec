"""Merges model directories in weight space (reward models or policies).

  python tools/merge.py average --output OUT DIR1 DIR2 ... [--weights W1 W2 ...]

`average` is WARM's weight averaging (posttrain_jax/merging.py): sum_i w_i
theta_i with w uniform by default (given weights are normalised to sum 1).
All directories must hold the same architecture (model.gin) and the same
kind of model (all reward models, or all policies); a training run directory
stands for its newest checkpoint. OUT is a model directory of the same kind:
pass it to tools/score.py, reward training or RL. WARP's slerp and liti
merges will be further subcommands.
"""

from __future__ import annotations

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from posttrain_jax import cli, merging


def parse_args(argv):
  p = argparse.ArgumentParser(prog="merge.py", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="method", required=True)
  avg = sub.add_parser("average", help="(weighted) average of the parameters (WARM)")
  avg.add_argument("directories", nargs="+", help="model or run directories")
  avg.add_argument("--output", required=True)
  avg.add_argument("--weights", type=float, nargs="+", default=None)
  return p.parse_args(argv)


def main(argv) -> int:
  args = parse_args(argv)
  if os.path.exists(os.path.join(args.output, "checkpoint")):
    raise cli.ConfigError(f"--output {args.output} already holds a checkpoint; choose a "
                          "new directory.")
  if args.output in args.directories:
    raise cli.ConfigError("--output must differ from the merged directories.")
  try:
    merged = merging.merge_model_dirs(args.directories, args.output, args.weights)
  except (ValueError, FileNotFoundError) as e:
    raise cli.ConfigError(str(e)) from e
  weights = merging.normalized_weights(args.weights, len(args.directories))
  kind = "reward model" if merged.is_reward_model else "policy"
  print(f"wrote the {args.method} of {len(args.directories)} {kind} directories "
        f"(weights {', '.join(f'{w:.4g}' for w in weights)}) to {merged.directory}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
