"""The README's main command (gin/experiments/quickstart.gin) runs end to end."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_demo_runs_all_stages_and_resumes(tmp_path):
  args = [sys.executable, "-m", "posttrain_jax.main",
          "--gin_file=gin/experiments/quickstart.gin", f"--gin.RUN_DIR='{tmp_path}'",
          "--gin.distillation_demo.oracle_steps=4", "--gin.distillation_demo.teacher_steps=2",
          "--gin.distillation_demo.student_steps=4", "--gin.distillation_demo.eval_every=2",
          "--gin.distillation_demo.num_eval_prompts=8",
          "--gin.distillation_demo.log_every=2"]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO}
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for stage in ("oracle", "teacher", "student"):
    assert f"== stage {stage}" in out
    assert os.path.isdir(tmp_path / stage / "checkpoints")
  assert "eval at step 4: golden_kl" in out and "proxy_kl" in out
  assert "== done: proxy" in out
  # The teacher's own model.gin (not the operative config's oracle) describes it.
  with open(tmp_path / "teacher" / "model.gin") as f:
    assert "ModelConfig.num_layers = 2" in f.read()
  with open(tmp_path / "student" / "model.gin") as f:
    assert "ModelConfig.embed_dim = 64" in f.read()
  again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("run already complete") == 3  # every stage
  assert "resumed from step 4" in again.stdout
