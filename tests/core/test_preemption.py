"""SIGTERM: checkpoint at the next step boundary, exit 0, resume at that step."""

import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def binary(run_dir, num_steps):
  return [sys.executable, "-m", "posttrain_jax.main",
          "--gin_file=gin/experiments/lm_quickstart.gin", f"--gin.RUN_DIR='{run_dir}'",
          f"--gin.NUM_STEPS={num_steps}", "--gin.SEQUENCE_LENGTH=32",
          "--gin.BATCH_SIZE=4", "--gin.train.log_every=1", "--gin.train.eval_every=0",
          "--gin.train.eval_data=None", "--gin.train.checkpoint_every=1000",
          "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.embed_dim=32"]


def test_sigterm_saves_and_resumes(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(binary(tmp_path, 100000), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if line.startswith("step ") and " 3/" in line.split("|")[0]:
        proc.send_signal(signal.SIGTERM)
        break
    out, err = proc.communicate(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
  seen.append(out)
  text = "".join(seen)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted (SIGTERM): checkpoint saved at step" in text
  step = int(text.split("checkpoint saved at step ")[1].split(";")[0])
  assert step >= 3
  assert str(step) in os.listdir(tmp_path / "checkpoints")
  resumed = subprocess.run(binary(tmp_path, step + 2), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=240)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from step {step}" in resumed.stdout
  assert f"step {step + 2}/{step + 2}" in resumed.stdout
