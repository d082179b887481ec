"""Streaming DiLoCo's step metrics: kept per replica in the inner program
(no cross-replica, i.e. DCN, collective in the step) and averaged over the
replicas by a small program of their own (`streaming_diloco.StreamingDiLoCo`).
"""

from __future__ import annotations

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp


def replica_metric_means(metrics):
  """Per-replica metrics ([M] each) -> the logged ones: replica means
  (tokens: the sum), plus loss_per_replica. Its own small program
  (`StreamingDiLoCo.train_step`), outside the inner step."""
  out = {k: jnp.sum(v) if k == "tokens" else jnp.mean(v) for k, v in metrics.items()}
  if "loss" in metrics:
    out["loss_per_replica"] = metrics["loss"]
  return out


class InnerProgram:
  """The jitted inner program (metrics per replica, no DCN collective) and
  the small program of their replica means, dispatched after it (the
  cross-replica reduction of a few scalars; the next step's program does not
  read its result): calling it gives (step, replicas, replica_metric_means(metrics));
  `lower` lowers the inner program alone (what the compile-only audit checks)."""

  def __init__(self, inner: Callable, means: Callable | None):
    self.inner, self.means = inner, means

  def __call__(self, *args):
    step, replicas, metrics = self.inner(*args)
    return step, replicas, metrics if self.means is None else self.means(metrics)

  def lower(self, *args):
    return self.inner.lower(*args)


def inner_with_means(*args, inner):
  step, replicas, metrics = inner(*args)
  return step, replicas, replica_metric_means(metrics)


@functools.lru_cache(maxsize=1)
def jit_means():
  return jax.jit(replica_metric_means)
