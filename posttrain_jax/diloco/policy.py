"""KL-regularised REINFORCE under Streaming DiLoCo (`train_policy(..., diloco=...)`).

The policy trains as M replicas θ_1..θ_M (`diloco_loop.DiLoCoLoop` around
`PolicyTrainer.step_fn`: any policy_optimization algorithm); the frozen SFT params are the inner step's shared
`aux` (the KL reference, and the anchor when anchor="sft").

On-policy sampling. REINFORCE needs y ~ π_θm for the rows replica m updates,
so each step's prompt batch [B] is split into M contiguous row blocks (block m
= rows [m B/M, (m+1) B/M), as `streaming_diloco.split_replicas` splits the
batch), block m is sampled from replica m's own params θ_m
(`streaming_diloco.replica_params`) and the scored blocks are concatenated in
replica order, so the DiLoCo step hands block m back to replica m:
  y_i ~ π_θm(. | x_i),   i in block m.
`sample_replicas` does this as a host loop over m in one process (every
replica's params are on this process's devices): M sampler calls per step.
Keys: M = 1 uses the step key k_t = fold_in(seed, t) (as without DiLoCo);
M > 1 uses fold_in(k_t, m) for block m.

EMA anchor. The inner state is the LM `TrainState` that DiLoCo stacks per
replica; with anchor="ema" the anchor rides in the optimizer state
(`AnchoredState(inner, anchor)`, `with_anchor(tx)`), so every replica keeps its
own anchor θ_ema,m <- (1 - μ) θ_ema,m + μ θ_m, updated by its inner step and
untouched by the outer step (the merge resets θ_m, never θ_ema,m); it starts at
the SFT weights. The anchor is not exchanged (no extra traffic).

Evaluation (eval/* reward, gold reward, KL to SFT) samples from and scores the
OUTER parameters θ̃; checkpoints hold the whole DiLoCoState, so exports read
θ̃ (`params_checkpoint.locate` -> "outer_params") and a resume mid-window is exact.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from posttrain_jax.core.trainer import TrainState
from posttrain_jax.diloco import loop as diloco_loop
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.rl.policy_optimization import PolicyState


class AnchoredState(NamedTuple):
  """Optimizer state with the replica's EMA anchor θ_ema (params-shaped)."""
  inner: optax.OptState
  anchor: optax.Params


def with_anchor(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """tx whose state also holds an EMA anchor, initialised to the params.

  Only init (and the state's shardings, via optax.tree_map_params) come from
  here: `replica_rl_step` updates the inner state with tx and the anchor with
  the EMA itself; update() applies tx and leaves the anchor unchanged.
  """
  def init(params):
    return AnchoredState(tx.init(params), params)

  def update(updates, state, params=None):
    updates, inner = tx.update(updates, state.inner, params)
    return updates, AnchoredState(inner, state.anchor)

  return optax.GradientTransformation(init, update)


def replica_rl_step(state: TrainState, batch, sft_params, *, rl_step, ema: bool):
  """One replica's RL step (a bound `policy_step`) on its row block, on the
  stacked TrainState.

  batch["rewards"] is [b, 1] (2-D like every batch leaf the DiLoCo programs
  shard); the anchor is state.opt_state.anchor when `ema`, else the SFT params.
  """
  opt, anchor = (state.opt_state.inner, state.opt_state.anchor) if ema else (
      state.opt_state, None)
  batch = dict(batch, rewards=batch["rewards"][:, 0])
  new, metrics = rl_step(PolicyState(state.step, state.params, opt, anchor),
                         sft_params, batch)
  opt_state = AnchoredState(new.opt_state, new.anchor_params) if ema else new.opt_state
  return TrainState(new.step, new.params, opt_state), metrics


def policy_loop(trainer, config: sd.DiLoCoConfig, *, batch_size: int,
                num_microbatches: int = 1) -> diloco_loop.DiLoCoLoop:
  """DiLoCoLoop around `trainer`'s (a policy_training.PolicyTrainer) RL step:
  `train_step(state, loop_batch(batch), sft_params)`."""
  ema = trainer.anchor == "ema"
  step = trainer.step_fn
  tx = with_anchor(trainer.tx) if ema else trainer.tx
  return diloco_loop.DiLoCoLoop(
      trainer.model, tx, trainer.schedule, trainer.mesh, config, batch_size=batch_size,
      num_microbatches=num_microbatches,
      inner_step=functools.partial(replica_rl_step, rl_step=step, ema=ema),
      aux_shardings=trainer.param_shardings)


def loop_batch(loop: diloco_loop.DiLoCoLoop, batch) -> dict[str, jax.Array]:
  """A `sample_batch` batch placed for the DiLoCo step (rewards as [b, 1])."""
  batch = dict(batch, rewards=jnp.reshape(batch["rewards"], (-1, 1)))
  return {k: jax.device_put(v, loop.trainer.batch_sharding) for k, v in batch.items()}


def sample_replicas(sampler, state: sd.DiLoCoState, prompts: list, key: jax.Array,
                    prompt_length: int, param_shardings):
  """Samples row block m of `prompts` from replica m's params (a host loop
  over m); returns the blocks' SampleOutput concatenated in replica order."""
  m_total = jax.tree.leaves(state.replicas.params)[0].shape[0]
  if len(prompts) % m_total:
    raise ValueError(f"{len(prompts)} sequences do not split into {m_total} replicas.")
  size = len(prompts) // m_total
  outputs = []
  for m in range(m_total):
    params = jax.device_put(sd.replica_params(state, m), param_shardings)
    outputs.append(sampler(params, prompts[m * size:(m + 1) * size],
                           key if m_total == 1 else jax.random.fold_in(key, m),
                           prompt_length=prompt_length))
  if m_total == 1:
    return outputs[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *outputs)
