"""One process of a local multi-process Streaming DiLoCo run (used by
tests/diloco/test_streaming_diloco_multihost.py).

usage: python diloco_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS
Prints one JSON line: per-replica losses of three steps, per-leaf sums of the
outer params and of the in-flight pseudo-gradient, and which processes hold each replica.
"""

import json
import os
import sys

pid, nproc, port, ndev = map(int, sys.argv[1:5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

if nproc > 1:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid)

from posttrain_jax.core import partitioning  # pylint: disable=g-import-not-at-top
from posttrain_jax.core.optimizer import OptimizerConfig  # pylint: disable=g-import-not-at-top
from posttrain_jax.diloco import streaming_diloco as sd  # pylint: disable=g-import-not-at-top
from posttrain_jax.diloco.trainer import DiLoCoTrainer  # pylint: disable=g-import-not-at-top
from posttrain_jax.models import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top

cfg = ModelConfig(vocab_size=64, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)
mesh = partitioning.create_mesh({"fsdp": -1}, {"replica": 2})
schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
config = sd.DiLoCoConfig(num_replicas=2, sync_every=2, num_fragments=2, overlap=1,
                         alpha=0.5, outer_lr=0.7, quantization="fp4_e3m0")
trainer = DiLoCoTrainer(Transformer(cfg), tx, schedule, mesh, config)
state = trainer.init_state(jax.random.key(0))

B, T = 8, 8
rows = slice(pid * B // nproc, (pid + 1) * B // nproc)
losses = []
# t=1: fragment 1 starts its exchange; t=2: fragment 0 starts, 1 applied; t=3:
# 0 applied, 1 starts (τ = 1: each exchange runs in the next step's program)
for step in range(3):
  tokens = np.random.default_rng(step).integers(0, 64, (B, T + 1)).astype(np.int32)
  batch = dict(decoder_input_tokens=tokens[:, :-1], decoder_target_tokens=tokens[:, 1:],
               decoder_loss_weights=np.ones((B, T), np.float32))
  local = {k: v[rows] for k, v in batch.items()}
  state, metrics = trainer.train_step(state, trainer.shard_batch(local), step)
  losses.append(np.asarray(metrics["loss_per_replica"].addressable_data(0)).tolist())

# both fragments have been applied to θ̃; fragment 0's averaged Δ (computed in
# step 3's program, fused with its inner step) is the one just applied
sums = jax.jit(lambda t: jax.tree.map(lambda x: jnp.sum(jnp.abs(x)), t),
               out_shardings=partitioning.replicated(mesh))(
                   {"outer": state.outer_params, "inflight0": state.inflight[0]["delta"]})
sums = {jax.tree_util.keystr(path): float(x.addressable_data(0))
        for path, x in jax.tree_util.tree_flatten_with_path(sums)[0]}
replicas = [sorted({d.process_index for d in mesh.devices[r].flat})
            for r in range(mesh.shape["replica"])]
if pid == 0:
  print(json.dumps({"losses": losses, "outer_sums": sums, "replica_processes": replicas,
                    "mesh": dict(mesh.shape)}), flush=True)
if nproc > 1:
  jax.distributed.shutdown()
