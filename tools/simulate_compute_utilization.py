"""Compute utilization of data-parallel, DiLoCo and Streaming DiLoCo training
as a function of the cross-replica bandwidth (Douillard et al. 2025, arXiv
2501.18512, Table 4).

  python tools/simulate_compute_utilization.py            # the 1B and 100B tables
  python tools/simulate_compute_utilization.py --params 7e9 --layers 32 --step_time 0.8

Model (a DAG simulated per layer, pure Python):
- Compute: one stream. A step is a forward over layers 0..L-1 then a backward
  over L-1..0; forward = 1/3 and backward = 2/3 of the step time (Kaplan: 6N
  FLOPs per token = 2N forward + 4N backward), each split evenly over the
  layers. Step time: given, or from the Kaplan rule 6 N tokens / (chips x peak
  FLOP/s x MFU) with MFU 0.6 (`kaplan_step_time`).
- Network: one link per replica, FIFO. An all-reduce of b bits among M
  replicas costs 2 (M - 1) / M x b / bandwidth (ring all-reduce).
- Data-parallel: after each layer's backward, its bf16 gradient is all-reduced
  (overlapping the rest of the backward); the next step's forward of a layer
  waits for that layer's reduction.
- Vanilla DiLoCo: every H steps, the bf16 pseudo-gradient of all layers is
  all-reduced (layer 0 first); the next forward of a layer waits for it.
- Streaming DiLoCo + overlap + FP4: fragments of 3 layers, strided; fragment p
  is all-reduced (4 bits per parameter) after steps t with (t - t_p) mod H = 0,
  t_p = round(p H / P), and must arrive before the forward of step t + tau + 1
  (its outer update is applied after step t + tau).
CU = compute time / wall time (steady state: the last of several windows).
Bandwidths are scanned on the grid logspace(-1, 3, 50) Gbit/s (the grid the
paper's table values fall on) and the smallest one reaching each CU target is
reported.

Assumptions [M]: bf16 gradients / pseudo-gradients for data-parallel and
vanilla DiLoCo, FP4 for streaming, no outer-step compute, ring all-reduce, M = 2,
H = 100, tau = 1, the 100B model's depth (80 layers, Chinchilla-like). The
paper's own simulator is not published, so the numbers are expected to match in
shape (orders of magnitude, ordering), not digit for digit.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

BANDWIDTHS = np.logspace(-1, 3, 50)  # Gbit/s
TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99)
METHODS = ("data_parallel", "diloco", "streaming_fp4")

# Douillard et al. 2025 (arXiv 2501.18512), Table 4: Gbit/s for CU = 50/80/90/95/99%.
PAPER = {
    "1B": {"data_parallel": (86.8, 152.6, 184.2, 222.3, 569),
           "diloco": (1.4, 6.2, 13.3, 23.3, 86.8),
           "streaming_fp4": (0.4, 0.9, 1.7, 2.0, 3.0)},
    "100B": {"data_parallel": (184.2, 323.8, 390.7, 390.7, 471.5),
             "diloco": (3.0, 11.0, 23.3, 49.4, 184.2),
             "streaming_fp4": (0.5, 0.9, 1.1, 1.1, 1.4)},
}


@dataclasses.dataclass(frozen=True)
class Setup:
  params: float            # N
  layers: int              # L
  step_time: float         # seconds of compute per step
  replicas: int = 2        # M
  sync_every: int = 100    # H
  overlap: int = 1         # tau
  layers_per_fragment: int = 3
  dp_bits: int = 16
  diloco_bits: int = 16
  streaming_bits: int = 4


CASES = {"1B": Setup(params=1e9, layers=24, step_time=0.1),
         "100B": Setup(params=100e9, layers=80, step_time=4.9)}


def kaplan_step_time(params: float, tokens_per_step: float, chips: int,
                     peak_flops: float, mfu: float = 0.6) -> float:
  """Seconds per step from 6 N FLOPs per token at `mfu` of the chips' peak."""
  return 6.0 * params * tokens_per_step / (chips * peak_flops * mfu)


def _allreduce_seconds(bits: float, gbps: float, replicas: int) -> float:
  return 2.0 * (replicas - 1) / replicas * bits / (gbps * 1e9)


