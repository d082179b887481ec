"""launch/xm_launch.py: the dry-run job specification carries what is launched."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from posttrain_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "launch", "xm_launch.py")


def _load():
  spec = importlib.util.spec_from_file_location("xm_launch", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


xm_launch = _load()
_RUN_CHECK_CONFIG = xm_launch.run_check_config  # the real one: a subprocess of the binary


def check_config_in_process(binary_args, source):
  """run_check_config without the process boundary (a binary start per dry run
  would cost seconds each): the binary's main() with --check_config, here."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from posttrain_jax import main as binary  # pylint: disable=g-import-not-at-top
  err, cwd = io.StringIO(), os.getcwd()
  gin.clear_config()
  os.chdir(source)
  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
      try:
        return binary.main([*binary_args, "--check_config"]), err.getvalue()
      except cli.ConfigError as e:
        return 2, err.getvalue() + f"posttrain_jax: error: {e}\n"
  finally:
    os.chdir(cwd)
    gin.clear_config()


@pytest.fixture(autouse=True)
def config_check_in_process(monkeypatch):
  monkeypatch.setattr(xm_launch, "run_check_config", check_config_in_process)

# Gin values as a shell user types them, after the shell has removed its own
# quotes: each must reach the container unchanged.
RUN_DIR = "--gin.RUN_DIR='gs://b/run 1'"
TUPLE = '--gin.ModelConfig.attention_pattern=("local", "global")'
REFERENCE = "--gin.train.model_config=@ModelConfig()"
DICT = "--gin.train.dcn_parallelism={'replica': 2}"
NASTY = "gs://b/it's \"q\" $HOME \\n `x` é"  # quotes, $, backslash, backquote


def _dry_run(capsys, *args, base=("--project=my-proj", "--zone=us-east5-a",
                                  "--name=qs-v5p")):
  code = xm_launch.main([*base, *args, "--dry_run"])
  out, err = capsys.readouterr()
  assert code == 0, err
  return json.loads(out), err


def test_multislice_spec_carries_accelerator_slices_and_gin_args(capsys):
  user_args = ["--gin_file=gin/experiments/lm_quickstart.gin", TUPLE, REFERENCE,
               DICT, "--gin_file", "models/gemma2_tiny.gin", RUN_DIR,
               "--gin.NUM_STEPS=20"]
  spec, _ = _dry_run(capsys, "--accelerator=v5p-256", "--num_slices=2",
                     *user_args)
  expected_args = ["--gin_file=gin/experiments/lm_quickstart.gin", TUPLE, REFERENCE,
                   DICT, "--gin_file=models/gemma2_tiny.gin", RUN_DIR,
                   "--gin.NUM_STEPS=20"]
  acc = spec["accelerator"]
  assert (acc["accelerator_type"], acc["topology"], acc["chips"], acc["hosts"]) == (
      "v5p-256", "4x4x8", 128, 32)
  assert (acc["num_slices"], acc["total_chips"], acc["total_processes"]) == (2, 256, 64)
  assert sorted(spec["job_group"]) == ["slice_0", "slice_1"]
  for job in spec["job_group"].values():
    req = job["executor"]["requirements"]
    assert (req["accelerator"], req["topology"], req["replicas"]) == (
        "TPU_V5P", "4x4x8", 32)
    assert job["executor"]["type"] == "TpuVm"
    assert job["args"] == expected_args  # byte-identical, same order
    assert job["env_vars"] == {"POSTTRAIN_JAX_DISTRIBUTED": "auto",
                               "POSTTRAIN_JAX_NUM_PROCESSES": "64"}
    assert job["image"] == "gcr.io/my-proj/posttrain_jax:qs-v5p"
  assert spec["packageable"]["executable_spec"]["type"] == "PythonContainer"
  assert spec["packageable"]["executable_spec"]["entrypoint"] == {
      "type": "ModuleName", "module_name": "posttrain_jax.main"}
  assert spec["packageable"]["executor_spec"]["push_image_tag"] == (
      "gcr.io/my-proj/posttrain_jax:qs-v5p")

  # The binary's own flag parser sees the same files and bindings.
  flags = cli.parse_flags(expected_args)
  assert flags.gin_files == ["gin/experiments/lm_quickstart.gin", "models/gemma2_tiny.gin"]
  assert flags.bindings == [
      'ModelConfig.attention_pattern = ("local", "global")',
      "train.model_config = @ModelConfig()",
      "train.dcn_parallelism = {'replica': 2}",
      "RUN_DIR = 'gs://b/run 1'", "NUM_STEPS = 20"]

  # The TPU VM command line: one queued resource with two nodes, and a remote
  # shell command that splits back into exactly the container's arguments.
  tpu_vm = spec["tpu_vm"]
  create = tpu_vm["create"]
  assert create[create.index("--accelerator-type") + 1] == "v5p-256"
  assert create[create.index("--node-count") + 1] == "2"
  remote = tpu_vm["run"][tpu_vm["run"].index("--command") + 1]
  docker = shlex.split(remote.rsplit(" && ", 1)[1])
  assert docker == tpu_vm["docker_run"]
  assert docker[-len(expected_args):] == expected_args
  assert docker[-len(expected_args) - 1] == "gcr.io/my-proj/posttrain_jax:qs-v5p"


