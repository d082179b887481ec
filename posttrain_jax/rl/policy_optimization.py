"""The policy-optimization core: one step of any on-policy algorithm.

REINFORCE (`reinforce.py`), RLOO (`rloo.py`) and GRPO (`grpo.py`) differ only in
how a rollout's rewards become advantages and in the surrogate loss; everything
else is this module's `policy_step`, run inside one jitted, partitioned program
(`policy_training.PolicyTrainer`):

  1. rollout (done by the caller, `train_policy`): prompts, G samples each
     (consecutive rows), from the current policy pi_old = pi_theta with the
     `sampling.Sampler`; rewards r [b] from a reward model, the gold reward or
     any `rewards.py` function;
  2. behaviour log-probs log pi_old(y_t | x, y_<t) [b, T], computed once by a
     forward pass of the sampling params (untempered, no gradient), and the
     reference log-probs log pi_ref (the anchor: the SFT model or its EMA);
  3. `algorithm.advantages(rollout)` -> per-sequence advantages [b] and
     per-sequence weights [b] (0 drops a sequence, e.g. DAPO's uniform groups);
     rows with a non-finite reward are dropped first (`nonfinite_rewards`);
  4. num_epochs x num_minibatches optimizer steps (`trainer.optimizer_step`)
     of `algorithm.loss_sums` on strided row minibatches (minibatch k = rows
     k, k + n, ...: each device keeps its rows), the EMA anchor
     theta_ema <- (1 - mu) theta_ema + mu theta after each step.

With one optimizer step per rollout, pi_theta = pi_old during the step, so the
importance ratios are 1 and every clipped algorithm reduces to REINFORCE with
its own advantages (tests/rl/test_grpo.py, test_rloo.py check this exactly).

An algorithm is any object with:
  name: str
  max_updates: int | None        # None: any number of steps per rollout
  check(samples_per_prompt)      # raises ValueError on a bad setting
  advantages(rollout, beta, samples_per_prompt) -> (adv [b], weights [b], metrics)
  loss_sums(token_logp [b, T], batch, beta) -> (objective_sum, sums incl "weight")
where `batch` holds mask, logp_old, logp_ref [b, T], advantages and
seq_weights [b]; the gradient of objective_sum / weight is what is descended.

Non-finite rewards (`nonfinite_rewards`, host side: `rl.nonfinite_rewards`).
"drop_rows" (default): a row whose reward is NaN/inf gets reward 0, weight 0 and
advantage 0, and is left out of every baseline: an algorithm with
`masks_rows = True` (REINFORCE, RLOO, GRPO) reads `rollout.valid` [b] (1 =
finite) and computes its batch/group statistics over the valid rows only, so
the update equals that of the batch without those rows (a group left without
the two valid rows a leave-one-out or group-normalised baseline needs is
dropped whole); any other algorithm (BOND's quantiles) loses the whole group
of a bad row (rollout.valid is then 0 on the group's rows, for statistics
across groups such as BOND's batch baseline). If no row is left, the step is
not applied. "skip_step" / "error":
any non-finite reward leaves the parameters unchanged (the job raises first on
"error"). Either way metrics["nonfinite"] = 1 for an unapplied step (the
NonFiniteGuard counts it) and metrics["nonfinite_rewards"] counts the rows.
"""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain_jax.core.trainer import TrainState, optimizer_step, split_microbatches
from posttrain_jax.distillation.sequence_kl import mc_sequence_kl
from posttrain_jax.rl import policy_gradient as pg

Array = jax.Array
LOSS_KEYS = ("tokens", "positions", "segment_ids", "mask")
NONFINITE_REWARDS = ("drop_rows", "skip_step", "error")


@flax.struct.dataclass
class PolicyState:
  step: jax.Array
  params: object
  opt_state: object
  anchor_params: object  # None when the anchor is the SFT model

  def train_state(self) -> TrainState:
    return TrainState(self.step, self.params, self.opt_state)


@dataclasses.dataclass(frozen=True)
class Rollout:
  """What the algorithms see of a scored rollout ([b] per sequence, [b, T] per token)."""
  rewards: Array
  mask: Array
  logp_old: Array
  logp_ref: Array
  valid: Array | None = None  # [b] 1 = the row's reward counts (module docstring)


