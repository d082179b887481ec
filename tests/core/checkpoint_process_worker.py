"""One process of a local multi-process checkpoint round trip (tests/core/test_checkpoint_processes.py).

usage: python checkpoint_process_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS
with CHECKPOINT_DIR set. Saves steps 1 and 2 of an array sharded over every
process with a different data state per process, restores the newest, and
prints one JSON line: this process's restored step, data state and array sum.
"""

import json
import os
import sys

pid, nproc, port, ndev = map(int, sys.argv[1:5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

if nproc > 1:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid)

from posttrain_jax.core.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
rows = 4 * len(jax.devices())


def state(step):
  values = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) * step
  return {"w": jax.make_array_from_callback(values.shape, sharding, lambda i: values[i])}


directory = os.environ["CHECKPOINT_DIR"]
ckpt = Checkpointer(directory, save_every_steps=1)
for step in (1, 2):  # each process reads its own shard of the input
  ckpt.save(step, state(step), {"shard": pid, "batches_consumed": 10 * step + pid})
ckpt.close()

ckpt = Checkpointer(directory, save_every_steps=1)
abstract = {"w": jax.ShapeDtypeStruct((rows, 3), np.float32, sharding=sharding)}
step, restored, data = ckpt.restore_latest(abstract)
total = float(jax.jit(lambda w: w.sum(), out_shardings=jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec()))(restored["w"]).addressable_data(0))
ckpt.close()
print(json.dumps({"step": step, "data": data, "sum": total}), flush=True)
if nproc > 1:
  jax.distributed.shutdown()
