"""Two jax.distributed processes (launch/local.py, the real binary) resume exactly.

For the LM, distillation and policy jobs, one chain of runs in one run directory:
SIGTERM to the launcher (a preemption: both processes checkpoint at the same step
and exit), the same command (resumes; kill -9 of process 1 once a periodic
checkpoint is complete), the same command again (resumes from that checkpoint,
runs to the end). Its final checkpoint's array checksums (bit-exact up to ~2^-32)
and every logged loss equal those of an uninterrupted two-process run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from posttrain_jax.models import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "launch", "local.py")
TIMEOUT = 150  # seconds per launch (the launcher stops everything after it)
STEP = re.compile(r"^\[p0\] step +(\d+)/\d+ \| (.*?) \| lr")


class Launch:
  """One `launch/local.py --num_processes=2` run of the binary, read line by line."""

  def __init__(self, args, grace=5):
    self.proc = subprocess.Popen(
        [sys.executable, LAUNCHER, "--num_processes=2", "--devices_per_process=1",
         f"--grace={grace}", f"--timeout={TIMEOUT}", *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines = []

  def __iter__(self):
    for line in self.proc.stdout:
      self.lines.append(line)
      yield line

  def finish(self) -> int:
    try:
      for _ in self:
        pass
      return self.proc.wait(timeout=60)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()

  @property
  def text(self) -> str:
    return "".join(self.lines)

  def losses(self) -> dict[int, str]:
    """{step: the logged metrics before lr} (process 0's lines)."""
    return {int(m.group(1)): m.group(2) for m in map(STEP.match, self.lines) if m}

  def process_pid(self, index: int) -> int:
    """The pid of the binary's process `index` (a child of the launcher)."""
    children = []
    for task in os.listdir(f"/proc/{self.proc.pid}/task"):
      with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
        children += [int(p) for p in f.read().split()]
    for pid in children:
      with open(f"/proc/{pid}/environ", "rb") as f:
        if f"POSTTRAIN_JAX_PROCESS_ID={index}".encode() in f.read().split(b"\0"):
          return pid
    raise AssertionError(f"no process {index} among {children}")


def complete_steps(run_dir) -> list[int]:
  directory = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def checksums(run_dir, step) -> dict:
  with open(os.path.join(run_dir, "checkpoints", str(step), "data", "metadata")) as f:
    return json.load(f)["_state_checksums"]


def uninterrupted_equals_preempted_and_killed(tmp_path, gin_args, num_steps):
  """The chain of the module docstring; returns the steps it resumed from."""
  def command(run_dir):
    return [*gin_args, f"--gin.RUN_DIR='{run_dir}'", f"--gin.NUM_STEPS={num_steps}"]

  full, run = tmp_path / "uninterrupted", tmp_path / "interrupted"
  reference = Launch(command(full))
  assert reference.finish() == 0, reference.text[-4000:]
  expected = reference.losses()
  assert sorted(expected) == list(range(1, num_steps + 1))

  preempted = Launch(command(run))
  for line in preempted:
    if STEP.match(line):  # the first step is done
      preempted.proc.send_signal(signal.SIGTERM)  # the launcher passes it on to both
      break
  preempted.finish()
  saved = re.findall(r"\[p0\] preempted \(SIGTERM\): checkpoint saved at step (\d+)",
                     preempted.text)
  assert saved, preempted.text[-4000:]
  first = int(saved[0])
  assert first < num_steps and complete_steps(run)[-1] == first

  killed = Launch(command(run), grace=1)  # process 0 cannot save without process 1
  for line in killed:
    if STEP.match(line) and [s for s in complete_steps(run) if s > first]:
      os.kill(killed.process_pid(1), signal.SIGKILL)
      break
  assert killed.finish() != 0, killed.text[-4000:]
  assert f"[p0] resumed from step {first}" in killed.text, killed.text[-4000:]
  second = complete_steps(run)[-1]
  assert first < second < num_steps, killed.text[-4000:]

  resumed = Launch(command(run))
  assert resumed.finish() == 0, resumed.text[-4000:]
  assert f"[p0] resumed from step {second}" in resumed.text, resumed.text[-4000:]
  assert "Data iterator state does not match" not in resumed.text
  logged = {**preempted.losses(), **killed.losses(), **resumed.losses()}
  assert set(resumed.losses()) == set(range(second + 1, num_steps + 1))
  for step, metrics in logged.items():
    assert metrics == expected[step], (step, metrics, expected[step])
  assert checksums(run, num_steps) == checksums(full, num_steps)
  return first, second


# gemma2_tiny.gin at these sizes: the SFT model / teacher of the RL and
# distillation runs (random weights, saved by the fixture).
SIZES = {"embed_dim": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
         "head_dim": 16, "mlp_dim": 64}
MODEL_FLAGS = [f"--gin.ModelConfig.{k}={v}" for k, v in SIZES.items()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from posttrain_jax.models import Transformer, params_checkpoint  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=2048, attention_pattern=("local", "global"),
                    sliding_window_size=64, query_scaling="head_dim",
                    attn_logits_soft_cap=50.0, final_logit_soft_cap=30.0, **SIZES)
  params = Transformer(cfg).init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]
  path = str(tmp_path_factory.mktemp("sft") / "model")
  params_checkpoint.save(path, nn.unbox(params), cfg)
  return path


def test_lm_job_resumes_exactly_after_sigterm_and_kill(tmp_path):
  uninterrupted_equals_preempted_and_killed(tmp_path, [
      "--gin_file=gin/experiments/lm_quickstart.gin", "--gin.SEQUENCE_LENGTH=16",
      "--gin.BATCH_SIZE=4", "--gin.train.eval_data=None", "--gin.train.log_every=1",
      "--gin.train.checkpoint_every=3", *MODEL_FLAGS,
      "--gin.train.dcn_parallelism={'replica': 2}"], num_steps=60)


def test_distillation_job_resumes_exactly_after_sigterm_and_kill(tmp_path, model_dir):
  uninterrupted_equals_preempted_and_killed(tmp_path, [
      "--gin_file=gin/experiments/pretraining_distillation.gin",
      f"--gin.TEACHER='{model_dir}'", "--gin.BATCH_SIZE=4",
      "--gin.lm_text/DatasetConfig.sequence_length=16", "--gin.distill.eval_data=None",
      "--gin.distill.eval_prompts=None", "--gin.distill.log_every=1",
      "--gin.distill.checkpoint_every=3", *MODEL_FLAGS,
      "--gin.distill.dcn_parallelism={'replica': 2}"], num_steps=40)


def test_policy_job_resumes_exactly_after_sigterm_and_kill(tmp_path, model_dir):
  uninterrupted_equals_preempted_and_killed(tmp_path, [
      "--gin_file=gin/experiments/rl/reinforce_tiny.gin",
      f"--gin.SFT_CHECKPOINT='{model_dir}'", "--gin.PROMPTS_PER_STEP=4",
      "--gin.PROMPT_LENGTH=8", "--gin.MAX_NEW_TOKENS=4",
      "--gin.train_policy.eval_prompts=None", "--gin.train_policy.log_every=1",
      "--gin.train_policy.checkpoint_every=3", *MODEL_FLAGS,
      "--gin.train_policy.dcn_parallelism={'replica': 2}"], num_steps=30)
