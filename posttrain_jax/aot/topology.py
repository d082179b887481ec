"""TPU targets by name ("v5e:16x16", "v5p:4x4x4", "v6e:16x16", x num_slices)
and their compile-only devices.

`jax.experimental.topologies.get_topology_desc` (libtpu, the `tpu` extra)
returns devices of a TPU topology that exist only for compilation: on a host
without a TPU (JAX_PLATFORMS=cpu), `jax.jit(...).lower(abstract args with
shardings on a mesh of them).compile()` runs the real TPU compiler, so its
memory analysis and optimized HLO are those of the TPU program. With
num_slices > 1 the devices carry `slice_index` (multi-slice, DCN between
slices). Hosts: 4 chips each (2x2x1, the multi-host VMs of every generation),
a single-host v5e/v6e 2x4 has 8, a 1x1 one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from posttrain_jax.aot import chips

# libtpu's start-up reads the first three from a TPU VM's metadata; compile-only
# needs none of them, and without them it prints errors about the missing
# metadata. ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise holds a lock file
# (/tmp/libtpu_lockfile) for the process's lifetime, so that a second
# compile-only process on the host fails to start.
QUIET_LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                    "TPU_ACCELERATOR_TYPE": "v5litepod-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)+)$")


class TopologyError(ValueError):
  """A target name or slice count that names no TPU topology."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU topology: `num_slices` slices of `shape` chips of `chip`."""

  chip: chips.Chip
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def topology_name(self) -> str:
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    shape = tuple(self.shape) + (1,) * (3 - len(self.shape))
    if self.chips_per_slice == 1:
      return (1, 1, 1)
    if self.chip.dims == 2 and shape[:2] == (2, 4):
      return (2, 4, 1)  # v5e-8 / v6e-8: one 8-chip host
    return (2, 2, 1)

  def __str__(self) -> str:
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return f"{self.topology_name}{slices} ({self.num_chips} chips)"


def parse(name: str, num_slices: int = 1) -> Target:
  """"v5e:4x4" (+ slices) -> Target; TopologyError naming the problem."""
  m = _NAME.match(name.strip())
  if not m:
    raise TopologyError(
        f"Unknown TPU topology {name!r}: expected GENERATION:AxB (v5e, v6e) or "
        f"GENERATION:AxBxC (v4, v5p), e.g. v5e:16x16, v5p:4x4x4, v6e:2x2.")
  try:
    chip = chips.chip(m.group(1))
  except ValueError as e:
    raise TopologyError(f"Unknown TPU topology {name!r}: {e}") from None
  shape = tuple(int(d) for d in m.group(2).split("x"))
  if len(shape) != chip.dims:
    example = "x".join(["4"] * chip.dims)
    raise TopologyError(f"TPU topology {name!r}: {chip.generation} slices are "
                        f"{chip.dims}-D ({chip.generation}:{example}), got {len(shape)} "
                        "dimensions.")
  if min(shape) < 1 or math.prod(shape) > chip.max_chips:
    raise TopologyError(f"TPU topology {name!r}: a {chip.generation} slice has 1 to "
                        f"{chip.max_chips} chips, got {math.prod(shape)}.")
  if num_slices < 1:
    raise TopologyError(f"num_slices must be >= 1, got {num_slices}.")
  target = Target(chip, shape, int(num_slices))
  bounds = target.chips_per_host_bounds
  padded = tuple(shape) + (1,) * (3 - len(shape))
  if any(s % b for s, b in zip(padded, bounds)):
    raise TopologyError(f"TPU topology {name!r}: its shape does not split into hosts "
                        f"of {'x'.join(map(str, bounds))} chips; use a multiple of "
                        f"{'x'.join(map(str, bounds[:chip.dims]))} per dimension.")
  return target


def quiet_libtpu() -> None:
  """Sets the libtpu variables that keep a compile-only start-up silent
  (never overriding the user's)."""
  for key, value in QUIET_LIBTPU_ENV.items():
    os.environ.setdefault(key, value)


def devices(target: Target) -> list:
  """The compile-only jax devices of `target` (needs libtpu)."""
  quiet_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=target.topology_name,
        chip_config_name=target.chip.chip_config_name,
        chips_per_host_bounds=target.chips_per_host_bounds,
        num_slices=target.num_slices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu's own message
    raise TopologyError(f"TPU topology {target}: libtpu refused it: "
                        f"{str(e).splitlines()[0]}") from e
  return list(desc.devices)


def slice_index(device) -> int:
  """The device's slice (0 for a single-slice topology's devices)."""
  return int(getattr(device, "slice_index", 0) or 0)
