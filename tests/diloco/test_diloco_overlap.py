"""Streaming DiLoCo with τ >= 1: the exchange started after step t runs in step
t + 1's program, fused with its inner step (streaming_diloco, Programs). The
same values as the unfused algorithm, one program holding the all-gather and
the model's matmuls, and an exact resume from a checkpoint after a sync step."""

import functools
import re

import jax
import numpy as np

from posttrain_jax.core import partitioning
from posttrain_jax.core.checkpointing import Checkpointer
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco.trainer import DiLoCoTrainer
from posttrain_jax.models import Transformer

from test_diloco_exchange import collectives, outer_hlo
from test_streaming_diloco import CFG, B, T, close, lm, make_batch

# H = 4, two fragments, offsets 0 and 2, τ = 1: fragment 1 syncs after steps 2
# and 6 (applied after 3, 7), fragment 0 after 4 and 8 (applied after 5, 9);
# 9 steps = every fragment synced and applied twice, nothing pending at the end.
CONFIG = sd.DiLoCoConfig(num_replicas=2, sync_every=4, num_fragments=2, overlap=1,
                         alpha=0.5, outer_lr=0.7, quantization="fp4_e3m0")
STEPS = 9
# host step s (= steps done) -> mask of the exchanges started after step s + 1:
# replica 1 dropped from fragment 0's first exchange, replica 0 from fragment 1's
# second one
MASKS = {3: [1, 0], 5: [0, 1]}


def batches():
  return [make_batch(100 + s) for s in range(STEPS)]


def run_algo(fuse: bool):
  """Unsharded StreamingDiLoCo: per step (losses, θ̃, replica params,
  inflight), and the algo."""
  state0, step, _ = lm("adamw")
  algo = sd.StreamingDiLoCo(CONFIG, step, state0.params, fuse_exchange=fuse)
  s, history = algo.init(state0), []
  for t, batch in enumerate(batches()):
    s, metrics = algo.train_step(s, sd.split_replicas(batch, 2), t, MASKS.get(t))
    history.append(jax.device_get((metrics["loss_per_replica"], s.outer_params,
                                   s.replicas.params, s.inflight)))
  return algo, history


@functools.cache
def unfused():
  return run_algo(False)


@functools.cache
def trainer_for(fuse: bool = True):
  mesh = partitioning.create_mesh({"fsdp": 2, "tensor": 2}, {"replica": 2})
  schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
  return DiLoCoTrainer(Transformer(CFG), tx, schedule, mesh, CONFIG, fuse_exchange=fuse)


@functools.cache
def unfused_trainer_run():
  """The unfused sharded trainer: per step (losses, θ̃, replica params, inflight)."""
  trainer = trainer_for(False)
  state, history = trainer.init_state(jax.random.key(0)), []
  for t, batch in enumerate(batches()):
    state, metrics = trainer.train_step(state, trainer.shard_batch(batch), t,
                                        MASKS.get(t))
    history.append(jax.device_get((metrics["loss_per_replica"], state.outer_params,
                                   state.replicas.params, state.inflight)))
  assert any(k[0] == "outer" and k[1].sync for k in trainer.algo.dispatches)
  return history


def pending(algo, t):
  """Fragments whose exchange, started after host step t, is still to run."""
  return algo.event(t).sync if algo.fused else ()


def test_programs_defer_only_the_exchanges_when_tau_is_positive():
  state0, step, _ = lm("adamw")
  algo = sd.StreamingDiLoCo(CONFIG, step, state0.params)
  assert algo.programs(0) == ((), fr.Event())
  assert algo.event(1) == fr.Event(sync=(1,))
  assert algo.programs(1) == ((), fr.Event())        # step 2: exchange deferred
  assert algo.programs(2) == ((1,), fr.Event(apply=(1,)))  # step 3: fused + apply
  assert algo.programs(3) == ((), fr.Event())
  assert algo.programs(4) == ((0,), fr.Event(apply=(0,)))
  unfused_algo = sd.StreamingDiLoCo(CONFIG, step, state0.params, fuse_exchange=False)
  assert unfused_algo.programs(1) == ((), fr.Event(sync=(1,)))
  tau0 = sd.StreamingDiLoCo(sd.DiLoCoConfig(**{**CONFIG.__dict__, "overlap": 0}),
                            step, state0.params)
  assert not tau0.fused and tau0.programs(3) == ((), fr.Event(sync=(0,), apply=(0,)))