def forward(model: nn.Module, params, batch) -> Array:
  return model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                     segment_ids=batch["segment_ids"])


def response_logprobs(model, params, batch) -> tuple[Array, tuple[Array, Array]]:
  """Per-token log pi of the responses [b, T], and the entropy sums of pi on them."""
  logits = forward(model, params, batch)
  return (pg.token_logprobs(logits, batch["tokens"], batch["mask"]),
          pg.token_entropy_sums(logits, batch["mask"]))


def clipped_surrogate(ratio: Array, advantage: Array, eps_low: float,
                      eps_high: float) -> tuple[Array, Array]:
  """PPO's clipped objective (Schulman et al. 2017, arXiv 1707.06347), maximised:

      min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)

  Returns it and a 0/1 mask of where the clipped branch is the minimum with the
  ratio outside the range (there the gradient is 0). At rho = 1 it equals A
  with gradient A grad rho.
  """
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  plain, bounded = ratio * advantage, clipped * advantage
  is_clipped = (bounded < plain) & (clipped != ratio)
  return jnp.minimum(plain, bounded), is_clipped.astype(jnp.float32)


def check_updates(algorithm, num_epochs: int, num_minibatches: int,
                  samples_per_prompt: int) -> None:
  if num_epochs < 1 or num_minibatches < 1:
    raise ValueError(f"num_epochs and num_minibatches must be >= 1, got {num_epochs} "
                     f"and {num_minibatches}.")
  limit = getattr(algorithm, "max_updates", None)
  if limit is not None and num_epochs * num_minibatches > limit:
    raise ValueError(
        f"{algorithm.name} takes at most {limit} optimizer step(s) per rollout (its "
        "surrogate has no importance ratio, so later steps would be off-policy); got "
        f"num_epochs={num_epochs} x num_minibatches={num_minibatches}. Use RLOO or GRPO, "
        "which clip the ratio, or set both to 1.")
  algorithm.check(samples_per_prompt)


def _objective(model, algorithm, beta):
  def loss_fn(params, batch, aux=None):
    del aux
    logp = pg.token_logprobs(forward(model, params, batch), batch["tokens"], batch["mask"])
    return algorithm.loss_sums(logp, batch, beta)
  return loss_fn


def _updates(state: PolicyState, batch, *, model, tx, schedule, algorithm, beta,
             ema_rate, num_epochs, num_minibatches, num_microbatches):
  """num_epochs passes over num_minibatches strided minibatches; metrics averaged
  over the steps ("nonfinite": the largest)."""
  loss_fn = _objective(model, algorithm, beta)
  minibatches = split_microbatches(batch, num_minibatches)

  def update(carry, index):
    train_state, anchor = carry
    minibatch = jax.tree.map(lambda x: x[index % num_minibatches], minibatches)
    train_state, metrics = optimizer_step(train_state, minibatch, loss_fn=loss_fn, tx=tx,
                                          schedule=schedule,
                                          num_microbatches=num_microbatches)
    if anchor is not None:
      anchor = pg.ema_update(anchor, train_state.params, ema_rate)
    return (train_state, anchor), metrics

  num_updates = num_epochs * num_minibatches
  carry = (state.train_state(), state.anchor_params)
  if num_updates == 1:  # no scan: the program of the single-update algorithms
    carry, metrics = update(carry, 0)
  else:
    carry, stacked = jax.lax.scan(update, carry, jnp.arange(num_updates))
    metrics = {k: (jnp.max(v) if k == "nonfinite" else jnp.mean(v))
               for k, v in stacked.items()}
  (train_state, anchor) = carry
  return PolicyState(train_state.step, train_state.params, train_state.opt_state,
                     anchor), metrics


def finite_mean(x: Array) -> Array:
  """Mean over the finite entries (0 if none): the reward of the rows that count."""
  x = x.astype(jnp.float32)
  ok = jnp.isfinite(x)
  return jnp.sum(jnp.where(ok, x, 0.0)) / jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1.0)


def check_nonfinite_rewards(policy: str) -> None:
  if policy not in NONFINITE_REWARDS:
    raise ValueError(f"nonfinite_rewards must be one of {list(NONFINITE_REWARDS)}, got "
                     f"{policy!r}.")


