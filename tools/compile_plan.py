"""Compile a job's programs for a TPU topology on a CPU host: does it fit, how
fast can it be, what crosses DCN.

    python tools/compile_plan.py --gin_file=gin/experiments/lm_quickstart.gin \
        --topology=v5e:2x2 [--num_slices=2] [--ici=fsdp=-1] [--dcn=replica=2] \
        [--gin.NAME=VALUE ...] [--program=SUBSTRING] [--json]

Takes the gin files of a real run (any job of posttrain_jax/aot/programs.py:
train, distill, train_reward_model, train_policy, train_dpo; Streaming DiLoCo
with `diloco`), builds the job's trainers on a mesh of compile-only TPU
devices (`jax.experimental.topologies`, libtpu from the `tpu` extra) and
compiles every per-step program with abstract inputs (nothing is allocated,
nothing runs). Per program it prints per-chip HBM against the chip's, the
compile time, analytic FLOPs, a roofline lower bound on the step time with
the MFU it implies, and every collective, ICI or DCN. A Streaming DiLoCo job
is audited (posttrain_jax/aot/diloco_audit.py): no DCN collective in the
inner step, and each fragment sync moves exactly the bytes diloco/traffic.py
reports. These are compiled plans, not measured runs.

The mesh: --ici / --dcn (axis=degree,...), else the job's ici_parallelism /
dcn_parallelism; with --num_slices > 1 and no DCN degrees, replica = slices.
Errors (unknown topology, degrees that do not multiply to the chips, a
program that does not fit, a failed audit) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compile-only: the TPU devices come from libtpu's topology description, never
# from a TPU backend (none is probed, even on a TPU VM).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=wrong-import-position
from posttrain_jax.aot import topology

topology.quiet_libtpu()

import gin

from posttrain_jax import cli
from posttrain_jax import main as binary
from posttrain_jax.cli import ConfigError
from posttrain_jax.core import partitioning


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", required=True,
                 help="TPU slice, e.g. v5e:16x16, v5p:4x4x4, v6e:16x16, v5e:2x2")
  p.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN")
  p.add_argument("--ici", default=None, help="ICI degrees, e.g. 'fsdp=-1,tensor=2'")
  p.add_argument("--dcn", default=None, help="DCN degrees, e.g. 'replica=2'")
  p.add_argument("--teacher_model", default=None,
                 help="distill: the frozen teacher's preset (2b, 9b, 27b) or model .gin, "
                      "when distill.teacher_config is unset and the teacher checkpoint "
                      "(which a real run reads it from) is not on this host")
  p.add_argument("--program", default=None,
                 help="compile only the programs whose name contains this")
  p.add_argument("--json", action="store_true", help="one JSON line per program too")
  args, rest = p.parse_known_args(argv)
  return args, cli.parse_flags(rest)


def degrees(text: str | None, flag: str) -> dict[str, int] | None:
  if text is None:
    return None
  out = {}
  for part in filter(None, (s.strip() for s in text.split(","))):
    axis, _, value = part.partition("=")
    try:
      out[axis.strip()] = int(value)
    except ValueError:
      raise ConfigError(f"--{flag}={text!r}: expected AXIS=DEGREE[,AXIS=DEGREE] with "
                        f"axes {', '.join(partitioning.MESH_AXES)}.") from None
  return out


def job_arguments(flags) -> tuple[str, dict]:
  """The job gin selects and its arguments: the function's defaults, then
  what gin binds (references such as @ModelConfig() evaluated)."""
  binary.register_configurables()
  cli.configure(flags, finalize=False)
  name = cli.call(gin.get_configurable("posttrain_jax.job"))
  fn = cli._registered().get(name)  # pylint: disable=protected-access
  if fn is None:
    raise ConfigError(f"Unknown job.name {name!r}; choose one of {sorted(binary.JOBS)}.")
  args = {k: v.default for k, v in inspect.signature(fn).parameters.items()
          if v.default is not inspect.Parameter.empty}
  try:
    args.update(gin.get_bindings(f"posttrain_jax.{name}"))
  except (ValueError, TypeError) as e:
    raise ConfigError(cli.strip_gin_context(str(e))) from e
  return name, args


def main(argv) -> int:
  args, flags = parse_args(argv)
  if flags.rest:
    raise ConfigError(f"Unknown arguments: {' '.join(flags.rest)}.")
  if not flags.gin_files:
    raise ConfigError("No --gin_file given; pass the run's gin files, e.g. "
                      "--gin_file=gin/experiments/lm_quickstart.gin.")
  try:
    target = topology.parse(args.topology, args.num_slices)
  except topology.TopologyError as e:
    raise ConfigError(str(e)) from e
  ici, dcn = degrees(args.ici, "ici"), degrees(args.dcn, "dcn")
  job, job_args = job_arguments(flags)
  if args.teacher_model and job_args.get("teacher_config") is None:
    from posttrain_jax.models import presets  # pylint: disable=g-import-not-at-top
    try:
      job_args["teacher_config"] = presets.load_preset(args.teacher_model)
    except ValueError as e:
      raise ConfigError(f"--teacher_model: {e}") from e
  ici = ici if ici is not None else (job_args.get("ici_parallelism") or {"data": -1})
  dcn = dcn if dcn is not None else (job_args.get("dcn_parallelism") or {})
  if target.num_slices > 1 and not dcn:
    dcn = {"replica": target.num_slices}
  # imported after the flags are checked: jax, the trainers (seconds)
  from posttrain_jax.aot import diloco_audit, plan as plan_lib, programs, report  # pylint: disable=g-import-not-at-top
  try:
    devices = topology.devices(target)
    mesh = partitioning.create_mesh(ici, dcn, devices)
    built, trainer = programs.for_job(job, job_args, mesh)
  except ValueError as e:
    raise ConfigError(f"{target}: {cli.strip_gin_context(str(e))}") from e
  mesh_shape = dict(mesh.shape)
  print(f"{job} on {target}: mesh {mesh_shape}; compiled plans, not measured runs",
        flush=True)
  plans = []
  for program in built:
    if args.program and args.program not in program.name:
      continue
    try:
      plan = plan_lib.compile_program(program, target, mesh)
    except plan_lib.DoesNotFit as e:
      raise ConfigError(f"{e} (more chips, remat, microbatches, bf16 optimizer "
                        "state)") from None
    except ValueError as e:  # e.g. a batch the mesh's batch axes do not divide
      raise ConfigError(f"{program.name} on {target}, mesh {mesh_shape}: "
                        f"{str(e).splitlines()[0]}") from e
    plans.append(plan)
    print("\n" + report.table(plan, mesh_shape), flush=True)
    if args.json:
      print(json.dumps(report.row(plan, mesh_shape)), flush=True)
  if args.program and not plans:
    raise ConfigError(f"--program={args.program!r} matches none of: "
                      + "; ".join(p.name for p in built))
  if job_args.get("diloco") is not None and target.num_slices > 1:
    print("\nStreaming DiLoCo DCN audit:")
    try:
      lines = diloco_audit.audit(trainer.traffic, plans)
    except diloco_audit.AuditError as e:
      print("\n".join(e.lines), flush=True)
      raise ConfigError(str(e)) from e
    print("\n".join(lines), flush=True)
  too_big = [p for p in plans if not p.fits]
  if too_big:
    raise ConfigError("; ".join(
        f"{p.program.name} does not fit on {target}: peak {report.gib(p.peak_bytes)} per "
        f"chip > {report.gib(p.capacity_bytes)} HBM (more chips, remat, microbatches, "
        f"bf16 optimizer state)" for p in too_big))
  return 0


if __name__ == "__main__":
  sys.argv[0] = "posttrain_jax"  # errors read as the binary's: "posttrain_jax: error: ..."
  cli.run_main(main)
