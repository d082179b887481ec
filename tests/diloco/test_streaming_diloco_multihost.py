"""Streaming DiLoCo with one jax.distributed process per replica matches one process."""

import numpy as np

import jax_processes  # pylint: disable=g-bad-import-order


def test_one_process_per_replica_matches_single_process():
  multi, single = jax_processes.run_two_and_one("diloco_multihost_worker.py")
  assert multi["mesh"] == single["mesh"] == {"replica": 2, "data": 1, "fsdp": 4,
                                             "tensor": 1}
  assert multi["replica_processes"] == [[0], [1]]  # each replica is one process
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=2e-5)
  assert multi["outer_sums"].keys() == single["outer_sums"].keys()
  assert any("inflight0" in k for k in single["outer_sums"])
  for k, v in single["outer_sums"].items():
    np.testing.assert_allclose(multi["outer_sums"][k], v, rtol=1e-4, err_msg=k)
