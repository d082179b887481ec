"""Elastic Streaming DiLoCo checkpoints (3 local slices, torchft's
Lighthouse): every slice killed after a checkpoint; the restarted slices
resume from the leader's outer checkpoint and their own inner states and
repeat the first run bit for bit."""

import os

import numpy as np
import pytest

from posttrain_jax.diloco.elastic import membership

from elastic_procs import ARGS  # pylint: disable=g-bad-import-order
from test_elastic_slice import by_step, spmd_outer  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.skipif(not membership.available(),
                                reason="torchft (the Lighthouse) is not installed")




def test_all_slices_killed_resume_from_the_leaders_checkpoint_exactly(run, tmp_path):
  steps, every = 32, 8
  ckpt = os.path.join(tmp_path, "ckpt")
  r = run(steps, ["--step_sleep=0.1", f"--checkpoint_dir={ckpt}",
                  f"--checkpoint_every={every}"])
  for s in range(3):
    r.start(s)
  saved = lambda d, t: os.path.isdir(os.path.join(ckpt, d, str(t)))
  r.wait_for(lambda: all(saved(d, 16) for d in ("outer", "slice0", "slice1", "slice2"))
             and all(any(x["event"] == "step" and x["step"] >= 19 for x in r.records(s))
                     for s in range(3)), 90, "checkpoints at step 16")
  for s in range(3):
    r.kill(s)
  first = [by_step(r.records(s)) for s in range(3)]
  for s in range(3):
    r.start(s)
  assert r.wait(120) == {0: 0, 1: 0, 2: 0}
  recs = [r.records(s) for s in range(3)]
  pids = [sorted({x["pid"] for x in rec}) for rec in recs]
  assert all(len(p) == 2 for p in pids)
  for s in range(3):
    resumed = by_step([x for x in recs[s] if x["pid"] == pids[s][1]])
    assert min(resumed) == 17  # the first step after the newest checkpoint (16)
    redone = [t for t in resumed if t in first[s]]
    assert redone and max(redone) >= 19
    for t in redone:  # the resumed run repeats the first run bit for bit
      assert resumed[t]["outer"] == first[s][t]["outer"], (s, t)
      assert resumed[t]["loss"] == first[s][t]["loss"], (s, t)
  ref = spmd_outer(steps, ARGS)
  for k, v in ref.items():
    np.testing.assert_allclose(r.outer(0)[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    for s in (1, 2):
      np.testing.assert_array_equal(r.outer(s)[k], r.outer(0)[k])
