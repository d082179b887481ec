"""XManager launcher for the training binary on Cloud TPU (one or more slices).

  python launch/xm_launch.py --accelerator=v5p-256 --num_slices=2 \\
      --project=my-project --zone=us-east5-a --run_dir=gs://my-bucket/runs/x \\
      --gin_file=gin/experiments/lm_quickstart.gin \\
      --gin.train.dcn_parallelism="{'replica': 2}" --gin.NUM_STEPS=20000 \\
      --dry_run

Builds the real xmanager objects -- an `xm.Packageable` (a `PythonContainer`
of this repository, a Dockerfile, or a prebuilt image) and an `xm.JobGroup`
with one `xm.Job` per slice whose `xm.JobRequirements` name the TPU type,
topology and hosts (replicas) of the slice -- and then either launches them or,
with --dry_run, prints them as JSON without any cloud call.

Arguments for the training binary (--gin_file, --gin.NAME=VALUE,
--gin_bindings, --gin_search_paths, --module_import) are passed through in
their order, each as one list element: nothing is joined into a shell string,
so gin quoting survives byte for byte (--gin.RUN_DIR="'gs://b/run 1'",
--gin.ModelConfig.attention_pattern='("local", "global")',
--gin.train.model_config=@ModelConfig()). --run_dir=PATH adds
--gin.RUN_DIR=<PATH as a gin string>. Bindings are syntax-checked with gin's
parser, then the configuration is resolved exactly as the binary resolves it
(`python -m posttrain_jax.main ARGS --check_config` in --source, on this
machine's CPU): an unknown configurable or parameter, an ill-typed value, a
missing required setting or a binding the job never reads stops the launch (and
--dry_run) with the binary's own one line, before anything is built.
--skip_config_check skips that (e.g. when the project is not installed here);
with a prebuilt --image it is skipped (the image's code may differ).

Platforms (--platform):
  tpu_vm (default)  xmanager builds and pushes the image; a queued resource
                    with --num_slices nodes is created and every worker of
                    every slice runs the container (gcloud, argument lists).
  vertex            xmanager's Vertex AI backend (xm_local.Vertex). Its
                    open-source backend places only single-host TPU v2/v3
                    slices; other requests stop with the reason, before any
                    cloud call.

Environment of every job (see docs/launch.md for the binary's side):
  POSTTRAIN_JAX_DISTRIBUTED=auto      call jax.distributed.initialize() with
                                      no arguments (Cloud TPU auto-detection,
                                      multi-slice via the runtime's MEGASCALE_*)
  POSTTRAIN_JAX_NUM_PROCESSES=H*S     the expected jax.process_count()
(both only when the job has more than one host in total), plus --env K=V.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from binary_args import (BINARY_MODULE, ENV_DISTRIBUTED, ENV_NUM_PROCESSES, REPO,  # pylint: disable=g-import-not-at-top,wrong-import-position
                         LaunchError, bindings_of, binds, check_bindings, check_gin_files,
                         gin_string,
                         split_binary_args)
from tpu_slices import TpuSlice, parse_accelerator  # pylint: disable=g-import-not-at-top,wrong-import-position
import xm_elastic  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_BASE_IMAGE = "python:3.11"
CONTAINER_WORKDIR = "/workdir"


# ---------------------------------------------------------------------------
# xmanager objects

def import_xmanager():
  """(xm, xm_local, xm_utils), or a LaunchError that says how to install."""
  try:
    from xmanager import xm  # pylint: disable=g-import-not-at-top
    from xmanager import xm_local  # pylint: disable=g-import-not-at-top
    from xmanager.xm import utils as xm_utils  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise LaunchError(
        f"xmanager is needed to build the job ({e}). Install it with "
        "`pip install -c constraints.txt xmanager` (it is in setup.py).") from e
  return xm, xm_local, xm_utils


_TPU_VM_EXECUTOR = None


def tpu_vm_executor_class():
  """An xm.Executor for Cloud TPU VMs (queued resources)."""
  global _TPU_VM_EXECUTOR
  if _TPU_VM_EXECUTOR is None:
    import attr  # pylint: disable=g-import-not-at-top
    xm, xm_local, _ = import_xmanager()

    @attr.s(auto_attribs=True)
    class TpuVm(xm.Executor):
      """Cloud TPU VMs of a queued resource; the image is built for the cloud."""
      requirements: xm.JobRequirements
      project: str
      zone: str
      runtime_version: str
      spot: bool = False

      Spec = xm_local.VertexSpec  # packaging: xmanager's cloud build and push

    _TPU_VM_EXECUTOR = TpuVm
  return _TPU_VM_EXECUTOR


def docker_instructions(source: str) -> list[str]:
  """Dockerfile steps of the PythonContainer: install this repository + libtpu."""
  dirname = os.path.basename(os.path.normpath(source))
  return [
      "ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1",
      f"RUN mkdir -p -m 775 {CONTAINER_WORKDIR} && chown 1000:root {CONTAINER_WORKDIR}",
      f"COPY --chown=1000:root {dirname}/ {CONTAINER_WORKDIR}",
      f"WORKDIR {CONTAINER_WORKDIR}",
      'RUN python -m pip install --no-cache-dir -c constraints.txt -e . "jax[tpu]"',
  ]


@dataclasses.dataclass
class Plan:
  """Everything a launch needs; `spec` is what --dry_run prints."""
  opts: argparse.Namespace
  tpu: TpuSlice
  binary_args: list[str]  # as given (before --run_dir is added)
  env: dict[str, str]
  packageable: Any
  job_group: Any
  spec: dict[str, Any]
  notes: list[str]


def _jsonable(obj):
  """JSON view of xmanager objects (attrs classes, enums, topologies)."""
  import attr  # pylint: disable=g-import-not-at-top
  if isinstance(obj, enum.Enum):  # before int: proto enums are IntEnums
    return obj.name
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if type(obj).__name__ == "SequentialArgs":
    _, _, xm_utils = import_xmanager()
    return obj.to_list(xm_utils.ARGV_ESCAPER)
  if isinstance(obj, tuple) and hasattr(obj, "_asdict"):  # ModuleName, CommandList
    return {"type": type(obj).__name__, **_jsonable(obj._asdict())}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if attr.has(type(obj)):
    out = {"type": type(obj).__name__}
    for field in attr.fields(type(obj)):
      out[field.name] = _jsonable(getattr(obj, field.name))
    return out
  if type(obj).__name__ == "Topology":
    return obj.name
  return str(obj)


def requirements_json(req) -> dict[str, Any]:
  return {"repr": repr(req), "accelerator": str(req.accelerator),
          "topology": req.topology.name if req.topology else None,
          "quantity": req.task_requirements[req.accelerator],
          "replicas": req.replicas, "num_slices": req.num_slices,
          "service_tier": req.service_tier.name, "location": req.location}


def job_args(job) -> list[str]:
  """The container's argv after the entrypoint, as xmanager's backends pass it."""
  xm, _, xm_utils = import_xmanager()
  return xm.merge_args(job.executable.args, job.args).to_list(xm_utils.ARGV_ESCAPER)


def job_env(job) -> dict[str, str]:
  return {**job.executable.env_vars, **job.env_vars}


def job_json(job) -> dict[str, Any]:
  executor = {"type": type(job.executor).__name__,
              "requirements": requirements_json(job.executor.requirements)}
  for key, value in _jsonable(job.executor).items():
    if key not in ("type", "requirements"):
      executor[key] = value
  return {"name": job.name, "executor": executor,
          "image": job.executable.image_path, "args": job_args(job),
          "env_vars": job_env(job)}


def build_job_group(executable, make_executor, num_slices: int,
                    args: Sequence[str], env: Mapping[str, str]):
  """One xm.Job per slice (xm.JobRequirements refuses num_slices > 1 for TPUs)."""
  xm, _, _ = import_xmanager()
  jobs = {}
  for s in range(num_slices):
    name = f"slice_{s}"
    jobs[name] = xm.Job(executable=executable, executor=make_executor(),
                        name=name, args=list(args), env_vars=dict(env))
  return xm.JobGroup(**jobs)


def image_registry(image: str) -> str:
  first = image.split("/", 1)[0]
  return first if ("." in first or ":" in first or first == "localhost") else "docker.io"


def tpu_vm_commands(name: str, job, num_slices: int, tpu: TpuSlice,
                    container_name: str) -> dict[str, Any]:
  """gcloud argv lists: create the queued resource, wait, run on all workers."""
  executor = job.executor
  where = ["--project", executor.project, "--zone", executor.zone]
  create = ["gcloud", "compute", "tpus", "queued-resources", "create", name,
            "--accelerator-type", tpu.accelerator_type,
            "--runtime-version", executor.runtime_version, *where]
  if num_slices > 1:
    create += ["--node-count", str(num_slices), "--node-prefix", name]
  else:
    create += ["--node-id", name]
  if executor.spot:
    create.append("--spot")
  describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", name,
              *where, "--format=value(state.state)"]
  image = job.executable.image_path
  docker = ["sudo", "docker", "run", "--detach", "--name", container_name,
            "--privileged", "--network=host"]
  for key, value in job_env(job).items():
    docker += ["--env", f"{key}={value}"]
  docker += [image, *job_args(job)]
  remote = " && ".join([
      shlex.join(["sudo", "gcloud", "auth", "configure-docker",
                  image_registry(image), "--quiet"]),
      "(" + shlex.join(["sudo", "docker", "rm", "--force", container_name])
      + " >/dev/null 2>&1 || true)",
      shlex.join(docker),
  ])
  run = ["gcloud", "compute", "tpus", "queued-resources", "ssh", name, *where,
         "--node=all", "--worker=all", "--command", remote]
  logs = ["gcloud", "compute", "tpus", "queued-resources", "ssh", name, *where,
          "--node=all", "--worker=all", "--command",
          shlex.join(["sudo", "docker", "logs", "--tail", "20",
                      container_name])]
  return {"create": create, "wait_until_active": describe, "run": run,
          "remote_command": remote, "docker_run": docker, "logs": logs}


def vertex_blockers(job, tpu: TpuSlice, num_slices: int) -> list[str]:
  """Why xmanager's Vertex backend cannot place this job (empty: it can)."""
  reasons = []
  try:
    from xmanager.cloud import vertex  # pylint: disable=g-import-not-at-top
    vertex.get_machine_spec(job)
  except ImportError as e:
    reasons.append(f"xmanager's Vertex backend does not import ({e})")
  except (KeyError, ValueError) as e:
    reasons.append(f"xmanager's Vertex backend has no machine for "
                   f"{tpu.resource.upper()} ({type(e).__name__}: {e}); it maps "
                   "only TPU_V2 and TPU_V3")
  if tpu.hosts > 1:
    reasons.append(f"{tpu.accelerator_type} has {tpu.hosts} hosts, and "
                   "xmanager's Vertex backend refuses replicas > 1 in the first "
                   "worker pool")
  if num_slices > 1:
    reasons.append("xm.JobRequirements refuses num_slices > 1 for TPUs and "
                   "the Vertex backend has no multi-slice TPU job")
  return reasons