def simulate(setup: Setup, method: str, gbps: float, windows: int = 3) -> float:
  """Compute utilization of `method` at `gbps` Gbit/s (steady state)."""
  L, H = setup.layers, setup.sync_every
  fwd, bwd = setup.step_time / (3 * L), 2 * setup.step_time / (3 * L)
  per_layer = setup.params / L
  if method == "data_parallel":
    steps, window = 4, 1
    cost = _allreduce_seconds(per_layer * setup.dp_bits, gbps, setup.replicas)
  else:
    steps, window = windows * H, H
  if method == "diloco":
    cost = _allreduce_seconds(per_layer * setup.diloco_bits, gbps, setup.replicas)
  if method == "streaming_fp4":
    num_frag = max(1, L // setup.layers_per_fragment)
    frag_layers = [list(range(p, L, num_frag)) for p in range(num_frag)]
    offsets = [round(p * H / num_frag) for p in range(num_frag)]
    frag_cost = [_allreduce_seconds(len(ls) * per_layer * setup.streaming_bits, gbps,
                                    setup.replicas) for ls in frag_layers]
  elif method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")

  clock, link = 0.0, 0.0
  ready = [0.0] * L          # when each layer's weights may be read by a forward
  pending: dict[int, list[tuple[list[int], float]]] = {}  # step -> arrivals
  marks = {}                 # step -> when its forward would have started unstalled
  for t in range(1, steps + 2):
    for layers, arrival in pending.pop(t, []):
      for l in layers:
        ready[l] = max(ready[l], arrival)
    for l in range(L):                        # forward
      clock = max(clock, ready[l]) + fwd
    marks[t] = clock - L * fwd                # stalls count for the previous step
    for l in reversed(range(L)):              # backward (+ DP gradient reduce)
      clock += bwd
      if method == "data_parallel":
        link = max(link, clock) + cost
        ready[l] = link
    if method == "diloco" and t % H == 0:     # outer all-reduce, blocking
      for l in range(L):
        link = max(link, clock) + cost
        ready[l] = link
    if method == "streaming_fp4":
      for p, off in enumerate(offsets):
        if (t - off) % H == 0:
          link = max(link, clock) + frag_cost[p]
          pending.setdefault(t + setup.overlap + 1, []).append((frag_layers[p], link))
  # steady state: the last whole window, from its first step to the next one's
  wall = marks[steps + 1] - marks[steps + 1 - window]
  return window * setup.step_time / wall


def required_bandwidth(setup: Setup, method: str, targets=TARGETS,
                       grid=BANDWIDTHS) -> list[float]:
  """Smallest grid bandwidth (Gbit/s) reaching each CU target (inf if none)."""
  cu = [simulate(setup, method, b) for b in grid]
  return [next((b for b, c in zip(grid, cu) if c >= x - 1e-12), float("inf"))
          for x in targets]


def table(setups: dict[str, Setup]) -> dict[str, dict[str, list[float]]]:
  return {name: {m: required_bandwidth(s, m) for m in METHODS}
          for name, s in setups.items()}


def _fmt(values) -> str:
  return " / ".join(f"{v:.1f}" if v < 100 else f"{v:.0f}" for v in values)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--params", type=float, help="N (with --layers, --step_time)")
  parser.add_argument("--layers", type=int)
  parser.add_argument("--step_time", type=float, help="seconds per step")
  parser.add_argument("--replicas", type=int, default=2)
  parser.add_argument("--sync_every", type=int, default=100)
  args = parser.parse_args(argv)
  if args.params:
    if not (args.layers and args.step_time):
      parser.error("--params needs --layers and --step_time")
    setups = {f"{args.params:.3g} params": Setup(args.params, args.layers, args.step_time,
                                                 args.replicas, args.sync_every)}
  else:
    setups = CASES
  result = table(setups)
  print(f"Gbit/s needed for CU = {' / '.join(f'{int(x * 100)}' for x in TARGETS)}% "
        f"(M, H, tau = {next(iter(setups.values())).replicas}, "
        f"{next(iter(setups.values())).sync_every}, 1)")
  for name, rows in result.items():
    s = setups[name]
    print(f"\n{name}: {s.layers} layers, {s.step_time} s/step")
    for m in METHODS:
      line = f"  {m:<14} simulated {_fmt(rows[m])}"
      if name in PAPER:
        line += f"   | paper {_fmt(PAPER[name][m])}"
      print(line)


if __name__ == "__main__":
  main()
