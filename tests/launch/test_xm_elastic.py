"""launch/xm_elastic.py through launch/xm_launch.py --elastic: one job per
slice plus the Lighthouse, each slice's gin arguments naming its index, the
slice count and the Lighthouse; what cannot be launched is refused."""

import json
import os
import shlex

import gin
import pytest

from posttrain_jax import cli, main
from posttrain_jax.diloco import streaming_diloco as sd

from test_xm_launch import (REPO, config_check_in_process,  # pylint: disable=g-bad-import-order,unused-import
                            xm_launch)

GIN = "--gin_file=gin/experiments/elastic_diloco/lm.gin"
BASE = ("--project=my-proj", "--zone=us-west4-a", "--name=el", "--elastic",
        "--accelerator=v5litepod-8")


def _dry_run(capsys, *args):
  code = xm_launch.main([*BASE, *args, "--dry_run"])
  out, err = capsys.readouterr()
  assert code == 0, err
  return json.loads(out)


def _configured(args):
  """(slice_index, num_slices, lighthouse, num_replicas, job) gin reads from args."""
  main.register_configurables()
  gin.clear_config()
  cwd = os.getcwd()
  try:
    os.chdir(REPO)
    cli.configure(cli.parse_flags(args))
    return (gin.query_parameter("elastic_diloco.slice_index"),
            gin.query_parameter("elastic_diloco.num_slices"),
            gin.query_parameter("elastic_diloco.lighthouse"),
            gin.get_configurable(sd.DiLoCoConfig)().num_replicas,
            gin.query_parameter("job.name"))
  finally:
    os.chdir(cwd)
    gin.clear_config()


def test_one_job_per_slice_plus_the_lighthouse(capsys):
  spec = _dry_run(capsys, "--num_slices=3", GIN, "--gin.NUM_STEPS=50")
  jobs = spec["job_group"]
  assert sorted(jobs) == ["lighthouse", "slice_0", "slice_1", "slice_2"]
  assert spec["accelerator"]["total_processes"] == 1  # each slice its own JAX job
  for s in range(3):
    args = [a.replace("LIGHTHOUSE_HOST", "10.1.2.3") for a in jobs[f"slice_{s}"]["args"]]
    assert _configured(args) == (s, 3, "http://10.1.2.3:29510", 3, "elastic_diloco")
    assert "POSTTRAIN_JAX_DISTRIBUTED" not in jobs[f"slice_{s}"]["env_vars"]
  assert "--gin.job.name='elastic_lighthouse'" in jobs["lighthouse"]["args"]
  # one queued resource per slice (restartable alone), each on one node
  tpu = spec["tpu_vm"]
  for s in range(3):
    create = tpu["slices"][f"slice_{s}"]["create"]
    assert create[create.index("create") + 1] == f"el-s{s}"
    assert "--node-count" not in create
    remote = tpu["slices"][f"slice_{s}"]["run"][-1]
    assert f"--gin.elastic_diloco.slice_index={s}" in shlex.split(remote)
  lighthouse = tpu["lighthouse"]
  assert "--worker=0" in lighthouse["run"] and "el-s0" in lighthouse["run"]
  assert lighthouse["address_lookup"][:5] == ["gcloud", "compute", "tpus", "tpu-vm",
                                              "describe"]


def test_an_external_lighthouse_makes_no_lighthouse_job(capsys):
  spec = _dry_run(capsys, "--num_slices=2", GIN,
                  "--elastic_lighthouse=http://lh.internal:4000")
  assert sorted(spec["job_group"]) == ["slice_0", "slice_1"]
  assert "lighthouse" not in spec["tpu_vm"]
  args = spec["job_group"]["slice_1"]["args"]
  assert _configured(args)[:3] == (1, 2, "http://lh.internal:4000")


def test_launch_fills_in_the_lighthouse_ip(monkeypatch):
  import xm_elastic  # pylint: disable=g-import-not-at-top
  ran = []
  commands = {"slices": {f"slice_{s}": {
      "create": ["create", str(s)], "wait_until_active": ["describe", str(s)],
      "run": ["ssh", f"run --gin.elastic_diloco.lighthouse='http://LIGHTHOUSE_HOST:1'"],
      "logs": ["logs"]} for s in range(2)},
              "lighthouse": {"run": ["ssh", "lighthouse"], "address_lookup": ["ip"]}}

  class Done:
    stdout = "10.9.8.7\n"
  monkeypatch.setattr(xm_elastic.subprocess, "run", lambda *a, **k: Done())
  xm_elastic.launch(commands, ran.append, lambda *a: ran.append(["waited"]), 1.0)
  assert ran[:5] == [["create", "0"], ["create", "1"], ["waited"], ["waited"],
                     ["ssh", "lighthouse"]]
  assert ran[5:] == [["ssh", "run --gin.elastic_diloco.lighthouse='http://10.9.8.7:1'"]] * 2


@pytest.mark.parametrize("args,message", [
    (("--accelerator=v5p-16", "--num_slices=2"), "one process per slice"),
    (("--num_slices=1",), "--num_slices >= 2"),
    (("--num_slices=2", "--platform=vertex"), "tpu_vm only"),
    (("--num_slices=2", "--gin.elastic_diloco.slice_index=1"), "remove that binding"),
])
def test_what_cannot_be_launched_is_refused(capsys, args, message):
  code = xm_launch.main([*BASE, GIN, *args, "--dry_run"])
  _, err = capsys.readouterr()
  assert code == 2 and message in err, err
