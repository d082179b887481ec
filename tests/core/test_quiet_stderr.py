"""TensorFlow's C++ start-up lines stay off the console; real errors do not."""

import os
import subprocess
import sys

import pytest

from posttrain_jax.core.quiet_stderr import VERBOSE_ENV, quiet_stderr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOISE = ("absl::InitializeLog", "Could not find cuda drivers", "failed call to cuInit",
         "cpu_feature_guard")


def test_quiet_stderr_hides_fd_2_writes_and_restores_it(capfd, monkeypatch):
  monkeypatch.delenv(VERBOSE_ENV, raising=False)
  with quiet_stderr():
    os.write(2, b"C++ noise\n")
  os.write(2, b"after\n")
  with pytest.raises(ImportError, match="real failure"):
    with quiet_stderr():
      raise ImportError("real failure")   # exceptions pass through
  os.write(2, b"still restored\n")
  err = capfd.readouterr().err
  assert "C++ noise" not in err and "after" in err and "still restored" in err


def test_importing_the_data_layer_and_metric_writers_prints_no_tf_noise():
  pytest.importorskip("tensorflow")
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", VERBOSE_ENV)}
  proc = subprocess.run(
      [sys.executable, "-c", "import posttrain_jax.core.progress, posttrain_jax.data.pipeline"],
      cwd=REPO, env={**env, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert not [n for n in NOISE if n in proc.stderr], proc.stderr
