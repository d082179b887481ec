"""Cloud TPU slice types: accelerator names, topologies, hosts per slice.

`parse_accelerator("v5p-256")` -> TpuSlice(chips=128, topology="4x4x8",
hosts=32, ...): what gcloud and xmanager's JobRequirements call the slice.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
import re
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from binary_args import LaunchError  # pylint: disable=g-import-not-at-top,wrong-import-position

_TOPOLOGIES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4",
                  64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8",
                  1024: "8x8x16", 2048: "8x16x16"}
_TOPOLOGIES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8",
                  64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class _Family:
  resource: str            # xm.ResourceType name
  gcloud_prefix: str       # accelerator-type prefix for gcloud
  cores_per_chip: int      # the number in "v5p-256" counts cores (2/chip) or chips
  chips_per_host: int      # in a multi-host slice
  single_host_chips: int   # the largest slice served by one host
  topologies: Mapping[int, str]  # chips -> default topology
  runtime_version: str     # TPU VM software version


_FAMILIES = {
    "v2": _Family("tpu_v2", "v2", 2, 4, 4,
                  {4: "2x2", 16: "4x4", 64: "8x8", 128: "8x16", 256: "16x16"},
                  "tpu-ubuntu2204-base"),
    "v3": _Family("tpu_v3", "v3", 2, 4, 4,
                  {4: "2x2", 16: "4x4", 64: "8x8", 128: "8x16", 256: "16x16",
                   512: "16x32", 1024: "32x32"}, "tpu-ubuntu2204-base"),
    "v4": _Family("tpu_v4", "v4", 2, 4, 4, _TOPOLOGIES_3D, "tpu-ubuntu2204-base"),
    "v5p": _Family("tpu_v5p", "v5p", 2, 4, 4,
                   {**_TOPOLOGIES_3D, 4096: "16x16x16", 6144: "16x16x24"},
                   "v2-alpha-tpuv5"),
    "v5e": _Family("tpu_v5e", "v5litepod", 1, 4, 8, _TOPOLOGIES_2D,
                   "v2-alpha-tpuv5-lite"),
    "v6e": _Family("tpu_v6e", "v6e", 1, 4, 8, _TOPOLOGIES_2D, "v2-alpha-tpuv6e"),
}
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One TPU slice: what gcloud and xm.JobRequirements call it."""
  accelerator_type: str   # gcloud --accelerator-type, e.g. "v5p-256"
  version: str            # "v5p"
  resource: str           # xm resource name, e.g. "tpu_v5p"
  topology: str           # e.g. "4x4x8"
  chips: int
  cores: int              # TensorCores (what Vertex AI counts for TPU v2/v3)
  hosts: int              # processes per slice (one per TPU VM host)
  runtime_version: str

  def as_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def parse_accelerator(accelerator: str, topology: str | None = None) -> TpuSlice:
  """'v5p-256' (+ optional topology) -> TpuSlice; raises LaunchError."""
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator.strip().lower())
  if not m:
    raise LaunchError(
        f"--accelerator={accelerator!r}: expected a Cloud TPU type such as "
        "v5p-256, v4-32, v5litepod-16 (or v5e-16), v6e-64, v3-32.")
  version = _ALIASES.get(m.group(1), m.group(1))
  family = _FAMILIES[version]
  size = int(m.group(2))
  if size % family.cores_per_chip:
    raise LaunchError(f"--accelerator={accelerator}: {version} sizes count "
                      f"TensorCores ({family.cores_per_chip} per chip).")
  chips = size // family.cores_per_chip
  if topology:
    if not re.fullmatch(r"\d+(x\d+)+", topology):
      raise LaunchError(f"--topology={topology!r}: expected e.g. 4x4x8.")
    dims = [int(d) for d in topology.split("x")]
    product = 1
    for d in dims:
      product *= d
    if product != chips:
      raise LaunchError(
          f"--topology={topology} has {product} chips but {accelerator} has "
          f"{chips}.")
  else:
    topology = family.topologies.get(chips)
    if topology is None:
      known = ", ".join(f"{family.gcloud_prefix}-{c * family.cores_per_chip}"
                        for c in sorted(family.topologies))
      raise LaunchError(f"--accelerator={accelerator}: no default topology; "
                        f"pass --topology (known sizes: {known}).")
  hosts = 1 if chips <= family.single_host_chips else chips // family.chips_per_host
  return TpuSlice(accelerator_type=f"{family.gcloud_prefix}-{size}",
                  version=version, resource=family.resource, topology=topology,
                  chips=chips, cores=chips * family.cores_per_chip,
                  hosts=hosts,
                  runtime_version=family.runtime_version)
