"""Fixtures of the elastic DiLoCo tests: `run(steps, extra=(), **kw)` makes an
`elastic_procs.ElasticRun` of 3 toy slices (the Lighthouse and the slices as
child processes), every one of them killed at teardown."""

import pytest

import elastic_procs as ep  # pylint: disable=g-bad-import-order


@pytest.fixture
def run(tmp_path):
  runs = []

  def make(steps, extra=(), **kw):
    r = ep.ElasticRun(tmp_path, 3, ep.ARGS + [f"--steps={steps}"] + list(extra),
                      heartbeat_timeout=ep.HEARTBEAT, **kw)
    runs.append(r)
    return r
  yield make
  for r in runs:
    r.close()
