"""Flag teacher hacking in a TensorBoard log: where a power-law curve flattens.

  python tools/detect_hacking.py --logdir DIR [--tag proxy] [--window 0.3] \
      [--num_sigmas 3] [--min_run 3] [--min_threshold 0.01]

Reads the metric `--tag` from the event files under DIR (scalar events, or the
tensor events that clu's metric writer / TF2 summaries write), fits
log metric = a - alpha log step on the early window and reports the first step
where later residuals turn systematically positive (rule and its [M] status:
`posttrain_jax/distillation/hacking_detector.py`; Tiapkin et al. 2025, arXiv 2502.02671).

Prints one JSON line {"tag", "flagged", "step", "alpha", "log_c", "noise",
"fit_end_step", "num_points", "num_fit_points", "run"}. Exit status 2 with a
one-line message when the tag is missing or ambiguous. Does not import
TensorFlow (TensorBoard's stub reader is forced).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# Force TensorBoard's TensorFlow stub: its compat layer imports tensorflow
# whenever it is installed unless `tensorboard.compat.notf` can be imported.
if "tensorflow" not in sys.modules:
  sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from posttrain_jax.distillation import hacking_detector


def _run_dirs(logdir: str) -> list[str]:
  dirs = []
  for root, _, files in os.walk(logdir):
    if any("tfevents" in f for f in files):
      dirs.append(root)
  return sorted(dirs)


def read_curve(run_dir: str, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
  """(steps, values) of `tag` in one run directory, or None if absent."""
  acc = event_accumulator.EventAccumulator(
      run_dir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
  acc.Reload()
  tags = acc.Tags()
  points = {}
  if tag in tags.get("scalars", []):
    for ev in acc.Scalars(tag):
      points[ev.step] = float(ev.value)
  elif tag in tags.get("tensors", []):
    for ev in acc.Tensors(tag):
      points[ev.step] = float(np.asarray(tensor_util.make_ndarray(ev.tensor_proto)).reshape(()))
  else:
    return None
  steps = np.array(sorted(points), np.float64)  # a rewritten step keeps its last value
  return steps, np.array([points[s] for s in sorted(points)], np.float64)


def _available_tags(run_dirs):
  tags = set()
  for d in run_dirs:
    acc = event_accumulator.EventAccumulator(d)
    acc.Reload()
    t = acc.Tags()
    tags.update(t.get("scalars", []))
    tags.update(t.get("tensors", []))
  return sorted(tags)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--logdir", required=True)
  parser.add_argument("--tag", default="proxy")
  defaults = hacking_detector.DetectorConfig()
  parser.add_argument("--window", type=float, default=defaults.window)
  parser.add_argument("--num_sigmas", type=float, default=defaults.num_sigmas)
  parser.add_argument("--min_run", type=int, default=defaults.min_run)
  parser.add_argument("--min_threshold", type=float, default=defaults.min_threshold)
  parser.add_argument("--min_fit_points", type=int, default=defaults.min_fit_points)
  args = parser.parse_args(argv)

  def fail(msg):
    print(f"detect_hacking: {msg}", file=sys.stderr)
    return 2

  if not os.path.isdir(args.logdir):
    return fail(f"no such directory: {args.logdir}")
  run_dirs = _run_dirs(args.logdir)
  if not run_dirs:
    return fail(f"no TensorBoard event files under {args.logdir}")
  found = [(d, c) for d in run_dirs if (c := read_curve(d, args.tag)) is not None]
  if not found:
    return fail(f"tag {args.tag!r} not found; available: {_available_tags(run_dirs)}")
  if len(found) > 1:
    return fail(f"tag {args.tag!r} is in several runs, pass one as --logdir: "
                f"{[d for d, _ in found]}")
  run_dir, (steps, values) = found[0]
  try:
    config = hacking_detector.DetectorConfig(
        window=args.window, min_fit_points=args.min_fit_points, num_sigmas=args.num_sigmas,
        min_run=args.min_run, min_threshold=args.min_threshold)
    result = hacking_detector.detect_hacking(steps, values, config)
  except ValueError as e:
    return fail(str(e))
  print(json.dumps({"tag": args.tag, **result.to_json(), "run": run_dir}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
