"""tools/detect_hacking.py on a TensorBoard log written by clu's default metric writer."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "detect_hacking.py")
BEND = 5000


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
  """proxy: power law then plateau at BEND; train_loss: noisy pure power law."""
  path = str(tmp_path_factory.mktemp("tb") / "run")
  script = textwrap.dedent(f"""
      import numpy as np
      from clu import metric_writers
      writer = metric_writers.create_default_writer({path!r})
      rng = np.random.default_rng(0)
      for step in range(25, 10001, 25):
        noise = np.exp(0.03 * rng.standard_normal(2))
        writer.write_scalars(step, {{
            "proxy": 3.0 * min(step, {BEND}) ** -0.5 * noise[0],
            "train_loss": 2.0 * step ** -0.4 * noise[1],
        }})
      writer.flush()
      writer.close()
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return path


def test_tool_flags_plateau_not_power_law_without_tensorflow(logdir):
  """One process runs the tool's main three times, then checks TF was never imported."""
  script = textwrap.dedent(f"""
      import contextlib, io, json, runpy, sys
      tool = runpy.run_path({TOOL!r})
      results = []
      for argv in (["--logdir", {logdir!r}],
                   ["--logdir", {logdir!r}, "--tag", "train_loss", "--window", "0.25"],
                   ["--logdir", {logdir!r}, "--tag", "golden"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
          rc = tool["main"](argv)
        results.append({{"rc": rc, "out": out.getvalue(), "err": err.getvalue()}})
      results.append({{"tensorflow_imported": "tensorflow" in sys.modules}})
      print(json.dumps(results))
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  proxy, train, missing, mods = json.loads(proc.stdout.strip().splitlines()[-1])

  assert proxy["rc"] == 0, proxy["err"]
  lines = proxy["out"].strip().splitlines()
  assert len(lines) == 1
  res = json.loads(lines[0])
  assert res["tag"] == "proxy" and res["flagged"] is True
  assert BEND <= res["step"] <= 1.3 * BEND, res
  assert abs(res["alpha"] - 0.5) < 0.05 and res["num_points"] == 400

  assert train["rc"] == 0, train["err"]
  res = json.loads(train["out"])
  assert res["tag"] == "train_loss" and res["flagged"] is False and res["step"] is None
  assert abs(res["alpha"] - 0.4) < 0.05

  assert missing["rc"] == 2 and missing["out"] == ""
  assert "golden" in missing["err"] and "proxy" in missing["err"]
  assert len(missing["err"].strip().splitlines()) == 1

  assert mods["tensorflow_imported"] is False


def test_cli_entry_point(logdir):
  proc = subprocess.run([sys.executable, TOOL, f"--logdir={os.path.dirname(logdir)}",
                         "--tag=proxy"], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  res = json.loads(proc.stdout)
  assert res["flagged"] and res["run"] == logdir
  bad = subprocess.run([sys.executable, TOOL, "--logdir=/nonexistent/dir"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
