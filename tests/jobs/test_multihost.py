"""Two local jax.distributed processes (one per "slice") train like one process."""

import numpy as np

import jax_processes  # pylint: disable=g-bad-import-order


def test_two_process_hybrid_mesh_matches_single_process():
  multi, single = jax_processes.run_two_and_one("multihost_worker.py")
  assert multi["mesh"] == single["mesh"] == {"replica": 2, "data": 1, "fsdp": 4,
                                             "tensor": 1}
  # create_hybrid_device_mesh: each replica (slice) is one process's devices
  assert multi["replica_processes"] == [[0], [1]]
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=2e-5)
