"""Runs one slice of elastic Streaming DiLoCo on the toy regression task.

  python -m posttrain_jax.diloco.elastic.run_slice --slice=0 --num_slices=3 \\
      --lighthouse=http://127.0.0.1:29510 --out_dir=runs/elastic

(`launch/local.py --elastic_slices=N` starts the Lighthouse and N of these.)
A restarted slice runs the same command: it heals from a live peer.
Writes OUT_DIR/slice{S}.jsonl (one line per inner step, sync, heal, and a
final line with the bytes moved and the compiles after joining) and
OUT_DIR/slice{S}_outer.npz (final θ̃). SIGTERM (or SIGINT): the slice stops
after its next sync, checkpointing it with --checkpoint_dir, writes a
"preempted" line and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time

import jax
import numpy as np

from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco.elastic import checkpoint as ec
from posttrain_jax.diloco.elastic import membership as mb
from posttrain_jax.diloco.elastic import slice as es
from posttrain_jax.diloco.elastic import toy
from posttrain_jax.diloco.elastic import wire


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  a = p.add_argument
  a("--slice", type=int, required=True)
  a("--num_slices", type=int, required=True)
  a("--lighthouse", required=True, help="the Lighthouse's address (http://host:port)")
  a("--out_dir", required=True)
  a("--steps", type=int, default=24)
  a("--sync_every", type=int, default=4)
  a("--num_fragments", type=int, default=2)
  a("--overlap", type=int, default=1)
  a("--alpha", type=float, default=0.5)
  a("--outer_lr", type=float, default=0.7)
  a("--outer_momentum", type=float, default=0.9)
  a("--quantization", default="fp4_e3m0")
  a("--inner_lr", type=float, default=3e-3)
  a("--layers", type=int, default=4)
  a("--width", type=int, default=16)
  a("--rows", type=int, default=16)
  a("--seed", type=int, default=0)
  a("--weight_by_tokens", action="store_true")
  a("--wait_for", type=int, default=None)
  a("--exchange_timeout", type=float, default=5.0)
  a("--quorum_timeout", type=float, default=60.0)
  a("--heal_timeout", type=float, default=60.0)
  a("--heartbeat_every", type=float, default=0.1)
  a("--step_sleep", type=float, default=0.0,
    help="seconds of sleep per inner step (a longer inner phase, for failure drills)")
  a("--hold_step", type=int, default=-1,
    help="after this inner step, wait until --hold_file exists (failure drills: "
         "the survivors wait for a restarted slice's start-up, heartbeating)")
  a("--hold_file", default=None)
  a("--checkpoint_dir", default=None, help="orbax checkpoints (elastic/checkpoint.py)")
  a("--checkpoint_every", type=int, default=8)
  a("--fault", choices=("none", "hang", "die", "partial"), default="none",
    help="failure drill at the exchange of --fault_step: hang (to be killed from "
         "outside), die (withdraw the codes and kill -9 itself before peers pull) "
         "or partial (let one peer pull the codes, then kill -9 itself)")
  a("--fault_step", type=int, default=0, help="the drill hits the first exchange "
    "at or after this step")
  return p.parse_args(argv)


def diloco_config(args) -> sd.DiLoCoConfig:
  return sd.DiLoCoConfig(num_replicas=args.num_slices, sync_every=args.sync_every,
                         num_fragments=args.num_fragments, overlap=args.overlap,
                         alpha=args.alpha, outer_lr=args.outer_lr,
                         outer_momentum=args.outer_momentum,
                         quantization=args.quantization)


_LAST_DIGEST: list = [(), ""]  # (leaves, digest) of the last tree hashed


def digest(tree) -> str:
  """A short sha256 of the tree's values. θ̃ changes only at outer steps, and
  every log line of a step carries it: the same arrays (by identity) are
  hashed once."""
  leaves = tuple(jax.tree.leaves(tree))
  last, value = _LAST_DIGEST
  if len(leaves) == len(last) and all(a is b for a, b in zip(leaves, last)):
    return value
  h = hashlib.sha256()
  for leaf in jax.device_get(leaves):
    h.update(np.ascontiguousarray(leaf).tobytes())
  _LAST_DIGEST[:] = [leaves, h.hexdigest()[:16]]
  return _LAST_DIGEST[1]


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """{"a/b/c": host array} of a tree (the slices' *_outer.npz files)."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def main(argv=None) -> int:
  args = parse(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  log_path = os.path.join(args.out_dir, f"slice{args.slice}.jsonl")
  out = open(log_path, "a", buffering=1)

  def emit(**rec):
    rec.update(slice=args.slice, time=time.time(), pid=os.getpid())
    out.write(json.dumps(rec) + "\n")

  tx = toy.optimizer(args.inner_lr)
  params = toy.init_params(args.seed, args.layers, args.width)
  inner = toy.make_inner_step(tx)
  peer = wire.PeerServer()
  say = lambda s: print(f"[slice {args.slice}] {s}", file=sys.stderr, flush=True)
  stop = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop.append(signum))
  members = mb.Membership(args.lighthouse, f"slice{args.slice:03d}",
                          heartbeat_every=args.heartbeat_every,
                          connect_timeout=args.quorum_timeout, log=say)
  elastic = es.ElasticConfig(args.slice, args.num_slices, args.weight_by_tokens,
                             args.wait_for, args.exchange_timeout, args.quorum_timeout,
                             args.heal_timeout)
  def on_exchange(t):
    if args.fault == "none" or t < args.fault_step:
      return
    emit(event="in_exchange", step=t)
    if args.fault in ("die", "partial"):
      if args.fault == "die":
        peer.withdraw_payloads(t)
      else:  # the first peer to pull gets the codes, the others do not
        peer.serve_once(t)
      time.sleep(0.5)  # the peers are now pulling (or waiting for) the codes
      os.kill(os.getpid(), signal.SIGKILL)
    pulls = 0
    while True:  # hang: log each payload the peers pull, until killed
      if peer.pulls[t] != pulls:
        pulls = peer.pulls[t]
        emit(event="pulled", step=t, pulls=pulls)
      time.sleep(0.05)

  checkpoints = (ec.ElasticCheckpoints(args.checkpoint_dir, args.slice,
                                       args.checkpoint_every)
                 if args.checkpoint_dir else None)
  algo = es.ElasticSlice(diloco_config(args), inner, params,
                         lambda p, step: toy.inner_state(p, tx, step), members, peer,
                         elastic, log=say, on_exchange=on_exchange,
                         checkpoints=checkpoints, should_stop=lambda: bool(stop),
                         on_join=lambda t, secs: emit(event="joining", step=t, warm_s=secs))
  state = algo.init(toy.inner_state(params, tx))
  emit(event="started")
  seen = [0]
  held_out = toy.batch(args.seed, 10**6, 0, 256, args.width, layers=args.layers)
  eval_loss = jax.jit(lambda p: toy.loss_fn(p, held_out))
  eval_loss(state.outer_params)  # compiled before joining, as the slice's programs

  def on_step(step, metrics, state):
    for r in algo.records[seen[0]:]:
      emit(event=r.kind, step=r.step, members=list(r.members), wait_s=r.wait_s,
           quorum_ids=list(r.quorum_ids), dropped=list(r.dropped),
           outer=digest(state.outer_params))
    seen[0] = len(algo.records)
    if "loss" in metrics:
      extra = {}
      if step % args.sync_every == 0:  # θ̃ on held-out rows
        extra["eval_loss"] = float(eval_loss(state.outer_params))
      emit(event="step", step=step, loss=float(metrics["loss"]),
           outer=digest(state.outer_params), **extra)
    if args.step_sleep:
      time.sleep(args.step_sleep)
    if step == args.hold_step and args.hold_file:
      while not os.path.exists(args.hold_file):
        time.sleep(0.05)

  batch_fn = lambda t: toy.batch(args.seed, args.slice, t, args.rows, args.width,
                                 layers=args.layers)
  try:
    state = algo.run(state, batch_fn, args.steps, on_step)
    if algo.stopped_at is not None:
      emit(event="preempted", step=algo.stopped_at, signal=stop[0],
           checkpointed=checkpoints is not None)
      return 0
    np.savez(os.path.join(args.out_dir, f"slice{args.slice}_outer.npz"),
             **flat_arrays(state.outer_params))
    emit(event="done", step=int(state.step), outer=digest(state.outer_params),
         bytes=peer.bytes.as_dict(), compiles_after_join=algo.compiles_after_join)
  finally:
    if checkpoints is not None:
      checkpoints.close()
    members.close()
    peer.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
