"""The multi-job form of launch/xm_launch.py: elastic Streaming DiLoCo.

  python launch/xm_launch.py --elastic --accelerator=v5litepod-8 --num_slices=3 \\
      --project=my-project --zone=us-west4-a --run_dir=gs://my-bucket/runs/e \\
      --gin_file=gin/experiments/elastic_diloco/lm.gin --dry_run

Where the SPMD form makes one multi-slice queued resource whose slices form one
JAX job (the runtime joins them over DCN), the elastic form makes one job per
slice -- its own queued resource `NAME-s<i>`, its own JAX job, so it can die
and be started again alone -- plus the quorum service (torchft's Lighthouse,
the binary's `elastic_lighthouse` job):

  lighthouse   --gin.job.name='elastic_lighthouse' on worker 0 of slice 0
               (--elastic_lighthouse=http://HOST:PORT uses a service you run
               instead, and no lighthouse job is made);
  slice_<i>    the gin's `elastic_diloco` job with slice_index = i, num_slices
               = DiLoCoConfig.num_replicas = N, the Lighthouse's address and
               peer_host '0.0.0.0' (the gRPC exchange listens on every
               interface; its address reaches the other slices through the
               Lighthouse).

The co-located Lighthouse's address is slice 0 worker 0's internal IP, known
only once that VM exists: the slices' argument carries the placeholder
LIGHTHOUSE_HOST (printed so by --dry_run), which the launch replaces with the
IP that `gcloud compute tpus tpu-vm describe` reports.

Limits (each stops the launch with its reason): a slice must have one host
(the elastic job runs one process per slice; multi-host slices, each host
exchanging its shard with the same-rank hosts of the other slices, are not
built), and only --platform=tpu_vm.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from typing import Any

from binary_args import LaunchError, binds, gin_string  # pylint: disable=g-import-not-at-top

PLACEHOLDER = "LIGHTHOUSE_HOST"


def check(num_slices: int, hosts: int, accelerator: str, platform: str,
          binary_args: Sequence[str]) -> None:
  """Raises LaunchError naming why this elastic launch cannot be made."""
  if platform != "tpu_vm":
    raise LaunchError("--elastic runs on --platform=tpu_vm only (one queued resource "
                      "per slice).")
  if num_slices < 2:
    raise LaunchError("--elastic needs --num_slices >= 2 (one job per slice).")
  if hosts > 1:
    raise LaunchError(f"--elastic: {accelerator} has {hosts} hosts per slice, and the "
                      "elastic_diloco job runs one process per slice (multi-host slices "
                      "are not built yet); pick a single-host type, e.g. v5litepod-8.")
  for name in ("elastic_diloco.slice_index", "elastic_diloco.num_slices",
               "elastic_diloco.lighthouse"):
    if binds(binary_args, name):
      raise LaunchError(f"--elastic sets {name} per slice; remove that binding.")


def lighthouse_address(opts) -> str:
  return opts.elastic_lighthouse or f"http://{PLACEHOLDER}:{opts.elastic_port}"


def slice_args(binary_args: Sequence[str], s: int, n: int, address: str) -> list[str]:
  """The binary arguments of slice s of n."""
  return [*binary_args, "--gin.job.name='elastic_diloco'",
          f"--gin.elastic_diloco.slice_index={s}", f"--gin.elastic_diloco.num_slices={n}",
          f"--gin.DiLoCoConfig.num_replicas={n}",
          f"--gin.elastic_diloco.lighthouse={gin_string(address)}",
          "--gin.elastic_diloco.peer_host='0.0.0.0'"]


def lighthouse_args(binary_args: Sequence[str], port: int) -> list[str]:
  return [*binary_args, "--gin.job.name='elastic_lighthouse'",
          f"--gin.elastic_lighthouse.bind={gin_string(f'[::]:{port}')}"]


def build_job_group(xm, executable, make_executor, opts, binary_args, env):
  """xm.JobGroup: slice_<i> per slice (+ lighthouse unless --elastic_lighthouse)."""
  address = lighthouse_address(opts)
  jobs = {}
  if not opts.elastic_lighthouse:
    jobs["lighthouse"] = xm.Job(executable=executable, executor=make_executor(),
                                name="lighthouse",
                                args=lighthouse_args(binary_args, opts.elastic_port),
                                env_vars=dict(env))
  for s in range(opts.num_slices):
    jobs[f"slice_{s}"] = xm.Job(executable=executable, executor=make_executor(),
                                name=f"slice_{s}",
                                args=slice_args(binary_args, s, opts.num_slices, address),
                                env_vars=dict(env))
  return xm.JobGroup(**jobs)


def tpu_vm_commands(name: str, jobs: dict, tpu, container_name: str,
                    per_slice) -> dict[str, Any]:
  """gcloud argv lists per slice (per_slice = xm_launch.tpu_vm_commands for one
  node), the Lighthouse's run on slice 0 worker 0 and the IP lookup."""
  slices = {}
  for key, job in jobs.items():
    if key.startswith("slice_"):
      s = int(key.split("_")[1])
      slices[key] = per_slice(f"{name}-s{s}", job, 1, tpu, container_name)
  out: dict[str, Any] = {"slices": slices}
  if "lighthouse" in jobs:
    c = per_slice(f"{name}-s0", jobs["lighthouse"], 1, tpu, f"{container_name}-lighthouse")
    run = list(c["run"])
    run[run.index("--worker=all")] = "--worker=0"
    executor = jobs["lighthouse"].executor
    out["lighthouse"] = {
        "run": run, "docker_run": c["docker_run"],
        "address_lookup": ["gcloud", "compute", "tpus", "tpu-vm", "describe",
                           f"{name}-s0", "--project", executor.project, "--zone",
                           executor.zone, "--format=value(networkEndpoints[0].ipAddress)"]}
  return out


def launch(commands: dict[str, Any], run, wait_active, provision_timeout: float) -> None:
  """Creates every slice's queued resource, starts the Lighthouse (if co-located)
  and fills its address into each slice's command, then starts the slices."""
  slices = commands["slices"]
  for c in slices.values():
    run(c["create"])
  for c in slices.values():
    wait_active(c["wait_until_active"], provision_timeout)
  host = None
  if "lighthouse" in commands:
    run(commands["lighthouse"]["run"])
    host = subprocess.run(commands["lighthouse"]["address_lookup"], check=True,
                          capture_output=True, text=True).stdout.strip()
    if not host:
      raise LaunchError("could not read slice 0 worker 0's IP for the Lighthouse.")
  for key, c in slices.items():
    argv = [a.replace(PLACEHOLDER, host) if host else a for a in c["run"]]
    run(argv)
    print(f"{key} started; logs: " + shlex.join(c["logs"]))
