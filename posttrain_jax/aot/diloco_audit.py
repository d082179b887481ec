"""The Streaming DiLoCo audit: what crosses DCN is what the algorithm promises.

On a multi-slice target (replica axis = slices) the compiled programs of
`programs.diloco_programs` must satisfy:

  1. the inner step (and every apply-only outer program) has no DCN
     collective: replicas train inside their slice;
  2. a program that syncs fragments S moves over DCN, per slice (replica),
     exactly sum_{p in S} Traffic.sync_bytes(p) of diloco/traffic.py (the
     FP4 codes + scales all-gathered, (M - 1) payloads per replica): the
     DCN bytes the program sends beyond those of the inner step it carries.

Any difference is an `AuditError` (not a warning), listing every failure.
"""

from __future__ import annotations

from posttrain_jax.aot.plan import ProgramPlan
from posttrain_jax.aot.report import nbytes


class AuditError(ValueError):
  """The compiled DiLoCo programs move other DCN bytes than promised; `lines`:
  every check, "ok" or "FAIL"."""

  def __init__(self, message: str, lines: list[str]):
    super().__init__(message)
    self.lines = lines


def _dcn_ops(plan: ProgramPlan) -> str:
  ops = plan.traffic.of("DCN")
  kinds = sorted({c.kind for c in ops})
  return (f"{sum(c.count for c in ops)} DCN {'/'.join(kinds)} "
          f"({nbytes(plan.traffic.dcn_slice_bytes)} per slice)")


def audit(traffic, plans: list[ProgramPlan]) -> list[str]:
  """Checks the plans of one DiLoCo job against `traffic` (its Traffic);
  returns the report lines, or raises AuditError with them."""
  lines, failures = [], []
  inner_dcn = 0
  for plan in plans:
    if plan.program.role == "inner":
      inner_dcn = plan.traffic.dcn_slice_bytes
  for plan in plans:
    p = plan.program
    if p.role in ("inner", "apply"):
      if plan.traffic.of("DCN"):
        failures.append(f"{p.name}: {_dcn_ops(plan)}; it must have none")
        lines.append(f"FAIL {failures[-1]}")
      else:
        lines.append(f"ok   {p.name}: no DCN collective")
    elif p.role == "sync":
      measured = plan.traffic.dcn_slice_bytes - (inner_dcn if "inner step" in p.name else 0)
      expected = sum(traffic.sync_bytes(f) for f in p.sync)
      what = (f"{p.name}: DCN {measured:,} B per slice"
              + (f" beyond the inner step's {inner_dcn:,} B" if inner_dcn and
                 "inner step" in p.name else "")
              + f", traffic.py {expected:,} B")
      if measured == expected:
        lines.append(f"ok   {what}")
      else:
        failures.append(f"{what} (difference {measured - expected:+,} B)")
        lines.append(f"FAIL {failures[-1]}")
  if failures:
    raise AuditError("Streaming DiLoCo DCN audit failed: " + "; ".join(failures), lines)
  return lines
