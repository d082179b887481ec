"""KL-regularised REINFORCE with an EMA (or SFT) anchor: partitioned step and loop.

Each step (WARP Stage 1, Rame et al. 2024, arXiv 2406.16768; see
`policy_gradient` for the equations):
  1. a batch of prompts, each repeated samples_per_prompt times (consecutive rows);
  2. responses sampled with `sampling.Sampler` from the current policy at
     `temperature` (no gradient through sampling), rng = fold_in(seed, step);
  3. rewards r(x, y): a named reward function (`rewards`) or a reward model
     directory (`reward_model.load_reward_fn`);
  4. in one jitted, partitioned program: log pi, log pi_anchor and log pi_sft of
     the responses (one forward each), r_beta = r - beta (log pi - log pi_anchor),
     advantages (baseline), the policy update with `trainer.optimizer_step`
     (loss_fn = the REINFORCE surrogate) and the anchor update
     theta_ema <- (1 - mu) theta_ema + mu theta.

anchor="sft" keeps the SFT model as the anchor (no EMA copy is stored);
anchor="ema" starts the EMA at the SFT weights. The SFT model (initial_checkpoint)
is also the fixed reference of the "kl_sft" metric. State (`PolicyState`: step,
params, opt_state, anchor_params) and the prompt iterator's position are
checkpointed together, so a resumed run continues exactly. The state has a
top-level "params", so `params_checkpoint.locate` reads an RL run directory
like any other run (sampling, export, merges).

Metrics: reward, gold_reward (gold_reward=True), kl_sft and kl_anchor (Monte
Carlo sum of per-token log-ratios on the policy's samples; unbiased for
KL(pi || .) at temperature 1), shaped_reward (r_beta), entropy (per response
token), response_length, loss, grad_norm, learning_rate; eval/* on held-out
prompts adds the per-token exact KL to the SFT model.

The job that runs this loop (`train_policy`, with its checkpoints, eval and
optional Streaming DiLoCo) is `posttrain_jax.jobs.train_policy`.

Temperature: as in WARP, responses are sampled at `temperature` (0.9) while
the surrogate and r_beta use the untempered log pi; at temperature != 1 the
update is therefore the usual practical approximation of the policy gradient
of E_{y~pi}[r_beta], not an unbiased estimate of it.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax.core import partitioning
from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.distillation.sequence_kl import expected_token_kl
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.rl import policy_gradient as pg
from posttrain_jax.rl import policy_optimization as po
from posttrain_jax.rl import reward_model
from posttrain_jax.rl import rewards as rewards_lib
from posttrain_jax.rl.policy_optimization import PolicyState, policy_step
from posttrain_jax.rl.reinforce import Reinforce

ANCHORS = ("ema", "sft")
__all__ = ["ANCHORS", "PolicyState", "PolicyTrainer", "rl_step", "policy_step",
           "eval_metrics", "sample_batch", "resolve_reward", "policy_tokenizer"]


def rl_step(state: PolicyState, sft_params, batch, *, model, tx, schedule, beta: float,
            ema_rate: float, baseline: str, samples_per_prompt: int,
            num_microbatches: int = 1):
  """One KL-regularised REINFORCE step (`policy_step` with `Reinforce(baseline)`);
  batch: tokens, positions, segment_ids, mask [b, T] and rewards [b]."""
  return policy_step(state, sft_params, batch, model=model, tx=tx, schedule=schedule,
                     algorithm=Reinforce(baseline), beta=beta, ema_rate=ema_rate,
                     samples_per_prompt=samples_per_prompt,
                     num_microbatches=num_microbatches)


def eval_metrics(model, params, sft_params, batch) -> dict[str, jax.Array]:
  """reward, kl_sft (MC), kl_sft_token_sum (sequence_kl.expected_token_kl: the
  full-vocabulary KL summed along the sampled prefixes, lower variance), entropy
  and response_length of sampled responses."""
  logits = po.forward(model, params, batch)
  logits_sft = po.forward(model, sft_params, batch)
  tokens, mask = batch["tokens"], batch["mask"]
  metrics = po.sample_metrics(batch, pg.token_logprobs(logits, tokens, mask),
                              pg.token_logprobs(logits_sft, tokens, mask),
                              pg.token_entropy_sums(logits, mask))
  metrics["kl_sft_token_sum"] = expected_token_kl(logits, logits_sft, mask)["kl"]
  return metrics


class PolicyTrainer:
  """Jitted, partitioned `policy_step` of one algorithm (default: REINFORCE with
  a leave-one-out baseline): params/opt state/anchor sharded like Trainer's.
  `step_fn` is the unjitted step with every setting bound (DiLoCo wraps it)."""

  def __init__(self, model_config: ModelConfig, tx, schedule, mesh, *, beta: float,
               anchor: str, ema_rate: float, samples_per_prompt: int, algorithm=None,
               num_epochs: int = 1, num_minibatches: int = 1, num_microbatches: int = 1,
               nonfinite_rewards: str = "drop_rows", rules=partitioning.DEFAULT_RULES):
    if anchor not in ANCHORS:
      raise ValueError(f"Unknown anchor {anchor!r}; choose one of {list(ANCHORS)}.")
    if not 0.0 <= ema_rate <= 1.0:
      raise ValueError(f"ema_rate (mu) must be in [0, 1], got {ema_rate}.")
    if not beta >= 0.0:  # as DPO refuses beta <= 0 (rl/dpo.py)
      raise ValueError(f"beta (the KL penalty towards the anchor) must be >= 0, got {beta}: "
                       "a negative beta is a bonus for moving away from it. Use 0 for no "
                       "KL term (GRPO's paper: 0.04).")
    self.algorithm = algorithm or Reinforce()
    po.check_updates(self.algorithm, num_epochs, num_minibatches, samples_per_prompt)
    po.check_nonfinite_rewards(nonfinite_rewards)
    self.model = Transformer(model_config)
    self.tx, self.mesh, self.rules, self.anchor = tx, mesh, rules, anchor
    self.schedule = schedule
    abstract, self.param_shardings = partitioning.params_and_shardings(
        lambda: self.model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
        mesh, rules)
    replicated = partitioning.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt,
                                          self.param_shardings,
                                          transform_non_params=lambda _: replicated)
    ema = anchor == "ema"
    self.state_shardings = PolicyState(replicated, self.param_shardings, opt_shardings,
                                       self.param_shardings if ema else None)
    self.abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
        self.param_shardings)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        PolicyState(jax.ShapeDtypeStruct((), jnp.int32), abstract, abstract_opt,
                    abstract if ema else None), self.state_shardings)
    self.batch_sharding = partitioning.batch_sharding(mesh, rules)
    self.row_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(self.batch_sharding.spec[0]))
    batch_shardings = {k: self.batch_sharding
                       for k in ("tokens", "positions", "segment_ids", "mask")}
    batch_shardings["rewards"] = self.row_sharding
    self._batch_shardings = batch_shardings
    self.step_fn = functools.partial(
        policy_step, model=self.model, tx=tx, schedule=schedule, algorithm=self.algorithm,
        beta=beta, ema_rate=ema_rate, samples_per_prompt=samples_per_prompt,
        num_epochs=num_epochs, num_minibatches=num_minibatches,
        num_microbatches=num_microbatches, nonfinite_rewards=nonfinite_rewards)
    self._step = jax.jit(
        self.step_fn,
        in_shardings=(self.state_shardings, self.param_shardings, batch_shardings),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval = jax.jit(functools.partial(eval_metrics, self.model),
                         in_shardings=(self.param_shardings, self.param_shardings,
                                       batch_shardings), out_shardings=replicated)
    copy = lambda t: jax.tree.map(lambda x: x * 1, t)
    self._fresh = jax.jit(
        lambda p: PolicyState(jnp.zeros((), jnp.int32), copy(p), tx.init(p),
                              copy(p) if ema else None),
        in_shardings=(self.param_shardings,), out_shardings=self.state_shardings)

  def init_state(self, sft_params) -> PolicyState:
    """Step 0: policy (and EMA anchor) = copies of the SFT params, fresh optimizer."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._fresh(sft_params)

  def step(self, state: PolicyState, sft_params, batch) -> tuple[PolicyState, dict]:
    batch = {k: jax.device_put(v, self._batch_shardings[k]) for k, v in batch.items()}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._step(state, sft_params, batch)

  def eval_metrics(self, params, sft_params, batch) -> dict[str, jax.Array]:
    batch = {k: jax.device_put(v, self._batch_shardings[k]) for k, v in batch.items()}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._eval(params, sft_params, batch)


