"""tools/simulate_compute_utilization.py: monotonicity, ordering, the paper's
orders of magnitude (Douillard et al. 2025, arXiv 2501.18512, Table 4)."""

import importlib.util
import math
import os
import sys

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "tools", "simulate_compute_utilization.py")
_spec = importlib.util.spec_from_file_location("simulate_compute_utilization", _PATH)
sim = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sim  # dataclasses look their module up
_spec.loader.exec_module(sim)

SMALL = sim.Setup(params=1e9, layers=24, step_time=0.1, sync_every=12)


@pytest.mark.parametrize("method", sim.METHODS)
def test_utilization_rises_with_bandwidth_to_one(method):
  cu = [sim.simulate(SMALL, method, b) for b in sim.BANDWIDTHS[::4]]
  assert all(0 < c <= 1 + 1e-9 for c in cu)
  assert all(b >= a - 1e-12 for a, b in zip(cu, cu[1:]))
  assert sim.simulate(SMALL, method, 1e6) > 0.99


def test_no_communication_limit_is_analytic():
  # vanilla DiLoCo: the whole bf16 model through one link every H steps, blocking
  s = SMALL
  gbps = 10.0
  comm = 2 * (s.replicas - 1) / s.replicas * s.params * 16 / (gbps * 1e9)
  expected = s.sync_every * s.step_time / (s.sync_every * s.step_time + comm)
  # the next forward only waits for layer 0 to arrive first, then pipelines
  assert sim.simulate(s, "diloco", gbps) == pytest.approx(expected, rel=0.02)


def test_table_ordering_and_orders_of_magnitude():
  result = sim.table(sim.CASES)
  for name, rows in result.items():
    for m in sim.METHODS:
      needed = rows[m]
      assert all(np.isfinite(needed)), (name, m)
      assert needed == sorted(needed)                    # more CU, more bandwidth
      paper = sim.PAPER[name][m]
      for ours, theirs in zip(needed, paper):            # same order of magnitude
        assert abs(math.log10(ours / theirs)) < 0.5, (name, m, needed, paper)
    for k in range(len(sim.TARGETS)):                    # DP > DiLoCo > streaming
      assert rows["data_parallel"][k] > rows["diloco"][k] >= rows["streaming_fp4"][k]
    assert rows["data_parallel"][0] / rows["streaming_fp4"][0] > 100


def test_kaplan_step_time():
  # 6 N D FLOPs at 60% of 1 PFLOP/s: 1e9 params x 1e5 tokens -> 1 s
  assert sim.kaplan_step_time(1e9, 1e5, 1, 1e15) == pytest.approx(1.0)
