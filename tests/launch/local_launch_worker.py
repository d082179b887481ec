"""One process of a launch/local.py run (used by tests/launch/test_local_launch.py).

usage: python local_launch_worker.py train STEPS
       python local_launch_worker.py fail FAILING_PROCESS_ID PID_DIR

Implements the launcher's environment contract the way the training binary
must (docs/launch.md): POSTTRAIN_JAX_COORDINATOR / _NUM_PROCESSES /
_PROCESS_ID -> jax.distributed.initialize before any other JAX use, and a
failing process leaves with os._exit so that it does not wait in the
distributed shutdown barrier for processes that are still working.

train: a (replica=2 over DCN, fsdp) hybrid mesh, STEPS Trainer steps; prints
  one JSON line {"process", "count", "losses", "replica_processes"}.
fail: every process initialises; FAILING_PROCESS_ID exits with status 3, the
  others write PID_DIR/p<i>.pid and sleep (the launcher must stop them).
"""

import json
import os
import sys
import time
import traceback


def initialize_from_env():
  """Returns (process_id, num_processes) after jax.distributed.initialize."""
  import jax  # pylint: disable=g-import-not-at-top
  coordinator = os.environ.get("POSTTRAIN_JAX_COORDINATOR")
  if coordinator:
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ["POSTTRAIN_JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["POSTTRAIN_JAX_PROCESS_ID"]))
  return jax.process_index(), jax.process_count()


def train(steps):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from posttrain_jax.core import partitioning  # pylint: disable=g-import-not-at-top
  from posttrain_jax.core.optimizer import OptimizerConfig  # pylint: disable=g-import-not-at-top
  from posttrain_jax.core.trainer import Trainer  # pylint: disable=g-import-not-at-top
  from posttrain_jax.models import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top

  pid, nproc = initialize_from_env()
  cfg = ModelConfig(vocab_size=64, embed_dim=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_dim=32, sliding_window_size=4)
  mesh = partitioning.create_mesh({"fsdp": -1}, {"replica": 2})
  schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
  trainer = Trainer(Transformer(cfg), tx, schedule, mesh)
  state = trainer.init_state(jax.random.key(0))
  B, T = 4, 8
  rows = slice(pid * B // nproc, (pid + 1) * B // nproc)
  losses = []
  for step in range(steps):
    tokens = np.random.default_rng(step).integers(3, 64, (B, T + 1)).astype(np.int32)
    batch = dict(decoder_input_tokens=tokens[:, :-1],
                 decoder_target_tokens=tokens[:, 1:],
                 decoder_loss_weights=np.ones((B, T), np.float32),
                 decoder_segment_ids=np.ones((B, T), np.int32),
                 decoder_positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))
    local = {k: v[rows] for k, v in batch.items()}
    state, metrics = trainer.train_step(state, trainer.shard_batch(local))
    losses.append(float(metrics["loss"]))
  replicas = [sorted({d.process_index for d in mesh.devices[r].flat})
              for r in range(mesh.shape["replica"])]
  print(json.dumps({"process": pid, "count": nproc, "losses": losses,
                    "replica_processes": replicas}), flush=True)


def fail(failing, pid_dir):
  pid, _ = initialize_from_env()
  if pid == failing:
    print(f"process {pid}: failing on purpose", flush=True)
    raise SystemExit(3)
  with open(os.path.join(pid_dir, f"p{pid}.pid"), "w") as f:
    f.write(str(os.getpid()))
  print(f"process {pid}: waiting", flush=True)
  time.sleep(600)


def main(argv):
  if argv[0] == "train":
    train(int(argv[1]))
  elif argv[0] == "fail":
    fail(int(argv[1]), argv[2])
  else:
    raise SystemExit(f"unknown mode {argv[0]}")


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except BaseException as e:  # pylint: disable=broad-except
    code = e.code if isinstance(e, SystemExit) else 1
    if code not in (0, None):
      if not isinstance(e, SystemExit):
        traceback.print_exc()
      sys.stdout.flush()
      sys.stderr.flush()
      # Skip jax.distributed's shutdown barrier: it would wait for the
      # processes that are still running.
      os._exit(code if isinstance(code, int) else 1)
    raise