def sample_batch(sample, rewards) -> dict[str, jax.Array]:
  """The rl_step batch of a SampleOutput and its rewards [b]."""
  segments = (sample.prompt_mask | sample.generated_mask).astype(jnp.int32)
  return {"tokens": sample.tokens, "positions": sample.positions, "segment_ids": segments,
          "mask": sample.generated_mask.astype(jnp.float32),
          "rewards": jnp.asarray(rewards, jnp.float32)}


def resolve_reward(reward: str, mesh, *, vocab_size: int | None = None,
                   tokenizer: dict | None = None, policy: str = "the policy"):
  """reward(sample) -> [b]: a registered reward name or a reward model directory.

  With vocab_size (and the policy's tokenizer record, if known), a reward model
  that cannot score the policy's tokens is refused first
  (`reward_model.check_fits_policy`).
  """
  try:
    fn = rewards_lib.get(reward)
  except ValueError:
    if not os.path.isdir(reward):
      raise ValueError(f"Unknown reward {reward!r}: neither a registered reward "
                       f"({', '.join(rewards_lib.names())}) nor a reward model "
                       "directory.") from None
    if vocab_size is not None:
      reward_model.check_fits_policy(reward, vocab_size, tokenizer, policy)
    model_fn = reward_model.load_reward_fn(reward, mesh)
    return lambda s: model_fn(s.tokens, s.positions,
                              (s.prompt_mask | s.generated_mask).astype(jnp.int32))
  return lambda s: fn(s.tokens, s.generated_mask)


