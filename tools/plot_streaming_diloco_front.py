"""The bytes-vs-loss front of Streaming DiLoCo (docs/experiments/streaming_diloco.md).

  python tools/plot_streaming_diloco_front.py runs/streaming_diloco \
      --out docs/experiments/streaming_diloco_front.png

Reads each run's final eval loss from RUN.log ("eval at step N: loss X") for
runs named <name>_seed<S> (the names of tools/run_streaming_diloco_bf16.sh:
h<H>_b128 = FP4 block 128, H = <H>; dp = data-parallel), pairs every DiLoCo
seed with data-parallel's of the same seed (a run `dp_seed<S>`, or
--dp_loss S=LOSS from an earlier table) and prints a markdown table: H,
bytes per replica vs the bf16 and fp32 data-parallel ring all-reduce for
M = 2 and M = 4 (`diloco.traffic`, gemma2_tiny's shapes, 2 fragments, FP4
block 128, every tensor FP4), and the eval-loss gap per seed. --extra
LABEL:H:GAP,GAP,... adds points measured elsewhere. Plots gap (mean, min-max
over seeds) against the bf16 ratio for M = 2.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from posttrain_jax.diloco import streaming_diloco as sd  # pylint: disable=wrong-import-position

TINY = dict(vocab_size=2048, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
            head_dim=32, mlp_dim=512, sliding_window_size=64)


def final_eval(log: str) -> float | None:
  hits = re.findall(r"eval at step (\d+): loss ([0-9.]+)", open(log).read())
  return float(hits[-1][1]) if hits else None


def ratios(h: int, m: int, block: int = 128) -> tuple[float, float]:
  """(bf16, fp32) data-parallel bytes / DiLoCo bytes per replica, over 2 windows."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from posttrain_jax.models import ModelConfig, Transformer  # pylint: disable=import-outside-toplevel
  params = nn.unbox(jax.eval_shape(Transformer(ModelConfig(**TINY)).init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 8), np.int32))["params"])
  config = sd.DiLoCoConfig(num_replicas=m, sync_every=h, num_fragments=2,
                           embeddings="split", quant_block=block)
  d = sd.StreamingDiLoCo(config, None, params).counter_at(2 * h).as_dict()
  return d["dp_replica_bytes"] / d["replica_bytes"], d["dp_fp32_replica_bytes"] / d["replica_bytes"]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("root")
  ap.add_argument("--out", required=True)
  ap.add_argument("--dp_loss", default="", help="S=LOSS,... for seeds without a dp run")
  ap.add_argument("--extra", action="append", default=[], help="LABEL:H:GAP,GAP,... (gaps in %%)")
  args = ap.parse_args()
  dp = {int(k): float(v) for k, v in (x.split("=") for x in args.dp_loss.split(",") if x)}
  runs = collections.defaultdict(dict)
  for log in sorted(glob.glob(os.path.join(args.root, "*_seed*.log"))):
    name, seed = re.match(r"(.*)_seed(\d+)\.log", os.path.basename(log)).groups()
    loss = final_eval(log)
    if loss is not None and (name == "dp" or os.path.exists(log[:-4] + "/done")):
      runs[name][int(seed)] = loss
  dp.update(runs.pop("dp", {}))
  points = []  # (label, H, {seed: gap %})
  for name, by_seed in sorted(runs.items()):
    h = int(re.match(r"h(\d+)_", name).group(1))
    gaps = {s: 100 * (v / dp[s] - 1) for s, v in by_seed.items() if s in dp}
    points.append((f"FP4 b128 H={h}", h, gaps, by_seed))
  for extra in args.extra:
    label, h, gaps = extra.split(":")
    points.append((label, int(h), dict(enumerate(float(g) for g in gaps.split(","))), {}))
  print("| run | H | bf16 ratio M=2 / M=4 | fp32 ratio M=2 / M=4 | eval loss by seed | gap by seed | mean gap |")
  print("|---|---|---|---|---|---|---|")
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, h, gaps, losses in sorted(points, key=lambda p: p[1]):
    (b2, f2), (b4, f4) = ratios(h, 2), ratios(h, 4)
    g = np.array(list(gaps.values()))
    print(f"| {label} | {h} | {b2:.0f}x / {b4:.0f}x | {f2:.0f}x / {f4:.0f}x | "
          + ", ".join(f"{s}: {v:.4f}" for s, v in sorted(losses.items())) + " | "
          + ", ".join(f"{s}: {v:+.2f}%" for s, v in sorted(gaps.items()))
          + f" | {g.mean():+.2f}% ({len(g)} seeds) |")
    ax.errorbar([b2], [g.mean()], yerr=[[g.mean() - g.min()], [g.max() - g.mean()]],
                fmt="o", capsize=3, label=f"{label} ({len(g)} seeds)")
  ax.axhline(2.0, color="gray", ls="--", lw=1)
  ax.axvline(100.0, color="gray", ls=":", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("bytes per replica: bf16 data-parallel / Streaming DiLoCo (M = 2)")
  ax.set_ylabel("eval-loss gap to data-parallel (%)")
  ax.set_title("Streaming DiLoCo front, 1,800 steps, gemma2_tiny")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
