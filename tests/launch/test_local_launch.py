"""launch/local.py: N local jax.distributed processes, prefixed logs, fail-fast."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "launch", "local.py")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "local_launch_worker.py")


def _load():
  spec = importlib.util.spec_from_file_location("local_launch", LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


local = _load()


def _launch(*args, timeout=180):
  start = time.monotonic()
  proc = subprocess.run([sys.executable, LAUNCHER, *args], capture_output=True,
                        text=True, timeout=timeout, cwd=REPO)
  return proc, time.monotonic() - start


def _json_lines(stdout, prefix):
  return [json.loads(line[len(prefix):]) for line in stdout.splitlines()
          if line.startswith(prefix + "{")]


def test_two_processes_train_on_a_hybrid_mesh():
  proc, _ = _launch("--num_processes=2", "--devices_per_process=1",
                    "--timeout=150", "--", sys.executable, WORKER, "train", "2")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  [r0] = _json_lines(proc.stdout, "[p0] ")
  [r1] = _json_lines(proc.stdout, "[p1] ")
  assert (r0["process"], r1["process"]) == (0, 1)
  assert r0["count"] == r1["count"] == 2
  assert r0["replica_processes"] == [[0], [1]]  # one replica (slice) per process
  assert len(r0["losses"]) == 2 and all(math.isfinite(x) for x in r0["losses"])
  assert r0["losses"] == r1["losses"]  # one global computation


def test_a_failing_process_stops_the_others(tmp_path):
  proc, elapsed = _launch("--num_processes=2", "--grace=2", "--timeout=120",
                          "--", sys.executable, WORKER, "fail", "1", str(tmp_path))
  assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "[p1] process 1: failing on purpose" in proc.stdout
  assert "[p0] process 0: waiting" in proc.stdout
  assert "p1 exited with status 3; stopping p0" in proc.stderr
  assert elapsed < 60
  pid = int((tmp_path / "p0.pid").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_timeout_stops_everything():
  proc, elapsed = _launch("--num_processes=2", "--timeout=1", "--grace=1", "--",
                          sys.executable, "-c", "import time; time.sleep(60)")
  assert proc.returncode == local.EXIT_TIMEOUT
  assert "timeout after 1s" in proc.stderr
  assert elapsed < 30


def test_training_binary_two_processes_one_replica_each(tmp_path):
  """The default command: posttrain_jax.main in 2 processes, DCN replica 2."""
  pytest.importorskip("posttrain_jax.core.distributed")  # the binary's env hook
  run_dir = tmp_path / "run 1"  # a space: quoting must survive
  proc, _ = _launch(
      "--num_processes=2", "--devices_per_process=1", "--grace=5",
      "--timeout=170", "--gin_file=gin/experiments/lm_quickstart.gin",
      f"--gin.RUN_DIR={str(run_dir)!r}", "--gin.NUM_STEPS=2",
      "--gin.SEQUENCE_LENGTH=16", "--gin.BATCH_SIZE=4",
      "--gin.train.eval_data=None", "--gin.train.log_every=1",
      "--gin.train.async_checkpointing=False", "--gin.ModelConfig.num_layers=1",
      "--gin.train.dcn_parallelism={'replica': 2}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "-m posttrain_jax.main --gin_file=gin/experiments/lm_quickstart.gin" in proc.stderr
  # 1 device per process, 2 in the mesh: the processes formed one system
  assert "[p0] initialised" in proc.stdout
  assert "mesh {'replica': 2, 'data': 1, 'fsdp': 1, 'tensor': 1}" in proc.stdout
  assert "[p0] step 2/2" in proc.stdout
  assert any(line.startswith("[p1] ") for line in proc.stdout.splitlines())
  assert (run_dir / "checkpoints" / "2").is_dir()


def test_arguments_and_environment():
  opts, command = local.parse_args([
      "--num_processes=3", "--gin_file=a.gin", "--gin.RUN_DIR='r x'",
      "--gin_bindings", "X = 1", "--module_import=my.tasks"])
  assert opts.num_processes == 3
  assert command == [sys.executable, "-m", "posttrain_jax.main", "--gin_file=a.gin",
                     "--gin.RUN_DIR='r x'", "--gin_bindings=X = 1",
                     "--module_import=my.tasks"]
  _, command = local.parse_args(["--", "echo", "--gin.X=1"])
  assert command == ["echo", "--gin.X=1"]
  with pytest.raises(local.LaunchError):
    local.parse_args(["--gin.X=1", "--", "echo"])
  with pytest.raises(local.LaunchError):
    local.parse_args(["--gin.X"])

  base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
          "PYTHONPATH": "/elsewhere", "POSTTRAIN_JAX_PROCESS_ID": "9"}
  env = local.process_env(base, 1, 3, 1234, 4)
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu"
  assert (env["POSTTRAIN_JAX_COORDINATOR"], env["POSTTRAIN_JAX_NUM_PROCESSES"],
          env["POSTTRAIN_JAX_PROCESS_ID"]) == ("127.0.0.1:1234", "3", "1")
  assert env["PYTHONPATH"] == REPO + os.pathsep + "/elsewhere"
  single = local.process_env(base, 0, 1, 1234, 2)
  assert not any(k.startswith("POSTTRAIN_JAX_") for k in single)
