"""A tiny regression task for elastic DiLoCo runs on CPU (tests, the demo).

An L-layer tanh MLP of width D (top-level `layer_{i}` entries, so
`fragments.make_fragments` splits it by layer) learns a fixed random teacher
of the same shape by mean squared error. Slice s's batch of inner step t is
drawn from a generator seeded by (seed, s, t): a slice's data depend only on
its id and the step, so a restarted or healed slice reads the rows it would
have read, and the SPMD reference gets replica m's rows = slice m's batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax.core.trainer import TrainState


def init_params(seed: int, layers: int, width: int) -> dict:
  rng = np.random.default_rng(seed)
  return {f"layer_{i}": {"w": (rng.normal(size=(width, width)) / np.sqrt(width)
                               ).astype(np.float32),
                         "b": np.zeros((width,), np.float32)} for i in range(layers)}


def forward(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


def batch(seed: int, slice_id: int, step: int, rows: int, width: int,
          teacher_seed: int = 1234, layers: int = 4) -> dict:
  """Slice `slice_id`'s batch of inner step `step`: {"x", "y"} float32."""
  x = np.random.default_rng([seed, slice_id, step]).normal(size=(rows, width))
  x = x.astype(np.float32)
  y = np.asarray(_teacher(teacher_seed, layers, width)(x))
  return {"x": x, "y": y}


@functools.lru_cache(maxsize=4)
def _teacher(seed: int, layers: int, width: int):
  params = init_params(seed, layers, width)
  return jax.jit(lambda x: forward(params, x))


def loss_fn(params, b):
  return jnp.mean((forward(params, b["x"]) - b["y"]) ** 2)


def optimizer(learning_rate: float) -> optax.GradientTransformation:
  return optax.adam(learning_rate)


def inner_state(params, tx: optax.GradientTransformation, step: int = 0) -> TrainState:
  return TrainState(jnp.asarray(step, jnp.int32), jax.tree.map(jnp.asarray, params),
                    tx.init(jax.tree.map(jnp.asarray, params)))


def make_inner_step(tx: optax.GradientTransformation):
  """Pure (TrainState, batch) -> (TrainState, {"loss", "tokens"})."""
  def step(state: TrainState, b):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, b)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
            {"loss": loss, "tokens": jnp.asarray(b["x"].shape[0], jnp.float32)})
  return step