def test_fused_exchange_is_bit_identical_to_the_unfused_algorithm():
  """Unsharded, τ = 1, a dropped replica in two exchanges: the same bits at
  every step; only the in-flight Δ of a fragment whose exchange is deferred
  lags (it still holds the previous exchange's) until the next step."""
  algo, got = run_algo(True)
  ref_algo, want = unfused()
  for t in range(STEPS):
    loss, outer, replicas, inflight = got[t]
    ref_loss, ref_outer, ref_replicas, ref_inflight = want[t]
    np.testing.assert_array_equal(loss, ref_loss)
    close(outer, ref_outer, rtol=0, atol=0)
    close(replicas, ref_replicas, rtol=0, atol=0)
    for p in range(len(algo.fragments)):
      if p in pending(algo, t):  # the previous exchange's Δ_p (zeros at first)
        close(inflight[p], got[t - 1][3][p], rtol=0, atol=0)
        assert not np.array_equal(jax.tree.leaves(inflight[p]["delta"])[0],
                                  jax.tree.leaves(ref_inflight[p]["delta"])[0])
      else:
        close(inflight[p], ref_inflight[p], rtol=0, atol=0)
  assert not pending(algo, STEPS - 1)
  # the masks reached their exchanges: one participant each
  assert float(want[3][3][0]["count"]) == float(got[4][3][0]["count"]) == 1.0
  assert float(want[5][3][1]["count"]) == float(got[6][3][1]["count"]) == 1.0
  assert float(got[8][3][0]["count"]) == 2.0
  # programs: exchanges only inside fused ones; outer programs apply only
  assert set(algo.dispatches) == {
      ("inner",), ("fused", (0,)), ("fused", (1,)), ("outer", fr.Event(apply=(0,))),
      ("outer", fr.Event(apply=(1,)))}
  assert algo.dispatches[("fused", (0,))] == algo.dispatches[("fused", (1,))] == 2
  assert any(k[0] == "outer" and k[1].sync for k in ref_algo.dispatches)


def test_fused_trainer_matches_unfused_algorithm_and_resumes_after_a_sync_step(
    tmp_path):
  """The sharded trainer (replica axis 2, FP4 codes all-gathered over it) over
  two windows with dropped replicas: fused (each exchange inside the next
  step's program) against unfused (its own outer program after its step), bit
  for bit; and a checkpoint written right after a sync step (fragment 0's
  exchange of step 4 deferred, replica 1 dropped from it) restored into a new
  trainer (a new process: the mask is given again) continues bit for bit.
  (Against the unsharded reference the FP4 codes of a few elements may flip
  over 9 steps: test_sharded_trainer_matches_unsharded covers 2 steps.)"""
  trainer = trainer_for(True)
  want = unfused_trainer_run()
  state = trainer.init_state(jax.random.key(0))
  ckpt = Checkpointer(str(tmp_path), save_every_steps=1, async_save=False)
  data = [trainer.shard_batch(b) for b in batches()]
  for t in range(STEPS):
    state, metrics = trainer.train_step(state, data[t], t, MASKS.get(t))
    loss, outer, replicas, inflight = want[t]
    np.testing.assert_array_equal(np.asarray(metrics["loss_per_replica"]), loss)
    close(state.outer_params, outer, rtol=0, atol=0)
    close(state.replicas.params, replicas, rtol=0, atol=0)
    for p in range(2):
      if p not in pending(trainer.algo, t):
        close(state.inflight[p], inflight[p], rtol=0, atol=0)
    if t == 3:  # after step 4: fragment 0's exchange is deferred
      assert trainer.algo.programs(4)[0] == (0,)
      ckpt.save(4, state, {"train": 4})
  full = jax.device_get(state)
  assert set(trainer.algo.dispatches) == {
      ("inner",), ("fused", (0,)), ("fused", (1,)), ("outer", fr.Event(apply=(0,))),
      ("outer", fr.Event(apply=(1,)))}

  again = DiLoCoTrainer(trainer.trainer.model, trainer.trainer.tx,
                        trainer.trainer.schedule, trainer.mesh, CONFIG)
  resumed, _ = ckpt.restore(4, again.abstract_state)
  ckpt.close()
  again.algo.defer_participation(3, MASKS[3])
  for t in range(4, STEPS):
    resumed, _ = again.train_step(resumed, data[t], t, MASKS.get(t))
  close(jax.device_get(resumed), full, rtol=0, atol=0)


