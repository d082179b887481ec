"""tools/plot_warm.py on small synthetic TensorBoard logs (clu's default metric writer)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "plot_warm.py")


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """policy_single: gold peaks at step 100 (0.5) then falls to 0.3 while the proxy
  keeps rising; policy_warm: gold rises monotonically to 0.6. Train scalars every
  10 steps, eval every 50."""
  path = str(tmp_path_factory.mktemp("warm_rl"))
  script = textwrap.dedent(f"""
      import os
      from clu import metric_writers
      def gold(name, s):
        if name == "policy_single":
          return 0.3 + 0.2 * s / 100 if s <= 100 else 0.5 - 0.2 * (s - 100) / 100
        return 0.3 + 0.3 * s / 200
      for name in ("policy_single", "policy_warm"):
        w = metric_writers.create_default_writer(os.path.join({path!r}, name))
        for s in range(10, 201, 10):
          m = {{"reward": 0.01 * s, "gold_reward": gold(name, s), "kl_sft": 0.02 * s,
                "entropy": 1.0}}
          if s % 50 == 0:
            m.update({{"eval/" + k: v for k, v in m.items()}})
          w.write_scalars(s, m)
        w.flush()
        w.close()
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return path


def _run(*args):
  return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)


def _row(out, source, label):
  lines = out.splitlines()
  start = lines.index(next(l for l in lines if l.startswith(f"| run ({source})")))
  return next(l for l in lines[start:] if l.startswith(f"| {label} |"))


def test_table_and_png(root, tmp_path):
  proc = _run("--root", root, "--out_dir", str(tmp_path), "--out_name", "w.png",
              "--drop", "0.15")
  assert proc.returncode == 0, proc.stderr
  png = tmp_path / "w.png"
  assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Train scalars: the single RM's gold peaks at step 100 and drops 0.2 by step 200.
  single = _row(proc.stdout, "train", "single RM (member 0)")
  # Gold is 0.15 below the peak (0.5 at 100) from step 175 on: first logged at 180.
  assert "first step 0.15 below running max" in proc.stdout
  assert "| 0.320 (10) | 0.500 (100) | 0.300 (200) | 0.200 | 180 |" in single
  assert "| 0.100 -> 2.000 | 4.00 |" in single
  warm = _row(proc.stdout, "train", "WARM (M=3)")
  assert "| 0.600 (200) | 0.600 (200) | 0.000 | none |" in warm
  # Eval scalars (every 50 steps): single RM peak at 100, gold 0.4 at 50.
  single_eval = _row(proc.stdout, "eval", "single RM (member 0)")
  assert "| 0.400 (50) | 0.500 (100) | 0.300 (200) | 0.200 | 200 |" in single_eval


def test_first_drop_step():
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import plot_warm  # pylint: disable=g-import-not-at-top
  steps = np.array([10, 20, 30, 40])
  # The running maximum, not the global one: 0.5 -> 0.35 counts before the later 0.9.
  assert plot_warm.first_drop_step(steps, np.array([0.5, 0.35, 0.9, 0.85]), 0.1) == 20
  assert plot_warm.first_drop_step(steps, np.array([0.1, 0.2, 0.3, 0.4]), 0.1) is None
  # Exactly `drop` below counts.
  assert plot_warm.first_drop_step(steps, np.array([0.5, 0.45, 0.25, 0.0]), 0.25) == 30


def test_summarize_limits(root):
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import plot_warm  # pylint: disable=g-import-not-at-top
  c = plot_warm.curves(os.path.join(root, "policy_warm"))
  assert set(c) == {"reward", "gold_reward", "kl_sft",
                    "eval/reward", "eval/gold_reward", "eval/kl_sft"}
  s = plot_warm.summarize(c, "eval")
  assert s["gold_peak_step"] == s["last_step"] == 200 and s["gold_drop"] == 0.0
  del c["eval/kl_sft"]
  assert plot_warm.summarize(c, "eval") is None


def test_missing_runs_one_clear_error(tmp_path):
  proc = _run("--root", str(tmp_path), "--out_dir", str(tmp_path / "out"))
  assert proc.returncode == 2
  assert "no RL runs with gold_reward scalars" in proc.stderr
  assert "run bash tools/run_warm.sh" in proc.stderr
