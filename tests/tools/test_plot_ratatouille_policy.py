"""tools/plot_ratatouille_policy.py on small synthetic TensorBoard logs."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "plot_ratatouille_policy.py")


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """policy_single: gold peaks at step 100 (0.5) then falls to 0.3; policy_best:
  gold rises monotonically to 0.6. Train scalars every 10 steps, eval every 50."""
  path = str(tmp_path_factory.mktemp("rat_policy"))
  script = textwrap.dedent(f"""
      import os
      from clu import metric_writers
      def gold(name, s):
        if name == "policy_single":
          return 0.3 + 0.2 * s / 100 if s <= 100 else 0.5 - 0.2 * (s - 100) / 100
        return 0.3 + 0.3 * s / 200
      for name in ("policy_single", "policy_best"):
        w = metric_writers.create_default_writer(os.path.join({path!r}, name))
        for s in range(10, 201, 10):
          m = {{"reward": 0.01 * s, "gold_reward": gold(name, s), "kl_sft": 0.02 * s}}
          if s % 50 == 0:
            m.update({{"eval/" + k: v for k, v in m.items()}})
          w.write_scalars(s, m)
        w.flush()
        w.close()
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  with open(os.path.join(path, "best_merge.json"), "w") as f:
    json.dump({"label": "4 RMs: TIES", "path": "x"}, f)
  return path


def _run(*args):
  return subprocess.run([sys.executable, TOOL, *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)


def _row(out, source, label):
  lines = out.splitlines()
  start = lines.index(next(l for l in lines if l.startswith(f"| run ({source})")))
  return next(l for l in lines[start:] if l.startswith(f"| {label} |"))


def test_table_and_png(root, tmp_path):
  png = tmp_path / "p.png"
  proc = _run("--root", root, "--best", os.path.join(root, "best_merge.json"),
              "--out", str(png), "--drop", "0.15")
  assert proc.returncode == 0, proc.stderr
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  single = _row(proc.stdout, "train", "single RM (warm_0)")
  # Gold is 0.15 below the peak (0.5 at 100) from step 175 on: first logged at 180.
  assert "| 0.320 (10) | 0.500 (100) | 0.300 (200) | 0.200 | 180 |" in single
  assert "| 0.100 -> 2.000 | 4.00 |" in single
  best = _row(proc.stdout, "train", "best merge: 4 RMs: TIES")
  assert "| 0.600 (200) | 0.600 (200) | 0.000 | none |" in best
  single_eval = _row(proc.stdout, "eval", "single RM (warm_0)")
  assert "| 0.400 (50) | 0.500 (100) | 0.300 (200) | 0.200 | 200 |" in single_eval


def test_missing_runs_one_clear_error(tmp_path):
  proc = _run("--root", str(tmp_path), "--out", str(tmp_path / "p.png"))
  assert proc.returncode == 2
  assert "no RL runs with gold_reward scalars" in proc.stderr
  assert "run bash tools/run_ratatouille.sh policy" in proc.stderr
