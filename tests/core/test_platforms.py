"""No TPU probe on hosts without a TPU when libtpu is installed."""

import importlib.util
import os
import subprocess
import sys

import pytest

from posttrain_jax.core import platforms

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_platforms_are_set_only_without_a_tpu_and_with_libtpu(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(platforms, "tpu_device_present", lambda: True)
  assert platforms.skip_absent_tpu() is None  # a TPU VM keeps jax's own choice
  assert "JAX_PLATFORMS" not in os.environ
  monkeypatch.setattr(platforms, "tpu_device_present", lambda: False)
  monkeypatch.setattr(platforms, "_installed", lambda m: m != "libtpu")
  assert platforms.skip_absent_tpu() is None  # no libtpu: nothing to skip
  monkeypatch.setattr(platforms, "_installed", lambda m: m == "libtpu")
  assert platforms.skip_absent_tpu() == "cpu"
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert platforms.skip_absent_tpu() is None  # the user's setting wins
  assert os.environ["JAX_PLATFORMS"] == "tpu"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or platforms.tpu_device_present(),
                    reason="needs libtpu installed on a host without a TPU")
def test_importing_posttrain_jax_first_or_second_skips_the_tpu_probe():
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  for code in ("import posttrain_jax, jax; print(jax.devices()[0].platform)",
               "import jax, posttrain_jax; print(jax.devices()[0].platform)"):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=dict(env, PYTHONPATH=REPO), check=True)
    assert out.stdout.strip() == "cpu"
    assert "TPU" not in out.stderr, out.stderr  # libtpu's start-up errors
