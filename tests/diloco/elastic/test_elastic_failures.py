"""Elastic Streaming DiLoCo, kill -9 inside an exchange (3 local slices,
torchft's Lighthouse): the round is completed by the survivors, with the codes
they all pulled. Every slice killed: test_elastic_checkpoint.py."""

import pytest

from posttrain_jax.diloco.elastic import membership

from elastic_procs import HEARTBEAT  # pylint: disable=g-bad-import-order
from test_elastic_slice import by_step  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.skipif(not membership.available(),
                                reason="torchft (the Lighthouse) is not installed")




def test_kill_during_exchange_completes_the_round(run):
  """Slice 2 hangs inside the exchange of step 10 (its codes published) and is
  killed there: the survivors' round 10 completes with its codes. Restarted,
  it heals, then kills itself inside its first exchange after only one
  survivor pulled its codes: the survivors hold different sets of codes, and
  the commit's intersection completes the round without it, the same for
  both. No survivor waits longer than the heartbeat timeout plus the exchange
  deadline; their θ̃ agree at every step."""
  steps = 48
  r = run(steps, ["--step_sleep=0.1", "--exchange_timeout=2"])
  for s in range(2):  # they wait after step 20 for the restarted slice 2
    r.start(s, r.hold(20))
  r.start(2, ("--fault=hang", "--fault_step=10"))
  # each survivor pulls its one fragment's codes of the round (the drill's
  # configuration syncs one fragment a round)
  r.wait_for(lambda: any(x["event"] == "pulled" and x["pulls"] >= 2 for x in r.records(2)),
             90, "the survivors to pull slice 2's codes of step 10")
  r.kill(2)
  r.start(2, ("--fault=partial", "--fault_step=11"))
  r.release_when_restarted(2, 90)
  codes = r.wait(150)
  assert codes[0] == codes[1] == 0 and codes[2] != 0
  recs = [r.records(s) for s in range(3)]
  syncs = [by_step(recs[s], "sync") for s in range(2)]
  assert syncs[0][10]["members"] == [0, 1, 2]  # completed with the hung slice's codes
  died = [x["step"] for x in recs[2] if x["event"] == "in_exchange" and x["step"] > 10]
  assert len(died) == 1 and any(x["event"] == "heal" for x in recs[2])
  assert syncs[0][died[0]]["members"] == [0, 1]
  assert syncs[0][died[0]]["dropped"] == [2]
  for sy in syncs:
    assert max(x["wait_s"] for x in sy.values()) < HEARTBEAT + 2 + 1.5
  s0, s1 = by_step(recs[0]), by_step(recs[1])
  assert all(s0[t]["outer"] == s1[t]["outer"] for t in s0)
  assert max(s0) == steps