def policy_tokenizer(initial_checkpoint: str | None, prompts: PromptConfig | None):
  """The policy's tokenizer record: its SFT model directory's, else the prompt
  task's SentencePiece model (None: unknown)."""
  record = (reward_model.recorded_tokenizer(initial_checkpoint)
            if initial_checkpoint and os.path.isdir(initial_checkpoint) else None)
  if record is None and prompts is not None:
    record = reward_model.task_tokenizer(prompts.task_name)
  return record


def prompt_iterator(cfg: PromptConfig):
  """data.prompts.PromptIterator over cfg; every process reads the whole global
  batch (the Sampler takes host prompts as global values)."""
  from posttrain_jax.data.prompts import PromptIterator  # TF lives in data/
  return PromptIterator(task_name=cfg.task_name, split=cfg.split,
                        prompt_length=cfg.prompt_length, batch_size=cfg.batch_size,
                        shuffle=cfg.shuffle, seed=cfg.seed, num_epochs=cfg.num_epochs,
                        shard_index=0, num_shards=1)


def repeated_prompts(batch: dict, samples_per_prompt: int) -> tuple[list[list[int]], int]:
  """(each prompt of a PromptIterator batch without its left padding, repeated
  samples_per_prompt times in a row; the batch's padded prompt length)."""
  rows = np.repeat(np.asarray(batch["prompts"]), samples_per_prompt, axis=0)
  lengths = np.repeat(np.asarray(batch["prompt_lengths"]), samples_per_prompt)
  return [r[len(r) - n:] for r, n in zip(rows.tolist(), lengths.tolist())], rows.shape[1]


def load_eval_prompts(cfg: PromptConfig, num_prompts: int) -> list[list[int]]:
  from posttrain_jax.data.prompts import load_prompts  # TF lives in data/
  return load_prompts(task_name=cfg.task_name, split=cfg.split,
                      prompt_length=cfg.prompt_length, num_prompts=num_prompts)
