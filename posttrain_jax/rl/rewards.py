"""Named reward functions of sampled responses (selectable from gin by name).

A reward function maps tokens [b, T] (int32, the `sampling.SampleOutput`
layout: left-padded prompt, then the response) and the response mask [b, T]
(`SampleOutput.generated_mask`) to one float32 reward per row, [b]. It gets the
global (sharded) arrays, so it should be written in JAX; host-side Python is
fine in a single process.

Built-in:
  gold    `gold_reward.gold_reward`: the project's programmatic ground truth
          (whole-word fraction near a target, lexical diversity, diminishing
          length returns); the reference for reward-hacking measurements.
  length  number of response tokens (EOS included): a trivially hackable
          reward, useful for tests and smoke runs.
  brevity exp(-n / 16) for n response tokens (EOS included): rewards short
          answers, so it conflicts with gold's length term and with any text
          property that needs tokens (the second reward of the CLP experiment,
          docs/experiments/clp.md).

`register(name, fn)` adds a user function; `get(name)` looks one up.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from posttrain_jax.rl import gold_reward

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


def length_reward(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """r(y) = number of response tokens = sum_t m_t."""
  del tokens
  return jnp.sum(mask.astype(jnp.float32), axis=-1)


BREVITY_SCALE = 16.0


def brevity_reward(tokens: jax.Array, mask: jax.Array, scale: float = BREVITY_SCALE
                   ) -> jax.Array:
  """r(y) = exp(-n / scale), n = sum_t m_t (EOS included): 1 for an empty response,
  exp(-2) ~ 0.14 at n = 32 with the default scale 16."""
  del tokens
  return jnp.exp(-jnp.sum(mask.astype(jnp.float32), axis=-1) / scale)


_REGISTRY: dict[str, RewardFn] = {
    "gold": jax.jit(gold_reward.gold_reward),
    "length": jax.jit(length_reward),
    "brevity": jax.jit(brevity_reward),
}


def register(name: str, fn: RewardFn) -> None:
  """Makes `fn(tokens, mask) -> [b]` available as `name`; names are unique."""
  if name in _REGISTRY and _REGISTRY[name] is not fn:
    raise ValueError(f"A reward named {name!r} is already registered; pick another name.")
  _REGISTRY[name] = fn


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> RewardFn:
  """The reward function registered as `name` (ValueError naming the choices)."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown reward {name!r}; registered rewards: {names()} (or give "
                     "a reward model directory, or rewards.register your own).")
  return _REGISTRY[name]
