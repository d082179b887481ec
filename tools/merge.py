"""Merges model directories in weight space (reward models or policies).

  python tools/merge.py average --output OUT DIR1 DIR2 ... [--weights W1 W2 ...]
  python tools/merge.py slerp --init INIT --output OUT DIR1 DIR2 ... [--lambda L]
  python tools/merge.py liti --init INIT --merged MERGED --eta 0.3 --output OUT

`average` is WARM's weight averaging: sum_i w_i theta_i with w uniform by
default (given weights are normalised to sum 1). `slerp` is WARP's spherical
interpolation of the task vectors theta_m - theta_init, tensor by tensor
(M = 2: lambda, default 0.5; M > 2: model m merged in with lambda = 1/m);
`liti` is WARP's (1 - eta) theta_init + eta theta_merged. See
posttrain_jax/merging/. All directories must hold the same architecture
(model.gin) and kind (all reward models, or all policies); a training run
directory stands for its newest checkpoint. OUT is a model directory of the
merged models' kind.
"""

from __future__ import annotations

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from posttrain_jax import cli
from posttrain_jax import merging


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
  return p.parse_args(argv)


def main(argv) -> int:
  args = parse_args(argv)
  inputs = (args.directories if args.method != "liti" else [args.merged]) + (
      [args.init] if args.method != "average" else [])
  if os.path.exists(os.path.join(args.output, "checkpoint")):
    raise cli.ConfigError(f"--output {args.output} already holds a checkpoint; choose a "
                          "new directory.")
  if os.path.abspath(args.output) in [os.path.abspath(d) for d in inputs]:
    raise cli.ConfigError("--output must differ from the merged directories.")
  try:
    if args.method == "average":
      merged = merging.merge_model_dirs(args.directories, args.output, args.weights)
      weights = merging.normalized_weights(args.weights, len(args.directories))
      how = f"average (weights {', '.join(f'{w:.4g}' for w in weights)})"
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