def _valid_rows(finite: Array, algorithm, samples_per_prompt: int) -> Array:
  """[b] 0/1: the rows whose reward counts; without masks_rows a bad row's group."""
  valid = finite.astype(jnp.float32)
  if getattr(algorithm, "masks_rows", False):
    return valid
  g = samples_per_prompt
  return jnp.repeat(jnp.min(valid.reshape(-1, g), axis=1), g)


def sample_metrics(batch, tok_lp, tok_lp_sft, entropy_sums) -> dict[str, Array]:
  mask = batch["mask"]
  return {"reward": finite_mean(batch["rewards"]),
          "kl_sft": mc_sequence_kl(tok_lp, tok_lp_sft, mask)["kl"],
          "entropy": entropy_sums[0] / jnp.maximum(entropy_sums[1], 1.0),
          "response_length": jnp.mean(jnp.sum(mask.astype(jnp.float32), -1))}


def policy_step(state: PolicyState, sft_params, batch, *, model, tx, schedule, algorithm,
                beta: float, ema_rate: float, samples_per_prompt: int, num_epochs: int = 1,
                num_minibatches: int = 1, num_microbatches: int = 1,
                nonfinite_rewards: str = "drop_rows"):
  """One rollout batch's update; batch: tokens, positions, segment_ids, mask
  [b, T] and rewards [b] of responses sampled from state.params.

  Returns (state, metrics): the optimizer metrics (loss, grad_norm, ...,
  averaged over the steps), the algorithm's, and reward (over the finite
  rewards), nonfinite_rewards (rows), kl_sft, kl_anchor (Monte Carlo, on the
  rollout), entropy, response_length, tokens. Non-finite rewards: the module
  docstring.
  """
  check_nonfinite_rewards(nonfinite_rewards)
  tok_lp, entropy_sums = response_logprobs(model, state.params, batch)
  tok_lp = jax.lax.stop_gradient(tok_lp)
  tok_lp_sft, _ = response_logprobs(model, sft_params, batch)
  tok_lp_ref = (tok_lp_sft if state.anchor_params is None else
                response_logprobs(model, state.anchor_params, batch)[0])
  rewards = batch["rewards"].astype(jnp.float32)
  finite = jnp.isfinite(rewards)
  valid = _valid_rows(finite, algorithm, samples_per_prompt)
  rollout = Rollout(jnp.where(finite, rewards, 0.0), batch["mask"], tok_lp,
                    jax.lax.stop_gradient(tok_lp_ref), valid)
  adv, weights, algo_metrics = algorithm.advantages(rollout, beta, samples_per_prompt)
  weights = weights * valid
  adv = jnp.where(weights > 0, adv, 0.0)
  loss_batch = {k: batch[k] for k in LOSS_KEYS}
  loss_batch.update(advantages=jax.lax.stop_gradient(adv), seq_weights=weights,
                    logp_old=rollout.logp_old, logp_ref=rollout.logp_ref)
  new_state, metrics = _updates(
      state, loss_batch, model=model, tx=tx, schedule=schedule, algorithm=algorithm,
      beta=beta, ema_rate=ema_rate, num_epochs=num_epochs,
      num_minibatches=num_minibatches, num_microbatches=num_microbatches)
  # applied iff a row's reward counts ("drop_rows") / every reward is finite
  apply = jnp.any(valid > 0) if nonfinite_rewards == "drop_rows" else jnp.all(finite)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
  new_state = PolicyState(new_state.step, keep(new_state.params, state.params),
                          keep(new_state.opt_state, state.opt_state),
                          keep(new_state.anchor_params, state.anchor_params))
  metrics["nonfinite"] = jnp.maximum(metrics["nonfinite"], 1.0 - apply.astype(jnp.float32))
  metrics["nonfinite_rewards"] = jnp.sum(1.0 - finite.astype(jnp.float32))
  metrics.update(algo_metrics)
  metrics.update(sample_metrics(batch, tok_lp, tok_lp_sft, entropy_sums))
  metrics.update({
      "kl_anchor": mc_sequence_kl(tok_lp, tok_lp_ref, batch["mask"])["kl"],
      "tokens": entropy_sums[1],  # generated tokens: the progress line's tok/s
  })
  return new_state, metrics
