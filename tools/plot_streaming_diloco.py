"""Summarises the gin/experiments/streaming_diloco runs: a markdown table of
eval loss and bytes exchanged, and a PNG of the training / eval loss curves.

  python tools/plot_streaming_diloco.py runs/streaming_diloco/data_parallel \
      runs/streaming_diloco/diloco_h30 runs/streaming_diloco/streaming_fp4 \
      --out docs/experiments/streaming_diloco_loss.png

Reads the TensorBoard scalars the training loop writes (loss, eval/loss,
traffic/*). A data-parallel run has no traffic/* scalars: its bytes are the
data-parallel equivalent written by the DiLoCo runs (same model, same steps).
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def scalars(run_dir: str) -> dict[str, dict[int, float]]:
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(run_dir, size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    try:
      out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                  for e in acc.Tensors(tag)}
    except (TypeError, ValueError):
      continue  # text summaries (the config)
  return out


def _bytes(n: float) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+")
  parser.add_argument("--out", default="streaming_diloco_loss.png")
  args = parser.parse_args(argv)
  runs = {os.path.basename(os.path.normpath(r)): scalars(r) for r in args.runs}
  dp_equiv = next((s["traffic/dp_sent_bytes"] for s in runs.values()
                   if "traffic/dp_sent_bytes" in s), None)
  print("| run | train loss (last 50 steps) | eval loss | "
        "bytes sent (all replicas) | vs data-parallel (traffic/dp_ratio: per replica, bf16 ring all-reduce since issue 17) | peak bytes / step / replica |")
  print("|---|---|---|---|---|---|")
  for name, s in runs.items():
    last = max(s["eval/loss"])
    end = max(s["loss"])
    train = [v for k, v in s["loss"].items() if k > end - 50]
    if "traffic/sent_bytes" in s:
      sent = s["traffic/sent_bytes"][max(s["traffic/sent_bytes"])]
      peak = s["traffic/peak_step_bytes"][max(s["traffic/peak_step_bytes"])]
      ratio = f"{s['traffic/dp_ratio'][max(s['traffic/dp_ratio'])]:.0f}x fewer"
    else:
      sent = dp_equiv[max(dp_equiv)] if dp_equiv else float("nan")
      peak = (next(v["traffic/dp_peak_step_bytes"] for v in runs.values()
                   if "traffic/dp_peak_step_bytes" in v)[last]
              if dp_equiv else float("nan"))
      ratio = "1x"
    print(f"| {name} | {np.mean(train):.4f} | {s['eval/loss'][last]:.4f} (step {last}) | "
          f"{_bytes(sent)} | {ratio} | {_bytes(peak)} |")

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for name, s in runs.items():
    steps, loss = zip(*sorted(s["loss"].items()))
    ax1.plot(steps, loss, label=name)
    steps, loss = zip(*sorted(s["eval/loss"].items()))
    ax2.plot(steps, loss, marker="o", label=name)
  ax1.set(title="train loss (logged window means)", xlabel="step", ylabel="loss")
  ax2.set(title="eval loss (outer params for DiLoCo)", xlabel="step")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=100)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
