import glob

import pytest

from posttrain_jax.core.profiling import StepProfiler

from lm_runs import run  # pylint: disable=g-bad-import-order


def test_profile_steps_write_a_trace(tmp_path):
  run(tmp_path, 4, profile_steps=(2, 4))
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, list((tmp_path / "profile").rglob("*"))


def test_bad_profile_steps_are_rejected():
  with pytest.raises(ValueError, match="0 < start < stop"):
    StepProfiler("/tmp/x", (3, 3))
