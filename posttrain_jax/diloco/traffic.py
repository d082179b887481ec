"""Streaming DiLoCo's wire sizes and byte counters (host-side Python ints).

What a collective moves per replica (ring algorithms, M replicas):

  all-gather of a payload of b bytes per replica:   (M - 1) b   (received; as many sent)
  all-reduce of n bytes (reduce-scatter + all-gather): 2 (M - 1) / M n

The exchange (`exchange.sharded_exchange`) all-gathers each replica's packed
codes and scales: a fragment's payload b_p is the sum over its tensors (each
per-layer slice of a scanned leaf is its own tensor) of `quantization.bytes_of`
in the exchange format (FP4: |tensor| * 4 bits + 4 bytes per scale), so one
replica moves (M - 1) b_p per sync of fragment p. Tensors whose scale blocks
cross shard boundaries (`exchange.fallback_names` on the params' shardings)
take the reference exchange, an fp32 all-reduce: they count as
2 (M - 1) / M x 4 |tensor| bytes, and `Traffic.fallback_line` names them (the
trainer logs it at start-up). The data-parallel baseline is the same ring
all-reduce of the full gradient every step, in `dp_dtype` (default bf16, the
paper's baseline, arXiv 2501.18512; fp32 also reported): 2 (M - 1) / M x
n_params x itemsize per replica per step. M = 2, FP4 with block-128 scales
(4.25 bits per value), bf16 baseline: 2 bytes per parameter per step against
4.25 / 8 per parameter per H steps, a ratio of 16 H / 4.25 (M = 4: half that).

`ByteCounter` sums, per step: replica_bytes (what one always-participating
replica moves), sent_bytes (that x participating replicas), peak_step_bytes
(the most one replica moves after one step), and the data-parallel
equivalents over the same steps (dp_*: `dp_dtype`; dp_fp32_*: fp32).

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

from posttrain_jax.diloco import exchange
from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import quantization

FP32_BYTES = 4


def all_gather_bytes(payload: int, num_replicas: int) -> int:
  """Bytes one replica receives (and, in a ring, sends) when M replicas
  all-gather `payload` bytes each: (M - 1) payload."""
  return (num_replicas - 1) * payload


def all_reduce_bytes(n_bytes: int, num_replicas: int) -> int:
  """Bytes one replica sends in a ring all-reduce of `n_bytes`
  (reduce-scatter then all-gather): 2 (M - 1) / M n."""
  return 2 * (num_replicas - 1) * n_bytes // num_replicas


def _dtype_size(dtype: str) -> int:
  try:
    return np.dtype(jax.numpy.dtype(dtype)).itemsize
  except TypeError as e:
    raise ValueError(f"dp_dtype must be a dtype name such as 'bfloat16' or "
                     f"'float32', got {dtype!r}.") from e


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Static wire sizes. gather_bytes[p]: one replica's all-gathered payload
  of fragment p (codes + scales); reduce_bytes[p]: the fp32 bytes of its
  tensors that fall back to the all-reduce (`fallback`: "p/name" of each)."""

  gather_bytes: tuple[int, ...]
  reduce_bytes: tuple[int, ...]
  num_params: int
  num_replicas: int
  dp_dtype: str = "bfloat16"
  fmt: str = "fp4_e3m0"
  fallback: tuple[str, ...] = ()

  @classmethod
  def build(cls, params, fragments: Sequence[fr.Fragment], fmt: str,
            block: int | None, num_replicas: int = 2, dp_dtype: str = "bfloat16",
            fallback: Sequence[Sequence[str]] | None = None,
            shardings=None) -> "Traffic":
    """`fallback[p]`: the selector names of fragment p exchanged by the fp32
    reference (`exchange.fallback_names`); None: none. `shardings`: the
    params' NamedShardings when the exchange runs sharded over a "replica"
    mesh axis (`exchange.sharded_exchange`): a replica's payload is then what
    its chips send (`exchange.chip_wire_bytes` x chips per replica: the
    codes and scales of each chip's shards, replicated tensors once per chip);
    None: the unsharded tensors' `quantization.bytes_of`."""
    _dtype_size(dp_dtype)
    leaves = fr._leaves_by_path(params)  # pylint: disable=protected-access
    gather, reduce, names = [], [], []
    for p, f in enumerate(fragments):
      slow = set(fallback[p]) if fallback is not None else set()
      g = r = 0
      for s in f.selectors:
        shape = leaves[s.path].shape
        if s.name in slow:
          r += FP32_BYTES * math.prod(fr.selected_shape(shape, s.rows))
          names.append(f"{p}/{s.name}")
        elif s.rows is None or not s.row_tensors:  # one tensor
          g += quantization.bytes_of(fr.selected_shape(shape, s.rows), fmt, block)
        else:  # one tensor per row (a scanned layer's slice)
          g += len(range(*s.rows)) * quantization.bytes_of(shape[1:], fmt, block)
      if shardings is not None:
        mesh = jax.tree.leaves(shardings)[0].mesh
        chips = mesh.devices.size // mesh.shape[exchange.REPLICA_AXIS]
        g = chips * exchange.chip_wire_bytes(f, shardings, params, fmt, block)
      gather.append(g)
      reduce.append(r)
    num = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return cls(tuple(gather), tuple(reduce), num, int(num_replicas), dp_dtype, fmt,
               tuple(names))

  @property
  def payload_bytes(self) -> tuple[int, ...]:
    """One replica's contribution per fragment, in its wire format."""
    return tuple(g + r for g, r in zip(self.gather_bytes, self.reduce_bytes))

  @property
  def full_sync_bytes(self) -> int:
    return sum(self.payload_bytes)

  def sync_bytes(self, p: int) -> int:
    """What one replica moves when fragment p syncs."""
    m = self.num_replicas
    return (all_gather_bytes(self.gather_bytes[p], m)
            + all_reduce_bytes(self.reduce_bytes[p], m))

  def step_bytes(self, event: fr.Event) -> int:
    return sum(self.sync_bytes(p) for p in event.sync)

  def dp_step_bytes_in(self, dtype: str) -> int:
    """One replica's bytes of a data-parallel step: a ring all-reduce of the
    full gradient in `dtype`."""
    return all_reduce_bytes(self.num_params * _dtype_size(dtype), self.num_replicas)

  @property
  def dp_step_bytes(self) -> int:
    return self.dp_step_bytes_in(self.dp_dtype)

  def fallback_line(self) -> str:
    """The start-up line: every tensor on the wire in the exchange format, or
    the tensors that fall back to the fp32 all-reduce and their bytes."""
    if not self.fallback:
      return f"Streaming DiLoCo exchange: every tensor all-gathered as {self.fmt}."
    return (f"Streaming DiLoCo exchange: {len(self.fallback)} tensors fall back to "
            f"an fp32 all-reduce ({sum(self.reduce_bytes):,} fp32 bytes per full "
            f"sync, counted so; scale blocks cross shard boundaries: pick a "
            f"quant_block dividing each shard's last dimension): "
            + ", ".join(self.fallback))


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
    fp32 = self.steps * self.traffic.dp_step_bytes_in("float32")
    return {"sent_bytes": self.sent_bytes, "replica_bytes": self.replica_bytes,
            "peak_step_bytes": self.peak_step_bytes,
            "dp_replica_bytes": self.dp_replica_bytes,
            "dp_sent_bytes": self.dp_sent_bytes,
            "dp_peak_step_bytes": self.traffic.dp_step_bytes,
            "dp_fp32_replica_bytes": fp32,
            "dp_fp32_peak_step_bytes": self.traffic.dp_step_bytes_in("float32")}
