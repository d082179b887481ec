"""tools/plot_teacher_hacking.py on synthetic TensorBoard logs (clu's default writer)."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "plot_teacher_hacking.py")


def _env():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)
  return env


def test_table_and_plots_from_event_files(tmp_path):
  """offline: proxy keeps falling, golden turns up after step 300 (hacking);
  online_teacher: both follow a power law."""
  root = tmp_path / "runs"
  script = textwrap.dedent(f"""
      import os
      from clu import metric_writers
      for name in ("offline", "online_teacher", "lever_offline", "teacher_gap",
                   "lever_offline_p32", "lever_offline_p32_seed1", "const_offline_p32",
                   "const_offline_p32_seed1", "const_online_teacher"):
        w = metric_writers.create_default_writer(os.path.join({str(root)!r}, name))
        for s in range(0, 1001, 50):
          t = max(s, 1)
          proxy = 40.0 * t ** -0.2
          golden = 50.0 * t ** -0.15
          if name in ("offline", "lever_offline") and s > 300:
            golden = 50.0 * 300 ** -0.15 + 0.02 * (s - 300)
          if name.startswith(("lever_offline_p32", "const_offline_p32")):
            # seeds: golden +1 or +3 by the end
            golden = 40.0 + (1.0 if name.endswith("seed1") else 3.0) * s / 1000
          if name == "teacher_gap":
            proxy, golden = 0.0, 17.25
          w.write_scalars(s, {{"eval/proxy_kl": proxy, "eval/golden_kl": golden,
                               "eval/golden_kl_stderr": 1.5}})
          if s:
            w.write_scalars(s, {{"loss": 1.0 / t ** 0.3}})
        w.flush(); w.close()
      # weak_offline: per-prompt values (eval_per_prompt/) with prompt offsets far
      # larger than the step-to-step noise; golden turns up after step 300 by 3.0
      # while proxy keeps falling by 0.01 a step.
      import numpy as np
      from posttrain_jax.distillation import eval as eval_lib
      run = os.path.join({str(root)!r}, "weak_offline")
      w = metric_writers.create_default_writer(run)
      offsets = np.random.default_rng(0).normal(0.0, 10.0, 64)
      for s in range(0, 601, 50):
        noise = np.random.default_rng(s + 1).normal(0.0, 0.1, (2, 64))
        golden = 40.0 + offsets + abs(s - 300) / 100.0 + noise[0]
        proxy = 30.0 + offsets - 0.01 * s + noise[1]
        eval_lib.save_per_prompt(run, s, {{"golden": golden, "proxy": proxy}})
        w.write_scalars(s, {{"eval/proxy_kl": proxy.mean(), "eval/golden_kl": golden.mean()}})
      w.flush(); w.close()
  """)
  subprocess.run([sys.executable, "-c", script], check=True, env=_env(), timeout=300)
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, TOOL, "--root", str(root), "--out_dir", str(out)],
                        capture_output=True, text=True, env=_env(), timeout=300)
  assert proc.returncode == 0, proc.stderr
  rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines()
          if line.startswith("| ") and "run |" not in line}
  offline = rows["offline (512 prompts x 1)"].split("|")
  assert "at step 300" in offline[5]                    # the golden minimum
  assert float(offline[6].split()[0]) > 10              # the golden rise after it
  assert offline[8].strip().startswith("step")          # flagged on golden
  online = rows["online teacher"].split("|")
  assert online[7].strip() == "no" and online[8].strip() == "no"
  assert online[9].strip() == "no"                      # the train loss: a power law
  assert "(stderr 1.50)" in offline[6]
  lever = rows["lever: teacher-size student, offline (128 x 1)"].split("|")
  assert lever[8].strip().startswith("step")
  assert "G_T of the teacher = KL(oracle || teacher) = 17.25 nats per sequence" in proc.stdout
  paired = [line for line in proc.stdout.splitlines()
            if line.startswith("| weak teacher: offline (128 x 1)")]
  assert len(paired) == 2  # the summary row and the paired row
  cells = paired[1].split("|")
  assert "(300)" in cells[4]                             # golden minimum at step 300
  rise, rise_se = float(cells[5].split()[0]), float(cells[5].split()[2])
  assert abs(rise - 3.0) < 0.1 and rise_se < 0.1         # paired: offsets cancel
  after, after_se = float(cells[6].split()[0]), float(cells[6].split()[2])
  assert abs(after + 3.0) < 0.1 and after_se < 0.1       # proxy still falling
  # golden's maximum is the start or the end (both 3.0 above the minimum)
  up, top = float(cells[2].split()[0]), cells[2].split()[-1]
  assert abs(up) < 0.1 and top in ("(0)", "(600)")
  proxy_up = float(cells[3].split()[0])                  # proxy over those steps
  assert abs(proxy_up - (0.0 if top == "(0)" else -6.0)) < 0.1
  assert "offline (32 x 1), 2 seeds: golden end - start +2.00 +- 1.00" in proc.stdout
  assert "constant LR: offline (32 x 1), 2 seeds: golden end - start +2.00" in proc.stdout
  for png in ("teacher_hacking_sources.png", "teacher_hacking_diversity.png",
              "teacher_hacking_lever.png", "teacher_hacking_lever2.png",
              "teacher_hacking_headline.png", "teacher_hacking_const_diversity.png"):
    assert (out / png).stat().st_size > 10_000


def test_no_runs_is_one_clear_error(tmp_path):
  proc = subprocess.run([sys.executable, TOOL, "--root", str(tmp_path)],
                        capture_output=True, text=True, env=_env(), timeout=300)
  assert proc.returncode == 2
  assert "no distillation runs" in proc.stderr
