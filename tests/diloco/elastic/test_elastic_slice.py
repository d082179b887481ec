"""Elastic Streaming DiLoCo end to end: 3 slices as local processes (each its
own JAX job) with torchft's Lighthouse. No failure: the SPMD StreamingDiLoCo
of the same configuration. kill -9 mid inner phase: the survivors sync
without it within the heartbeat timeout; the restarted slice heals and its
outer parameters equal the survivors' bit for bit. kill -9 during an
exchange and every slice killed: test_elastic_failures.py."""

import numpy as np
import jax
import pytest

from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco.elastic import membership, run_slice, toy

import elastic_procs as ep  # pylint: disable=g-bad-import-order
from elastic_procs import ARGS, HEARTBEAT  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.skipif(not membership.available(),
                                reason="torchft (the Lighthouse) is not installed")


def spmd_outer(steps: int, args: list[str]):
  """θ̃ of the one-process SPMD StreamingDiLoCo with M = 3 replicas whose
  rows are the slices' batches."""
  a = run_slice.parse(["--slice=0", "--num_slices=3", "--lighthouse=-", "--out_dir=-",
                       f"--steps={steps}"] + args)
  tx = toy.optimizer(a.inner_lr)
  params = toy.init_params(a.seed, a.layers, a.width)
  algo = sd.StreamingDiLoCo(run_slice.diloco_config(a), toy.make_inner_step(tx), params)
  state = algo.init(toy.inner_state(params, tx))
  for t in range(steps):
    rows = [toy.batch(a.seed, m, t, a.rows, a.width, layers=a.layers) for m in range(3)]
    state, _ = algo.train_step(state, jax.tree.map(lambda *x: np.stack(x), *rows), t)
  return ep.flat(state.outer_params)


def by_step(records, event="step"):
  return {r["step"]: r for r in records if r["event"] == event}




def test_no_failure_equals_spmd_diloco(run):
  steps = 12
  r = run(steps)
  for s in range(3):
    r.start(s)
  assert r.wait(120) == {0: 0, 1: 0, 2: 0}
  ref = spmd_outer(steps, ARGS)
  for s in range(3):
    got = r.outer(s)
    assert got.keys() == ref.keys()
    for k, v in ref.items():
      np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
      np.testing.assert_array_equal(got[k], r.outer(0)[k])  # slices agree bit for bit
    syncs = [x for x in r.records(s) if x["event"] == "sync"]
    assert len(syncs) == steps // 2 and all(x["members"] == [0, 1, 2] for x in syncs)


def test_kill_mid_inner_phase_then_restart_heals(run):
  steps = 48
  r = run(steps, ["--step_sleep=0.1"], join_timeout=10.0)
  for s in range(2):  # they wait after step 20 for the restarted slice 2
    r.start(s, r.hold(20))
  r.start(2)
  r.wait_for(lambda: any(x["event"] == "step" and x["step"] >= 7 for x in r.records(2)),
             90, "slice 2 to reach step 7")
  r.kill(2)
  killed_at = max(x["step"] for x in r.records(2) if x["event"] == "step")
  r.start(2)  # the same command: it heals from a live peer
  r.release_when_restarted(2, 90)
  assert r.wait(150) == {0: 0, 1: 0, 2: 0}
  recs = [r.records(s) for s in range(3)]
  # the survivors kept syncing without slice 2, each wait bounded by the timeout
  alone = [x for x in recs[0] if x["event"] == "sync" and x["members"] == [0, 1]]
  assert alone and alone[0]["step"] <= killed_at + 4
  assert max(x["wait_s"] for x in alone) < HEARTBEAT + 1.5
  heals = [x for x in recs[2] if x["event"] == "heal"]
  assert len(heals) == 1 and heals[0]["step"] > killed_at
  healed_at = heals[0]["step"]
  # from the heal on, slice 2's θ̃ is the survivors', bit for bit, at every step
  s0, s2 = by_step(recs[0]), by_step(recs[2])
  later = [t for t in s2 if t > healed_at]
  assert later
  for t in later:
    assert s2[t]["outer"] == s0[t]["outer"] == by_step(recs[1])[t]["outer"], t
  rejoined = [x for x in recs[0] if x["event"] == "sync" and x["step"] > healed_at]
  assert rejoined and all(x["members"] == [0, 1, 2] for x in rejoined)
  # the healing slice joins the leaders' commit quorum: nobody waits out the
  # 10 s join timeout for it; it compiled every program before it asked to
  # join (warm-up), so neither its heal nor any round compiles anything
  assert max(x["wait_s"] for x in recs[0] if x["event"] == "sync" and x["step"] > 4) < 6.0
  assert [x["compiles_after_join"] for rec in recs for x in rec if x["event"] == "done"
          ] == [0, 0, 0]
  for k, v in r.outer(0).items():
    np.testing.assert_array_equal(r.outer(2)[k], v)
    np.testing.assert_array_equal(r.outer(1)[k], v)
  done = by_step(recs[2], "done")[steps]
  assert done["bytes"]["heal_received"] > 0
