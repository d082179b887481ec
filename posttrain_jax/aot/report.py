"""The printed plan: one table per compiled program, and a JSON row of it."""

from __future__ import annotations

from posttrain_jax.aot.chips import GIB
from posttrain_jax.aot.plan import ProgramPlan


def gib(n: float) -> str:
  return f"{n / GIB:,.2f} GiB"


def nbytes(n: float) -> str:
  """1,234 B / 12.3 KiB / 4.56 MiB / 7.89 GiB."""
  for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if abs(n) >= size:
      return f"{n / size:,.2f} {unit}"
  return f"{int(n):,} B"


def seconds(s: float) -> str:
  return f"{s * 1e3:,.2f} ms" if s < 1 else f"{s:,.2f} s"


def table(plan: ProgramPlan, mesh_shape: dict) -> str:
  """The program's table: HBM per chip, compile time, FLOPs, roofline, collectives."""
  p, t, chip = plan.program, plan.target, plan.target.chip
  mesh = " x ".join(f"{k}={v}" for k, v in mesh_shape.items() if v > 1) or "1 chip"
  lines = [
      f"## {p.name} on {t} ({chip.device_kind}, {chip.hbm_gib:g} GiB HBM per chip), "
      f"mesh {mesh}",
      "",
      "| per chip | bytes |", "|---|---|",
      f"| arguments | {nbytes(plan.argument_bytes)} |",
      f"| outputs | {nbytes(plan.output_bytes)} |",
      f"| aliases (donated) | {nbytes(plan.alias_bytes)} |",
      f"| temporaries | {nbytes(plan.temp_bytes)} |",
      f"| **peak** | **{nbytes(plan.peak_bytes)}** of {gib(plan.capacity_bytes)}: "
      f"{'fits' if plan.fits else 'does NOT fit'} |",
      "",
      f"compile {plan.compile_s:.1f} s | FLOPs per run "
      + (f"{p.flops:.4g} analytic ({plan.flops_per_chip:.4g} per chip; XLA "
         f"{plan.xla_flops:.4g} per chip, loop bodies once)" if p.flops else
         f"not counted (XLA {plan.xla_flops:.4g} per chip)")
      + (f" | {p.tokens:,} tokens" if p.tokens else ""),
      f"roofline >= {seconds(plan.roofline_s)} per run (compute {seconds(plan.compute_s)} "
      f"at {chip.peak_bf16_flops / 1e12:g} TFLOP/s, HBM {seconds(plan.memory_s)} for "
      f"{nbytes(plan.hbm_bytes)} at {chip.hbm_bytes_per_s / 1e9:g} GB/s)"
      + (f", MFU <= {100 * plan.roofline_mfu:.0f}%" if plan.roofline_mfu else ""),
      "",
      "| link | collective | group | runs | array bytes | sent per chip |",
      "|---|---|---|---|---|---|",
  ]
  rows = plan.traffic.table()
  for link, kind, group, runs, array, wire in rows:
    lines.append(f"| {link} | {kind} | {group} | {runs} | {nbytes(array)} | {nbytes(wire)} |")
  if not rows:
    lines.append("| - | none | | | | |")
  ici, dcn = plan.traffic.wire_bytes("ICI"), plan.traffic.wire_bytes("DCN")
  lines.append("")
  lines.append(f"sent per chip per run: ICI {nbytes(ici)}, DCN {nbytes(dcn)}"
               + (f" (per slice: {nbytes(plan.traffic.dcn_slice_bytes)})" if dcn else ""))
  return "\n".join(lines)


def row(plan: ProgramPlan, mesh_shape: dict) -> dict:
  """The plan as one JSON-able dict."""
  p = plan.program
  return {
      "program": p.name, "target": str(plan.target), "mesh": dict(mesh_shape),
      "compile_s": plan.compile_s, "argument_bytes": plan.argument_bytes,
      "output_bytes": plan.output_bytes, "alias_bytes": plan.alias_bytes,
      "temp_bytes": plan.temp_bytes, "peak_bytes": plan.peak_bytes,
      "capacity_bytes": plan.capacity_bytes, "fits": plan.fits, "flops": p.flops,
      "xla_flops_per_chip": plan.xla_flops, "tokens": p.tokens,
      "roofline_s": plan.roofline_s, "roofline_mfu": plan.roofline_mfu,
      "ici_bytes_per_chip": plan.traffic.wire_bytes("ICI"),
      "dcn_bytes_per_chip": plan.traffic.wire_bytes("DCN"),
      "dcn_bytes_per_slice": plan.traffic.dcn_slice_bytes,
      "collectives": [list(r) for r in plan.traffic.table()],
  }
