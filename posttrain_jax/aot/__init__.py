"""Compile-only TPU plans: every job's programs compiled for real TPU topologies
on a CPU host (libtpu's compile-only devices), with per-chip memory, a
roofline step time and the ICI / DCN traffic of the optimized HLO.

  chips         the TPU generations: HBM, peak bf16 FLOP/s, HBM / ICI / DCN bandwidth
  topology      "v5e:16x16" x slices -> compile-only devices (get_topology_desc)
  collectives   the collectives of an optimized HLO module, bytes, ICI or DCN
  plan          Program (a job's program with abstract inputs) -> ProgramPlan
  programs      the programs of each job, built from its trainers
  report        the printed table per program
  diloco_audit  Streaming DiLoCo: no DCN in the inner step, syncs = traffic.py

Sits beside jobs (imports the trainers, never the jobs); tools/compile_plan.py
is the command. docs/scale.md shows the plans of the Gemma-2 sizes.
"""