def test_run_dir_becomes_a_gin_string_that_parses_back(capsys):
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  spec, _ = _dry_run(capsys, "--accelerator=v5p-8", f"--run_dir={NASTY}",
                     "--gin_file=gin/experiments/lm_quickstart.gin")
  args = spec["job_group"]["slice_0"]["args"]
  assert args[0] == "--gin_file=gin/experiments/lm_quickstart.gin"
  [binding] = cli.parse_flags(args).bindings
  [statement] = config_parser.ConfigParser(
      binding, gin_config.ParserDelegate(skip_unknown=True))
  assert statement.value == NASTY
  remote = spec["tpu_vm"]["remote_command"]
  assert shlex.split(remote.rsplit(" && ", 1)[1])[-1] == args[-1]
  # one host, one slice: no distributed environment
  assert spec["accelerator"]["hosts"] == 1
  assert spec["job_group"]["slice_0"]["env_vars"] == {}
  assert spec["tpu_vm"]["create"][-2:] == ["--node-id", "qs-v5p"]


def test_cli_dry_run_from_another_directory(tmp_path):
  args = [sys.executable, SCRIPT, "--accelerator=v4-32", "--num_slices=3",
          "--project=p", "--zone=z", "--name=cli-test", "--image=us-docker.pkg.dev/p/r/img:1",
          "--gin_file=gin/experiments/lm_quickstart.gin", RUN_DIR, TUPLE, REFERENCE,
          "--env=EXTRA=a b", "--dry_run"]
  proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  spec = json.loads(proc.stdout)
  assert "dcn_parallelism" in proc.stderr  # 3 slices and no DCN binding: a note
  assert spec["accelerator"]["topology"] == "2x2x4"
  assert spec["accelerator"]["hosts"] == 4
  assert len(spec["job_group"]) == 3
  job = spec["job_group"]["slice_2"]
  assert job["args"] == ["--gin_file=gin/experiments/lm_quickstart.gin", RUN_DIR,
                         TUPLE, REFERENCE]
  assert job["env_vars"]["EXTRA"] == "a b"
  assert job["env_vars"]["POSTTRAIN_JAX_NUM_PROCESSES"] == "12"
  assert spec["packageable"]["executable_spec"] == {
      "type": "Container", "image_path": "us-docker.pkg.dev/p/r/img:1"}
  assert "configure-docker us-docker.pkg.dev" in spec["tpu_vm"]["remote_command"]


def test_vertex_places_single_host_v3_and_refuses_what_it_cannot(capsys):
  spec, _ = _dry_run(capsys, "--accelerator=v3-8", "--platform=vertex",
                     "--image_tag=gcr.io/p/img:t", RUN_DIR,
                     "--gin_file=gin/experiments/lm_quickstart.gin",
                     base=("--name=v3",))
  [pool] = spec["vertex"]["worker_pools"]
  assert pool["machine_spec"] == {"accelerator_type": "TPU_V3",
                                  "accelerator_count": 8,
                                  "machine_type": "cloud-tpu"}
  assert pool["args"] == [RUN_DIR, "--gin_file=gin/experiments/lm_quickstart.gin"]
  assert spec["job_group"]["slice_0"]["executor"]["type"] == "Vertex"

  code = xm_launch.main(["--accelerator=v5p-256", "--num_slices=2",
                         "--platform=vertex", "--image_tag=gcr.io/p/img:t",
                         "--gin_file=gin/experiments/lm_quickstart.gin"])
  err = capsys.readouterr().err
  assert code == 2
  assert "TPU_V5P" in err and "32 hosts" in err and "num_slices" in err
  assert "--platform=tpu_vm" in err


