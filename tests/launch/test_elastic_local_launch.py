"""launch/local.py --elastic_slices: the Lighthouse plus N elastic DiLoCo
slices, prefixed logs, nothing left running."""

import os
import subprocess
import sys

import numpy as np
import pytest

from posttrain_jax.diloco.elastic import membership

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "launch", "local.py")


@pytest.mark.skipif(not membership.available(), reason="torchft not installed")
def test_two_slices_and_the_lighthouse(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, LAUNCHER, "--elastic_slices=2", "--timeout=120", "--",
       f"--out_dir={tmp_path}", "--steps=4"],
      env=env, capture_output=True, text=True, timeout=150)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "elastic DiLoCo: Lighthouse on 127.0.0.1:" in proc.stderr
  assert "[lighthouse] " in proc.stdout
  outer = [dict(np.load(tmp_path / f"slice{s}_outer.npz")) for s in range(2)]
  for k, v in outer[0].items():
    np.testing.assert_array_equal(outer[1][k], v)