ERROR_PREFIX = "posttrain_jax: error: "


def run_check_config(binary_args: Sequence[str], source: str) -> tuple[int, str]:
  """(exit status, stderr) of `python -m posttrain_jax.main ARGS --check_config`
  in `source`: the binary's own resolution, on CPU, without jax.distributed."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("POSTTRAIN_JAX_")}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-m", BINARY_MODULE, *binary_args, "--check_config"],
                        cwd=source, env=env, capture_output=True, text=True, timeout=600)
  return proc.returncode, proc.stderr


def check_configuration(binary_args: Sequence[str], source: str) -> None:
  """Raises LaunchError with the binary's one-line error when it would refuse
  this configuration (module docstring)."""
  code, stderr = run_check_config(binary_args, source)
  if code == 0:
    return
  errors = [l[len(ERROR_PREFIX):] for l in stderr.splitlines() if l.startswith(ERROR_PREFIX)]
  if errors:
    raise LaunchError(f"the binary refuses this configuration: {errors[-1]}")
  last = (stderr.strip().splitlines() or [f"exit status {code}"])[-1]
  if "ModuleNotFoundError" in last or "ImportError" in last:
    raise LaunchError(f"cannot resolve the configuration here ({last}): install the "
                      "project (pip install -e .) or pass --skip_config_check.")
  raise LaunchError(f"resolving the configuration failed (exit status {code}): {last}")


def make_plan(opts: argparse.Namespace, binary_args: list[str],
              executable=None) -> Plan:
  """Builds the packageable, job group and JSON spec (no cloud call).

  `executable` is the result of experiment.package() in a real launch; a dry
  run uses the image that packaging is told to push (--image_tag) or the
  prebuilt --image, in the same executable type xmanager's packager returns.
  """
  notes = []
  tpu = parse_accelerator(opts.accelerator, opts.topology)
  user_args = list(binary_args)
  if opts.num_slices < 1:
    raise LaunchError("--num_slices must be >= 1.")
  check_bindings(binary_args)
  if opts.run_dir:
    if binds(binary_args, "RUN_DIR"):
      raise LaunchError("--run_dir and a RUN_DIR binding both given; use one.")
    binary_args = [*binary_args, f"--gin.RUN_DIR={gin_string(opts.run_dir)}"]
  if not opts.image:
    check_gin_files(binary_args, opts.source)
  if not any(a.startswith("--gin_file=") for a in binary_args):
    raise LaunchError("no --gin_file given; e.g. "
                      "--gin_file=gin/experiments/quickstart.gin.")
  if not opts.image and not opts.skip_config_check:
    check_configuration(binary_args, opts.source)
  if opts.elastic:
    xm_elastic.check(opts.num_slices, tpu.hosts, tpu.accelerator_type, opts.platform,
                     binary_args)
  processes = tpu.hosts * (1 if opts.elastic else opts.num_slices)
  if opts.num_slices > 1 and not opts.elastic and not any(
      re.search(r"dcn_parallelism\s*=", b) for _, b in bindings_of(binary_args)):
    notes.append(f"{opts.num_slices} slices: make sure train.dcn_parallelism "
                 f"multiplies to {opts.num_slices} (e.g. --gin.train."
                 f"dcn_parallelism=\"{{'replica': {opts.num_slices}}}\"), or "
                 "the slices are treated as one ICI mesh.")

  env: dict[str, str] = {}
  if processes > 1:
    env[ENV_DISTRIBUTED] = "auto"
    env[ENV_NUM_PROCESSES] = str(processes)
  for item in opts.env:
    key, eq, value = item.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise LaunchError(f"--env={item!r}: expected NAME=VALUE.")
    env[key] = value

  if opts.platform == "tpu_vm":
    if not (opts.project and opts.zone):
      raise LaunchError("--platform=tpu_vm needs --project and --zone.")
  xm, xm_local, _ = import_xmanager()
  push_tag = opts.image_tag
  if not push_tag and not opts.image and opts.project:
    push_tag = f"gcr.io/{opts.project}/posttrain_jax:{opts.name}"
  executor_spec = xm_local.Vertex.Spec(push_image_tag=push_tag)
  if opts.image:
    packageable = xm.container(executor_spec=executor_spec, image_path=opts.image)
  elif opts.dockerfile:
    packageable = xm.dockerfile_container(
        executor_spec=executor_spec, path=opts.source,
        dockerfile=os.path.abspath(opts.dockerfile))
  else:
    packageable = xm.python_container(
        executor_spec=executor_spec, entrypoint=xm.ModuleName(BINARY_MODULE),
        path=opts.source, base_image=opts.base_image,
        docker_instructions=docker_instructions(opts.source))

  if executable is None:
    image = opts.image or push_tag
    if not image:
      raise LaunchError("give --image_tag (where the built image is pushed), "
                        "--project, or a prebuilt --image.")
    from xmanager.xm_local import executables as local_executables  # pylint: disable=g-import-not-at-top
    executable = local_executables.GoogleContainerRegistryImage(
        name=packageable.executable_spec.name, image_path=image)

  requirements = lambda: xm.JobRequirements(  # pylint: disable=g-long-lambda
      {tpu.resource: xm.Topology(tpu.topology)}, replicas=tpu.hosts)
  if opts.platform == "tpu_vm":
    tpu_vm = tpu_vm_executor_class()
    make_executor = lambda: tpu_vm(  # pylint: disable=g-long-lambda
        requirements=requirements(), project=opts.project, zone=opts.zone,
        runtime_version=opts.runtime_version or tpu.runtime_version,
        spot=opts.spot)
  else:
    # Vertex AI counts TPU v2/v3 accelerators in cores (8 for a v3-8).
    make_executor = lambda: xm_local.Vertex(  # pylint: disable=g-long-lambda
        requirements=xm.JobRequirements({tpu.resource: tpu.cores},
                                        replicas=tpu.hosts))
  if opts.elastic:
    job_group = xm_elastic.build_job_group(xm, executable, make_executor, opts,
                                           binary_args, env)
  else:
    job_group = build_job_group(executable, make_executor, opts.num_slices,
                                binary_args, env)
  jobs = list(job_group.jobs.values())

  spec: dict[str, Any] = {
      "name": opts.name,
      "platform": opts.platform,
      "accelerator": {**tpu.as_json(), "num_slices": opts.num_slices,
                      "total_chips": tpu.chips * opts.num_slices,
                      "total_processes": processes},
      "binary": {"module": BINARY_MODULE, "args": list(binary_args)},
      "packageable": _jsonable(packageable),
      "executable": _jsonable(executable),
      "job_group": {key: job_json(job) for key, job in job_group.jobs.items()},
  }
  if opts.elastic:
    spec["elastic"] = {"lighthouse": xm_elastic.lighthouse_address(opts),
                       "slices": opts.num_slices}
    spec["tpu_vm"] = xm_elastic.tpu_vm_commands(opts.name, job_group.jobs, tpu,
                                                opts.container_name, tpu_vm_commands)
  elif opts.platform == "tpu_vm":
    spec["tpu_vm"] = tpu_vm_commands(opts.name, jobs[0], opts.num_slices, tpu,
                                     opts.container_name)
  else:
    blockers = vertex_blockers(jobs[0], tpu, opts.num_slices)
    if blockers:
      raise LaunchError(
          f"--platform=vertex cannot run {tpu.accelerator_type} x "
          f"{opts.num_slices}: " + "; ".join(blockers)
          + ". Use --platform=tpu_vm.")
    from xmanager.cloud import vertex  # pylint: disable=g-import-not-at-top
    spec["vertex"] = {"worker_pools": [
        {"job": job.name, "machine_spec": _jsonable(vertex.get_machine_spec(job)),
         "replica_count": job.executor.requirements.replicas,
         "image_uri": job.executable.image_path, "args": job_args(job),
         "env": [{"name": k, "value": v} for k, v in job_env(job).items()]}
        for job in jobs]}
  spec["notes"] = notes
  return Plan(opts, tpu, user_args, env, packageable, job_group, spec, notes)


# ---------------------------------------------------------------------------
# Launch

def _run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
  print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
  return subprocess.run(list(argv), check=True, **kwargs)


def _wait_active(describe: Sequence[str], timeout: float, every: float = 30.0):
  deadline = time.monotonic() + timeout
  while True:
    state = subprocess.run(list(describe), check=True, capture_output=True,
                           text=True).stdout.strip()
    print(f"queued resource: {state}", file=sys.stderr, flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDING", "SUSPENDED"):
      raise LaunchError(f"the queued resource is {state}.")
    if time.monotonic() > deadline:
      raise LaunchError(f"the queued resource is still {state} after "
                        f"{timeout:g}s; it stays queued (delete it with "
                        "gcloud compute tpus queued-resources delete).")
    time.sleep(every)


def launch(plan: Plan) -> None:
  """Packages with xmanager, then starts the jobs (cloud calls)."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS.mark_as_parsed()
  from xmanager import xm_flags  # pylint: disable=g-import-not-at-top
  if xm_flags.WRAP_LATE_BINDINGS.value:
    raise LaunchError("--xm_wrap_late_bindings word-splits container "
                      "arguments; it must stay off.")
  _, xm_local, _ = import_xmanager()
  opts = plan.opts
  with xm_local.create_experiment(experiment_title=opts.name) as experiment:
    if opts.image and opts.platform == "tpu_vm":
      executable = None  # the TPU VMs pull the prebuilt image themselves
    else:
      [executable] = experiment.package([plan.packageable])
    plan = make_plan(opts, plan.binary_args, executable)
    if opts.platform == "vertex":
      experiment.add(plan.job_group)
      return
    commands = plan.spec["tpu_vm"]
    if opts.elastic:
      xm_elastic.launch(commands, _run, _wait_active, opts.provision_timeout)
      return
    _run(commands["create"])
    _wait_active(commands["wait_until_active"], opts.provision_timeout)
    _run(commands["run"])
    print("started; follow the logs with:\n  " + shlex.join(commands["logs"]),
          file=sys.stderr)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  own, binary = split_binary_args(argv)
  p = argparse.ArgumentParser(
      prog="launch/xm_launch.py",
      description="Launch posttrain_jax.main on Cloud TPU with xmanager.",
      epilog="Training-binary arguments (--gin_file, --gin.NAME=VALUE, "
             "--gin_bindings, --gin_search_paths, --module_import) are passed "
             "through unchanged, in order.")
  p.add_argument("--accelerator", required=True,
                 help="Cloud TPU type of one slice, e.g. v5p-256, v5litepod-16")
  p.add_argument("--topology", default=None,
                 help="slice topology, e.g. 4x4x8 (default: the standard one)")
  p.add_argument("--num_slices", type=int, default=1,
                 help="slices connected over DCN (multi-slice)")
  p.add_argument("--run_dir", default=None,
                 help="run directory; becomes --gin.RUN_DIR=<quoted>")
  p.add_argument("--name", default=None,
                 help="experiment / queued-resource name")
  p.add_argument("--platform", choices=("tpu_vm", "vertex"), default="tpu_vm")
  p.add_argument("--project", default=None)
  p.add_argument("--zone", default=None)
  p.add_argument("--runtime_version", default=None,
                 help="TPU VM software version (default per TPU type)")
  p.add_argument("--spot", action="store_true", help="Spot TPU VMs")
  p.add_argument("--provision_timeout", type=float, default=3600.0,
                 help="seconds to wait for the queued resource")
  p.add_argument("--container_name", default="posttrain_jax")
  g = p.add_argument_group("image")
  g.add_argument("--image", default=None,
                 help="prebuilt image whose entrypoint runs the binary")
  g.add_argument("--dockerfile", default=None,
                 help="build this Dockerfile (context: --source)")
  g.add_argument("--source", default=REPO,
                 help="directory packaged into the image (default: this repo)")
  g.add_argument("--base_image", default=DEFAULT_BASE_IMAGE)
  g.add_argument("--image_tag", default=None,
                 help="where the built image is pushed (default "
                      "gcr.io/PROJECT/posttrain_jax:NAME)")
  e = p.add_argument_group("elastic DiLoCo (launch/xm_elastic.py)")
  e.add_argument("--elastic", action="store_true",
                 help="one job per slice (elastic_diloco) + torchft's Lighthouse")
  e.add_argument("--elastic_lighthouse", default=None,
                 help="address of a Lighthouse you run (default: a lighthouse job "
                      "on slice 0 worker 0)")
  e.add_argument("--elastic_port", type=int, default=29510)
  p.add_argument("--env", action="append", default=[],
                 help="extra NAME=VALUE for the jobs' environment (repeatable)")
  p.add_argument("--dry_run", action="store_true",
                 help="print the job specification as JSON; no cloud call")
  p.add_argument("--skip_config_check", action="store_true",
                 help="do not resolve the configuration with the binary first")
  opts = p.parse_args(own)
  opts.source = os.path.abspath(opts.source)
  if opts.image and opts.dockerfile:
    raise LaunchError("--image and --dockerfile exclude each other.")
  if not opts.name:
    accel = re.sub(r"[^a-z0-9-]", "-", opts.accelerator.lower())
    opts.name = f"posttrain-{accel}-{time.strftime('%Y%m%d-%H%M%S')}"
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", opts.name):
    raise LaunchError(f"--name={opts.name!r}: use lowercase letters, digits "
                      "and '-', starting with a letter (Cloud resource names).")
  return opts, binary


def main(argv: Sequence[str] | None = None) -> int:
  try:
    opts, binary_args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = make_plan(opts, binary_args)
    for note in plan.notes:
      print(f"xm_launch: note: {note}", file=sys.stderr)
    if opts.dry_run:
      print(json.dumps(plan.spec, indent=2, ensure_ascii=False))
      return 0
    launch(plan)
  except LaunchError as e:
    print(f"xm_launch: error: {e}", file=sys.stderr)
    return 2
  except subprocess.CalledProcessError as e:
    print(f"xm_launch: error: {shlex.join(e.cmd)} exited with {e.returncode}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
