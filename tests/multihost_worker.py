"""One process of a local multi-process run (used by tests/jobs/test_multihost.py).

usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS
Prints one JSON line: the losses of three train steps on a (replica=2, fsdp)
mesh and, per replica, the process indices of its devices.
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

from posttrain_jax.core import partitioning  # pylint: disable=g-import-not-at-top
from posttrain_jax.core.optimizer import OptimizerConfig  # pylint: disable=g-import-not-at-top
from posttrain_jax.core.trainer import Trainer  # pylint: disable=g-import-not-at-top
from posttrain_jax.models import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top

cfg = ModelConfig(vocab_size=128, embed_dim=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, mlp_dim=64, sliding_window_size=8)
mesh = partitioning.create_mesh({"fsdp": -1}, {"replica": 2})
schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
trainer = Trainer(Transformer(cfg), tx, schedule, mesh)
state = trainer.init_state(jax.random.key(0))

B, T = 8, 16
rows = slice(pid * B // nproc, (pid + 1) * B // nproc)
losses = []
for step in range(3):
  tokens = np.random.default_rng(step).integers(3, 128, (B, T + 1)).astype(np.int32)
  batch = dict(decoder_input_tokens=tokens[:, :-1], decoder_target_tokens=tokens[:, 1:],
               decoder_loss_weights=np.ones((B, T), np.float32),
               decoder_segment_ids=np.ones((B, T), np.int32),
               decoder_positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))
  local = {k: v[rows] for k, v in batch.items()}
  state, metrics = trainer.train_step(state, trainer.shard_batch(local))
  losses.append(float(metrics["loss"]))

replicas = [sorted({d.process_index for d in mesh.devices[r].flat})
            for r in range(mesh.shape["replica"])]
if pid == 0:
  print(json.dumps({"losses": losses, "replica_processes": replicas,
                    "mesh": dict(mesh.shape)}), flush=True)
if nproc > 1:
  jax.distributed.shutdown()
