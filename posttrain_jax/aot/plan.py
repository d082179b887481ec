"""Compile one program for a TPU target and measure it: memory, time bound, traffic.

`compile_program` lowers a `Program` (abstract inputs with shardings on a
mesh of compile-only TPU devices, nothing allocated), compiles it with the
TPU compiler and returns a `ProgramPlan`:

- per-chip HBM from `compiled.memory_analysis()`: arguments, outputs,
  donated aliases, temporaries; peak = arguments + outputs - aliases +
  temporaries (what tools/train_memory.py reports), against the chip's HBM;
- FLOPs per run from the analytic count (ModelConfig.flops_per_token: 6N +
  attention, as tools/bench_train.py; XLA's cost analysis counts a scanned
  loop body once, so its count is shown beside it, not used);
- a roofline lower bound on the run time: max(FLOPs per chip / peak bf16
  FLOP/s, HBM bytes per chip / HBM bandwidth), with HBM bytes the larger of
  XLA's "bytes accessed" (again a loop body once) and arguments + outputs
  (every input read, every output written once), and the MFU that bound
  implies (compute time / bound);
- every collective of the optimized HLO, ICI or DCN (collectives.py).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import re
import time
from typing import Any

import jax

from posttrain_jax.aot import collectives
from posttrain_jax.aot.topology import Target, slice_index


@dataclasses.dataclass
class Program:
  """A program of a job, ready to lower: `lower()` -> jax.stages.Lowered.

  flops: analytic FLOPs of one run over all chips (0: not counted);
  tokens: tokens one run processes; role / sync: for the DiLoCo audit
  ("inner", "sync" with the fragments it exchanges, "apply").
  """

  name: str
  lower: Callable[[], "jax.stages.Lowered"]
  flops: float = 0.0
  tokens: int = 0
  role: str = ""
  sync: tuple[int, ...] = ()


@dataclasses.dataclass
class ProgramPlan:
  """What compiling one Program for a target gave (per chip unless stated)."""

  program: Program
  target: Target
  compile_s: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  xla_flops: float           # per chip, loop bodies once
  xla_bytes_accessed: float  # per chip, loop bodies once
  traffic: collectives.Summary
  compiled: Any = None       # the jax.stages.Compiled

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def capacity_bytes(self) -> int:
    return self.target.chip.hbm_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.capacity_bytes

  @property
  def flops_per_chip(self) -> float:
    return self.program.flops / self.target.num_chips

  @property
  def hbm_bytes(self) -> float:
    return max(self.xla_bytes_accessed, float(self.argument_bytes + self.output_bytes))

  @property
  def compute_s(self) -> float:
    return self.flops_per_chip / self.target.chip.peak_bf16_flops

  @property
  def memory_s(self) -> float:
    return self.hbm_bytes / self.target.chip.hbm_bytes_per_s

  @property
  def roofline_s(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def roofline_mfu(self) -> float | None:
    return self.compute_s / self.roofline_s if self.program.flops and self.roofline_s else None


def device_slices(mesh) -> list[int]:
  """slice_index of every device in the program's device order (mesh order)."""
  return [slice_index(d) for d in mesh.devices.flat]


class DoesNotFit(ValueError):
  """The TPU compiler found no schedule within the chip's HBM."""


def compile_program(program: Program, target: Target, mesh) -> ProgramPlan:
  """Lowers and compiles `program` (see the module docstring). A program the
  TPU compiler cannot fit into HBM raises DoesNotFit with its numbers."""
  t0 = time.perf_counter()
  lowered = program.lower()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  # jax.errors.JaxRuntimeError
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    m = re.search(r"memory required for ([^()]*)\(([\d.]+[KMGT]?)\) exceeds available "
                  r"HBM \(([\d.]+[KMGT]?)\)", text)
    detail = (f"the compiler needs {m.group(2)}B of HBM per chip for {m.group(1).strip()}, "
              f"{m.group(3)}B available" if m else text.splitlines()[0][:300])
    raise DoesNotFit(f"{program.name} does not fit on {target}: {detail}") from None
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return ProgramPlan(
      program=program, target=target, compile_s=compile_s,
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes),
      xla_flops=float(cost.get("flops", 0.0)),
      xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      traffic=collectives.parse(compiled.as_text(), device_slices(mesh)), compiled=compiled)