def _replica_groups(line: str) -> list[list[int]]:
  """The device groups of one HLO collective: explicit `{{0,1},{2,3}}` or iota
  `[G,S]<=[dims]` / `[G,S]<=[dims]T(perm)` form."""
  explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
  if explicit:
    return [[int(x) for x in g.split(",") if x]
            for g in re.findall(r"\{([\d,]*)\}", explicit[1])]
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  assert iota, f"no replica_groups in {line}"
  shape = [int(x) for x in iota[1].split(",")]
  dims = [int(x) for x in iota[2].split(",")]
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  if iota[3]:
    ids = ids.transpose([int(x) for x in iota[3].split(",")])
  return ids.reshape(shape).tolist()


def test_fused_program_holds_the_fp4_all_gather_and_the_inner_step():
  """The compiled program of step 5 (fragment 0's exchange of step 4 pending)
  on mesh {replica: 2, fsdp: 2, tensor: 2}: u8 all-gathers over the replica
  groups and the model's matmuls in one HLO module; the plain inner program
  (step 4) has no u8 all-gather, and the apply-only outer program after step 5
  no all-gather of codes (the exchange is not in it)."""
  trainer = trainer_for(True)
  mesh, m = trainer.mesh, CONFIG.num_replicas
  axis = mesh.axis_names.index("replica")
  groups = np.moveaxis(np.vectorize(lambda d: d.id)(mesh.devices), axis, -1).reshape(-1, m)
  replica_groups = "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in groups) + "}"

  def u8_gathers(hlo):
    return [line for op, arrays, line in collectives(hlo)
            if op == "all-gather" and arrays and all(d == "u8" for d, _ in arrays)]

  assert trainer.algo.programs(4) == ((0,), fr.Event(apply=(0,)))
  fused = trainer.lower_step(4, B, T).compile().as_text()
  gathers = u8_gathers(fused)
  # one u8 all-gather per tensor over the replica groups (the DCN exchange);
  # the chips of one replica that hold the same shard each send a 1/n piece,
  # and the u8 all-gathers that complete those pieces stay inside a replica
  over_replica = [line for line in gathers if f"replica_groups={replica_groups}" in line]
  assert len(over_replica) == len(trainer.fragments[0].selectors)
  replica_of = {d.id: idx[axis] for idx, d in np.ndenumerate(mesh.devices)}
  for line in gathers:
    if line not in over_replica:
      for group in _replica_groups(line):
        assert len({replica_of[d] for d in group}) == 1, line
  dots = [line for line in fused.splitlines() if re.search(r"\b(dot|convolution)\(", line)]
  assert dots, "no matmul of the inner step in the fused program"
  inner = trainer.lower_step(3, B, T).compile().as_text()
  assert not u8_gathers(inner)
  assert [l for l in inner.splitlines() if re.search(r"\b(dot|convolution)\(", l)]
  assert not u8_gathers(outer_hlo(trainer, fr.Event(apply=(0,))))
