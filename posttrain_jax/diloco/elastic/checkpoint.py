"""Checkpoints of elastic Streaming DiLoCo (orbax, via core.checkpointing).

The outer state (θ̃, outer optimizer state, in-flight Δ) is one for all
slices: after a checkpointed sync the round's *leader* (the lowest slice id
among its committers, the same for every survivor) writes it to
DIR/outer/<step>. Each slice writes its own inner state (its replica: params
and inner optimizer state) to DIR/slice<s>/<step>; its data position is the
step itself (a slice's batch depends on (slice, step) only). Checkpoints are
taken after the syncs whose step is a multiple of `every`.

When every slice died, the restarted slices resume from the newest outer
step: a slice that has its own inner state at that step restores it (the
resumed run is then the uninterrupted one, bit for bit), one without it
starts from θ̃ with a fresh inner optimizer (as a healed slice).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import serialization

from posttrain_jax.core.checkpointing import Checkpointer
from posttrain_jax.diloco import streaming_diloco as sd


def _abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                                     sharding=device), tree)


def outer_tree(state: sd.DiLoCoState) -> dict:
  return serialization.to_state_dict({"outer_params": state.outer_params,
                                      "outer_opt_state": state.outer_opt_state,
                                      "inflight": state.inflight})


class ElasticCheckpoints:
  """DIR/outer (leader) and DIR/slice<s> (this slice), every `every` steps."""

  def __init__(self, directory: str, slice_id: int, every: int, max_to_keep: int = 3):
    if every < 1:
      raise ValueError(f"checkpoint every must be >= 1 step, got {every}.")
    self.every = every
    kw = dict(save_every_steps=1, max_to_keep=max_to_keep, async_save=False)
    self.outer = Checkpointer(os.path.join(directory, "outer"), **kw)
    self.inner = Checkpointer(os.path.join(directory, f"slice{slice_id}"), **kw)

  def due(self, step: int) -> bool:
    return step > 0 and step % self.every == 0

  def save(self, step: int, state: sd.DiLoCoState, leader: bool) -> None:
    if leader:
      self.outer.save(step, outer_tree(state), force=True)
    self.inner.save(step, serialization.to_state_dict(state.replicas), force=True)

  def restore(self, state: sd.DiLoCoState, init_inner) -> tuple[sd.DiLoCoState, bool] | None:
    """(state at the newest outer step, whether this slice's inner state was
    there too), or None without an outer checkpoint."""
    step = self.outer.latest_step()
    if step is None:
      return None
    saved, _ = self.outer.restore(step, _abstract(outer_tree(state)))
    outer = serialization.from_state_dict(
        {"outer_params": state.outer_params, "outer_opt_state": state.outer_opt_state,
         "inflight": state.inflight}, saved)
    exact = step in self.inner.all_steps()
    if exact:
      inner, _ = self.inner.restore(step, _abstract(
          serialization.to_state_dict(state.replicas)))
      replicas = serialization.from_state_dict(state.replicas, inner)
    else:
      replicas = jax.tree.map(lambda x: jnp.asarray(x)[None],
                              init_inner(outer["outer_params"], step))
    return sd.DiLoCoState(jnp.asarray(step, jnp.int32), replicas, outer["outer_params"],
                          outer["outer_opt_state"], outer["inflight"]), exact

  def close(self) -> None:
    self.outer.close()
    self.inner.close()
