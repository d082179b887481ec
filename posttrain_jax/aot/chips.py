"""The TPU chips a plan can target: memory, peak compute and bandwidths.

One row per generation, per chip (a v4 / v5p chip is one megacore device, two
TensorCores; a v5e / v6e chip one TensorCore). Sources, the Cloud TPU system
architecture pages (docs.cloud.google.com/tpu/docs/<generation>):

  v4   "TPU v4": 275 TFLOP/s bf16, HBM2 32 GiB at 1200 GB/s; ICI and DCN
       bandwidth per chip are not given there (None: not used).
  v5e  "TPU v5e": 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, bidirectional ICI
       400 GB/s per chip, 2 x 100 Gbps NICs per 8-chip host (25 Gbps, i.e.
       3.125 GB/s, of DCN per chip; 6.4 Tbps per 256-chip Pod).
  v5p  "TPU v5p": 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, bidirectional
       ICI 1200 GB/s per chip, DCN 50 Gbps (6.25 GB/s) per chip.
  v6e  "TPU v6e" (Trillium): 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s,
       bidirectional ICI 800 GB/s per chip, 4 x 200 Gbps NICs per 8-chip host
       (100 Gbps, 12.5 GB/s, per chip; 25.6 Tbps per Pod).

HBM capacities are taken as GiB (16, 32, 95, 32): XLA reports bytes and the
fit check compares against these; the runtime keeps a little for itself, so
a plan within a few hundred MiB of the capacity is marginal.
"""

from __future__ import annotations

import dataclasses

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip (one JAX device) of a generation."""

  generation: str            # "v5e"
  device_kind: str           # jax Device.device_kind of the compile-only devices
  hbm_bytes: int
  peak_bf16_flops: float     # FLOP/s
  hbm_bytes_per_s: float
  ici_bytes_per_s: float | None   # bidirectional, per chip
  dcn_bytes_per_s: float | None   # per chip
  dims: int                  # 2 (2D torus: v5e, v6e) or 3 (v4, v5p)
  chip_config_name: str      # get_topology_desc's chip_config_name
  max_chips: int             # largest slice

  @property
  def hbm_gib(self) -> float:
    return self.hbm_bytes / GIB


CHIPS: dict[str, Chip] = {c.generation: c for c in (
    Chip("v4", "TPU v4", 32 * GIB, 275e12, 1200e9, None, None, 3, "megacore", 4096),
    Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819e9, 400e9, 3.125e9, 2, "default", 256),
    Chip("v5p", "TPU v5", 95 * GIB, 459e12, 2765e9, 1200e9, 6.25e9, 3, "megacore", 8960),
    Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12, 1640e9, 800e9, 12.5e9, 2, "default", 256),
)}


def chip(generation: str) -> Chip:
  """The Chip of a generation name ("v5e"); ValueError naming the known ones."""
  try:
    return CHIPS[generation]
  except KeyError:
    raise ValueError(f"Unknown TPU generation {generation!r}; known: "
                     f"{', '.join(CHIPS)} (e.g. v5e:4x4, v5p:2x2x2).") from None