@pytest.mark.parametrize("args, message", [
    (["--accelerator=v5p-256", "--gin.RUN_DIR=gs://b/x"], "not a valid gin binding"),
    (["--accelerator=v5p-256", "--gin.RUN_DIR"], "expected --gin.NAME=VALUE"),
    (["--accelerator=v5p-256", "--topology=4x4x4"], "has 64 chips but v5p-256 has 128"),
    (["--accelerator=v9-8"], "expected a Cloud TPU type"),
    (["--accelerator=v5p-24"], "pass --topology"),
    (["--accelerator=v5p-8", "--gin_file=missing.gin"], "not found"),
    (["--accelerator=v5p-8", "--run_dir=gs://b", "--gin.RUN_DIR='gs://c'"],
     "--run_dir and a RUN_DIR binding"),
    (["--accelerator=v5p-8", "--env=1X=y"], "expected NAME=VALUE"),
])
def test_errors_are_one_line_before_any_build(capsys, args, message):
  code = xm_launch.main(["--project=p", "--zone=z", "--name=e",
                         "--gin_file=gin/experiments/lm_quickstart.gin", *args,
                         "--dry_run"])
  out, err = capsys.readouterr()
  assert code == 2 and out == ""
  assert message in err and err.startswith("xm_launch: error:")
  assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("accelerator, topology, chips, hosts", [
    ("v5p-8", "2x2x1", 4, 1), ("v4-32", "2x2x4", 16, 4),
    ("v5litepod-16", "4x4", 16, 4), ("v5e-8", "2x4", 8, 1),
    ("v6e-256", "16x16", 256, 64), ("v3-32", "4x4", 16, 4),
])
def test_accelerator_table(accelerator, topology, chips, hosts):
  tpu = xm_launch.parse_accelerator(accelerator)
  assert (tpu.topology, tpu.chips, tpu.hosts) == (topology, chips, hosts)


def test_missing_xmanager_is_a_clear_error(monkeypatch):
  for name in list(sys.modules):
    if name == "xmanager" or name.startswith("xmanager."):
      monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "xmanager", None)  # import fails
  with pytest.raises(xm_launch.LaunchError, match="pip install"):
    xm_launch.import_xmanager()


@pytest.mark.parametrize("binding, message", [
    ("--gin.train.num_stpes=5", "Unknown parameter 'num_stpes' of 'train'"),
    ("--gin.ModelConfg.embed_dim=64", "Unknown configurable 'ModelConfg'"),
    ("--gin.NUM_STEPS=2.5", "expected int"),
])
def test_dry_run_resolves_the_configuration_as_the_binary_does(capsys, binding, message):
  # A misspelt parameter used to pass the dry run and fail on the TPUs.
  code = xm_launch.main(["--project=p", "--zone=z", "--name=e", "--accelerator=v5p-8",
                         "--gin_file=gin/experiments/lm_quickstart.gin", binding, "--dry_run"])
  out, err = capsys.readouterr()
  assert code == 2 and out == ""
  assert err.startswith("xm_launch: error: the binary refuses this configuration: ")
  assert message in err and len(err.strip().splitlines()) == 1
  # --skip_config_check leaves it to the binary.
  spec, _ = _dry_run(capsys, "--accelerator=v5p-8", "--skip_config_check",
                     "--gin_file=gin/experiments/lm_quickstart.gin", binding)
  assert binding in spec["job_group"]["slice_0"]["args"]


def test_dry_run_refuses_a_binding_the_job_never_reads(capsys):
  code = xm_launch.main(["--project=p", "--zone=z", "--name=e", "--accelerator=v5p-8",
                         "--gin_file=gin/experiments/quickstart.gin", "--gin.NUM_STEPS=2000",
                         "--dry_run"])
  assert code == 2
  assert "job 'distillation_demo' does not read NUM_STEPS (command line)" in \
      capsys.readouterr().err


def test_the_check_runs_the_binary_itself(monkeypatch):
  monkeypatch.setattr(xm_launch, "run_check_config", _RUN_CHECK_CONFIG)
  with pytest.raises(xm_launch.LaunchError, match=r"^the binary refuses this configuration: "
                     r"Unknown parameter 'num_stpes' of 'train'.*Did you mean: num_steps"):
    xm_launch.check_configuration(["--gin_file=gin/experiments/lm_quickstart.gin",
                                   "--gin.train.num_stpes=5"], REPO)
