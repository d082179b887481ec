"""Streaming DiLoCo's wire sizes and byte counters (host-side Python ints).

One replica's payload for fragment p is the sum over its tensors (each
per-layer slice of a scanned leaf is its own tensor) of `quantization.bytes_of`
in the exchange format: FP4 is |fragment| * 4 bits + 4 bytes per scale.
`ByteCounter` sums, per step: sent_bytes (payload x participating replicas),
replica_bytes (what one always-participating replica sent), peak_step_bytes
(the most one replica sends after one step), and the data-parallel
equivalents: each replica all-reducing its full gradient every step, n_params x
dp_bytes_per_param (default: the params' dtype size; fp32 here) per replica per
step.

When bytes count. `update(event)` counts the exchanges the schedule starts
after a step (`event.sync`), at that step, whichever program carries them
(`streaming_diloco`: with τ >= 1 an exchange started after step t runs in
step t + 1's program). So the totals are a function of the step count
(`StreamingDiLoCo.counter_at` rebuilds them on resume), and the exchange
started after a run's last step (applied only after the end, hence never
run) is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

import jax
import numpy as np

from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import quantization


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Static wire sizes: payload_bytes[p] is what one replica sends when
  fragment p syncs; dp_step_bytes what it sends per data-parallel step."""

  payload_bytes: tuple[int, ...]
  dp_step_bytes: int
  num_params: int

  @classmethod
  def build(cls, params, fragments: Sequence[fr.Fragment], fmt: str,
            block: int | None, dp_bytes_per_param: int | None = None) -> "Traffic":
    leaves = fr._leaves_by_path(params)  # pylint: disable=protected-access
    payload = []
    for f in fragments:
      total = 0
      for s in f.selectors:
        shape = leaves[s.path].shape
        if s.rows is None or not s.row_tensors:  # one tensor
          total += quantization.bytes_of(fr.selected_shape(shape, s.rows), fmt, block)
        else:  # one tensor per row (a scanned layer's slice)
          total += len(range(*s.rows)) * quantization.bytes_of(shape[1:], fmt, block)
      payload.append(total)
    num = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    per = dp_bytes_per_param or max(np.dtype(x.dtype).itemsize
                                    for x in jax.tree.leaves(params))
    return cls(tuple(payload), num * per, num)

  @property
  def full_sync_bytes(self) -> int:
    return sum(self.payload_bytes)

  def step_bytes(self, event: fr.Event) -> int:
    return sum(self.payload_bytes[p] for p in event.sync)


@dataclasses.dataclass
class ByteCounter:
  """Cumulative traffic of a run (host-side; see the module docstring)."""

  traffic: Traffic
  num_replicas: int
  steps: int = 0
  sent_bytes: int = 0
  replica_bytes: int = 0
  peak_step_bytes: int = 0

  def update(self, event: fr.Event, participants: int | None = None) -> None:
    n = self.num_replicas if participants is None else int(participants)
    step = self.traffic.step_bytes(event)
    self.steps += 1
    self.replica_bytes += step
    self.sent_bytes += step * n
    self.peak_step_bytes = max(self.peak_step_bytes, step)

  @property
  def dp_replica_bytes(self) -> int:
    return self.steps * self.traffic.dp_step_bytes

  @property
  def dp_sent_bytes(self) -> int:
    return self.dp_replica_bytes * self.num_replicas

  def as_dict(self) -> dict[str, int]:
    return {"sent_bytes": self.sent_bytes, "replica_bytes": self.replica_bytes,
            "peak_step_bytes": self.peak_step_bytes,
            "dp_replica_bytes": self.dp_replica_bytes,
            "dp_sent_bytes": self.dp_sent_bytes,
            "dp_peak_step_bytes": self.traffic.dp_step_bytes}
