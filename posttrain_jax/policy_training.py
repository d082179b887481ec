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

Streaming DiLoCo (diloco=DiLoCoConfig): M policy replicas, replica m samples
and updates on row block m of each step with its own params θ_m, each with its
own EMA anchor; eval/* and exports use the outer params θ̃ (`diloco_policy`).

Temperature: as in WARP, responses are sampled at `temperature` (0.9) while
the surrogate and r_beta use the untempered log pi; at temperature != 1 the
update is therefore the usual practical approximation of the policy gradient
of E_{y~pi}[r_beta], not an unbiased estimate of it.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax import diloco_policy, params_checkpoint, partitioning, reward_model
from posttrain_jax import policy_gradient as pg
from posttrain_jax import rewards as rewards_lib
from posttrain_jax.checkpointing import Checkpointer
from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.nonfinite_guard import NonFiniteGuard
from posttrain_jax.optimizer import OptimizerConfig
from posttrain_jax.progress import ProgressReporter
from posttrain_jax.step_loop import StepLoop
from posttrain_jax.sampling import Sampler, SamplingConfig
from posttrain_jax.sequence_kl import expected_token_kl, mc_sequence_kl
from posttrain_jax.streaming_diloco import DiLoCoConfig
from posttrain_jax.trainer import TrainState, optimizer_step

ANCHORS = ("ema", "sft")
SHOWN = (("reward", "reward", "{:.3f}"), ("gold_reward", "gold", "{:.3f}"),
         ("kl_sft", "kl_sft", "{:.3f}"), ("kl_anchor", "kl_anchor", "{:.3f}"),
         ("entropy", "entropy", "{:.2f}"), ("response_length", "len", "{:.1f}"),
         ("loss", "loss", "{:.4f}"), ("grad_norm", "gnorm", "{:.3f}"),
         ("learning_rate", "lr", "{:.2e}"))


@flax.struct.dataclass
class PolicyState:
  step: jax.Array
  params: object
  opt_state: object
  anchor_params: object  # None when the anchor is the SFT model

  def train_state(self) -> TrainState:
    return TrainState(self.step, self.params, self.opt_state)


def _forward(model, params, batch):
  return model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                     segment_ids=batch["segment_ids"])


def reinforce_objective(model: nn.Module):
  """optimizer_step loss_fn: -sum_i A_i log pi(y_i|x_i), weight = #sequences."""
  def loss_fn(params, batch, aux=None):
    del aux
    logp = pg.sequence_logprobs(_forward(model, params, batch), batch["tokens"],
                                batch["mask"])
    return pg.reinforce_loss_sums(logp, batch["advantages"])
  return loss_fn


def _response_logprobs(model, params, batch):
  """Per-token log pi of the responses [b, T], and the entropy sums of pi on them."""
  logits = _forward(model, params, batch)
  return (pg.token_logprobs(logits, batch["tokens"], batch["mask"]),
          pg.token_entropy_sums(logits, batch["mask"]))


def _sample_metrics(batch, tok_lp, tok_lp_sft, entropy_sums) -> dict[str, jax.Array]:
  mask = batch["mask"]
  return {"reward": jnp.mean(batch["rewards"].astype(jnp.float32)),
          "kl_sft": mc_sequence_kl(tok_lp, tok_lp_sft, mask)["kl"],
          "entropy": entropy_sums[0] / jnp.maximum(entropy_sums[1], 1.0),
          "response_length": jnp.mean(jnp.sum(mask.astype(jnp.float32), -1))}


def rl_step(state: PolicyState, sft_params, batch, *, model, tx, schedule, beta: float,
            ema_rate: float, baseline: str, samples_per_prompt: int,
            num_microbatches: int = 1):
  """One REINFORCE step on sampled responses; batch: tokens, positions,
  segment_ids, mask [b, T] and rewards [b]. Returns (state, metrics)."""
  tok_lp, entropy_sums = _response_logprobs(model, state.params, batch)
  tok_lp_sft, _ = _response_logprobs(model, sft_params, batch)
  tok_lp_anchor = (tok_lp_sft if state.anchor_params is None else
                   _response_logprobs(model, state.anchor_params, batch)[0])
  shaped = pg.kl_regularized_reward(batch["rewards"], jnp.sum(tok_lp, -1),
                                    jnp.sum(tok_lp_anchor, -1), beta)
  loss_batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "mask")}
  loss_batch["advantages"] = pg.advantages(shaped, baseline, samples_per_prompt)
  train_state, metrics = optimizer_step(
      state.train_state(), loss_batch, loss_fn=reinforce_objective(model), tx=tx,
      schedule=schedule, num_microbatches=num_microbatches)
  anchor = state.anchor_params
  if anchor is not None:
    anchor = pg.ema_update(anchor, train_state.params, ema_rate)
  metrics.update(_sample_metrics(batch, tok_lp, tok_lp_sft, entropy_sums))
  metrics.update({
      "shaped_reward": jnp.mean(shaped),
      "kl_anchor": mc_sequence_kl(tok_lp, tok_lp_anchor, batch["mask"])["kl"],
      "tokens": entropy_sums[1],  # generated tokens: the progress line's tok/s
  })
  return PolicyState(train_state.step, train_state.params, train_state.opt_state,
                     anchor), metrics


def eval_metrics(model, params, sft_params, batch) -> dict[str, jax.Array]:
  """reward, kl_sft (MC), kl_sft_per_token (sequence_kl.expected_token_kl: the
  full-vocabulary KL summed along the sampled prefixes, lower variance), entropy
  and response_length of sampled responses."""
  logits, logits_sft = _forward(model, params, batch), _forward(model, sft_params, batch)
  tokens, mask = batch["tokens"], batch["mask"]
  metrics = _sample_metrics(batch, pg.token_logprobs(logits, tokens, mask),
                            pg.token_logprobs(logits_sft, tokens, mask),
                            pg.token_entropy_sums(logits, mask))
  metrics["kl_sft_per_token"] = expected_token_kl(logits, logits_sft, mask)["kl"]
  return metrics


class PolicyTrainer:
  """Jitted, partitioned RL step: params/opt state/anchor sharded like Trainer's."""

  def __init__(self, model_config: ModelConfig, tx, schedule, mesh, *, beta: float,
               anchor: str, ema_rate: float, baseline: str, samples_per_prompt: int,
               num_microbatches: int = 1, rules=partitioning.DEFAULT_RULES):
    if anchor not in ANCHORS:
      raise ValueError(f"Unknown anchor {anchor!r}; choose one of {list(ANCHORS)}.")
    if not 0.0 <= ema_rate <= 1.0:
      raise ValueError(f"ema_rate (mu) must be in [0, 1], got {ema_rate}.")
    pg.check_baseline(baseline, samples_per_prompt)
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
    self._step = jax.jit(
        functools.partial(rl_step, model=self.model, tx=tx, schedule=schedule, beta=beta,
                          ema_rate=ema_rate, baseline=baseline,
                          samples_per_prompt=samples_per_prompt,
                          num_microbatches=num_microbatches),
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


def resolve_reward(reward: str, mesh):
  """reward(sample) -> [b]: a registered reward name or a reward model directory."""
  try:
    fn = rewards_lib.get(reward)
  except ValueError:
    if not os.path.isdir(reward):
      raise ValueError(f"Unknown reward {reward!r}: neither a registered reward "
                       f"({', '.join(rewards_lib.names())}) nor a reward model "
                       "directory.") from None
    model_fn = reward_model.load_reward_fn(reward, mesh)
    return lambda s: model_fn(s.tokens, s.positions,
                              (s.prompt_mask | s.generated_mask).astype(jnp.int32))
  return lambda s: fn(s.tokens, s.generated_mask)


def prompt_iterator(cfg: PromptConfig):
  """data.prompts.PromptIterator over cfg; every process reads the whole global
  batch (the Sampler takes host prompts as global values)."""
  from posttrain_jax.data.prompts import PromptIterator  # TF lives in data/
  return PromptIterator(task_name=cfg.task_name, split=cfg.split,
                        prompt_length=cfg.prompt_length, batch_size=cfg.batch_size,
                        shuffle=cfg.shuffle, seed=cfg.seed, num_epochs=cfg.num_epochs,
                        shard_index=0, num_shards=1)


def load_eval_prompts(cfg: PromptConfig, num_prompts: int) -> list[list[int]]:
  from posttrain_jax.data.prompts import load_prompts  # TF lives in data/
  return load_prompts(task_name=cfg.task_name, split=cfg.split,
                      prompt_length=cfg.prompt_length, num_prompts=num_prompts)


@dataclasses.dataclass
class PolicyResult:
  final_step: int
  metrics: dict[int, dict[str, float]]  # every logged step of this invocation
  eval_metrics: dict[int, dict[str, float]]
  resumed_from: int | None
  preempted: bool = False
  skipped_steps: int = 0
  state: PolicyState | None = None     # the final state (on device; DiLoCoState with diloco)
  traffic: dict[str, float] | None = None  # DiLoCo bytes (DiLoCoLoop.traffic)


def train_policy(*, model_config: ModelConfig, run_dir: str, initial_checkpoint: str,
                 reward: str, num_steps: int, prompts: PromptConfig | None = None,
                 samples_per_prompt: int = 2, max_new_tokens: int = 64,
                 temperature: float = 0.9, beta: float = 0.1, anchor: str = "ema",
                 ema_rate: float = 0.01, baseline: str = "leave_one_out",
                 gold_reward: bool = False,
                 optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-6,
                                                              warmup_steps=100),
                 eval_prompts: PromptConfig | None = None, num_eval_prompts: int = 64,
                 eval_every: int = 0,
                 ici_parallelism: Mapping[str, int] | None = None,
                 dcn_parallelism: Mapping[str, int] | None = None,
                 num_microbatches: int = 1, seed: int = 0, checkpoint_every: int = 100,
                 keep_checkpoints: int | None = 3, async_checkpointing: bool = True,
                 log_every: int = 10, eos_id: int | None = 1,
                 nonfinite_policy: str = "skip", max_consecutive_nonfinite: int = 10,
                 operative_config: str | None = None, prompt_source=None,
                 eval_prompt_list: list[list[int]] | None = None,
                 diloco: DiLoCoConfig | None = None) -> PolicyResult:
  """KL-regularised REINFORCE from an SFT model for `num_steps` steps.

  Args:
    model_config: the policy's architecture (that of initial_checkpoint).
    run_dir: checkpoints/, TensorBoard events, config.gin.
    initial_checkpoint: the SFT model (model or run directory): the policy's
      initialisation, the EMA anchor's start and the fixed "kl_sft" reference.
    reward: a registered reward name (`rewards.names()`, e.g. "gold") or a
      reward model directory (`reward_model.save_reward_model`).
    num_steps: total RL steps (a resumed run counts from its checkpoint).
    prompts: the training prompts (PromptConfig; batch_size = prompts per step);
      each is sampled samples_per_prompt times, so a step has
      batch_size * samples_per_prompt sequences.
    max_new_tokens / temperature / eos_id: sampling (WARP: temperature 0.9).
    beta: KL coefficient of r_beta = r - beta (log pi - log pi_anchor).
    anchor: "ema" (WARP) or "sft"; ema_rate: mu of the EMA (0.01 in WARP).
    baseline: "leave_one_out" (needs samples_per_prompt >= 2), "mean", "none".
    gold_reward: also report the gold reward (training batches and eval).
    optimizer: Adam(W) settings (WARP: lr 1e-6, warmup 100).
    eval_prompts / num_eval_prompts / eval_every: held-out prompts (the first
      num_eval_prompts of eval_prompts, one sample each, fixed rng) scored every
      eval_every steps and at the end: eval/reward, eval/gold_reward,
      eval/kl_sft, eval/kl_sft_per_token, eval/entropy, eval/response_length.
    prompt_source / eval_prompt_list: replace the prompt tasks (tests): an
      iterator like data.prompts.PromptIterator, and token-id prompts.
    diloco: train the policy with Streaming DiLoCo (`diloco_policy`): M
      replicas, replica m samples and updates on row block m of each step's
      batch with its own params θ_m (EMA anchor per replica); eval/* and
      checkpoint exports use the outer params θ̃; traffic/* scalars. The batch
      must be a multiple of num_replicas x the batch shards.
  """
  if not initial_checkpoint:
    raise ValueError("train_policy needs initial_checkpoint: the SFT model directory "
                     "(policy init and KL reference); set train_policy.initial_checkpoint.")
  if not os.path.exists(initial_checkpoint):
    raise FileNotFoundError(f"initial_checkpoint {initial_checkpoint} does not exist.")
  if prompts is None and prompt_source is None:
    raise ValueError("train_policy needs prompts: set train_policy.prompts = "
                     "@train_prompts/PromptConfig() (see gin/experiments/rl/reinforce.gin).")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  pg.check_baseline(baseline, samples_per_prompt)
  guard = NonFiniteGuard(nonfinite_policy, max_consecutive_nonfinite)
  mesh = partitioning.create_mesh(ici_parallelism or {"data": -1}, dcn_parallelism)
  score = resolve_reward(reward, mesh)
  gold = rewards_lib.get("gold") if gold_reward else None
  data = prompt_source or prompt_iterator(prompts)
  shards = int(np.prod([mesh.shape[a] for a in ("replica", "data", "fsdp")]))
  batch_size = (prompts.batch_size if prompts else data.batch_size) * samples_per_prompt
  if batch_size % shards:
    raise ValueError(f"prompts.batch_size * samples_per_prompt = {batch_size} sequences is "
                     f"not divisible by the mesh's {shards} batch shards; change them or "
                     "ici_parallelism.")
  eval_list = eval_prompt_list or (load_eval_prompts(eval_prompts, num_eval_prompts)
                                   if eval_prompts is not None else None)
  if eval_list is not None and len(eval_list) % shards:
    raise ValueError(f"num_eval_prompts = {len(eval_list)} is not divisible by the mesh's "
                     f"{shards} batch shards.")
  os.makedirs(run_dir, exist_ok=True)
  if operative_config and jax.process_index() == 0:
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
      f.write(operative_config)
  schedule, tx = optimizer.build(num_steps)
  trainer = PolicyTrainer(model_config, tx, schedule, mesh, beta=beta, anchor=anchor,
                          ema_rate=ema_rate, baseline=baseline,
                          samples_per_prompt=samples_per_prompt,
                          num_microbatches=num_microbatches)
  sampler = Sampler(model_config, SamplingConfig(max_new_tokens=max_new_tokens,
                                                 temperature=temperature, eos_id=eos_id),
                    mesh)
  sft_params = params_checkpoint.restore_params(initial_checkpoint, trainer.abstract_params,
                                                model_config)
  step_trainer, eval_params = trainer, lambda s: s.params
  if diloco is not None:
    step_trainer = diloco_policy.policy_loop(
        trainer, diloco, batch_size=batch_size, beta=beta, ema_rate=ema_rate,
        baseline=baseline, samples_per_prompt=samples_per_prompt,
        num_microbatches=num_microbatches)
    eval_params = step_trainer.eval_params
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              save_every_steps=checkpoint_every, max_to_keep=keep_checkpoints,
                              async_save=async_checkpointing)
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    state, data_state = checkpointer.restore(resumed_from, step_trainer.abstract_state)
    if "prompts" in data_state:
      data.set_state(data_state["prompts"])
    origin = f"resumed from step {resumed_from}"
  else:
    state = (trainer.init_state(sft_params) if diloco is None else
             step_trainer.trainer.state_from_params(sft_params))
    origin = f"initialised from {os.path.abspath(initial_checkpoint)}"
  start = int(jax.device_get(state.step))
  if diloco is not None:
    step_trainer.start(start)
  reporter = ProgressReporter(run_dir, total_steps=num_steps, start_step=start,
                              log_every=log_every, shown=SHOWN)
  if operative_config:
    reporter.write_text(start, "config", operative_config)
  reporter.print(f"{origin} | anchor {anchor} (mu {ema_rate}) | beta {beta} | reward "
                 f"{reward} | {batch_size // samples_per_prompt}x{samples_per_prompt} "
                 f"samples/step | mesh {dict(mesh.shape)} | run_dir {run_dir}")
  if start >= num_steps:
    reporter.print(f"run already complete at step {start} (num_steps={num_steps})")
  base_rng = jax.random.key(seed)

  def evaluate(step):
    params = eval_params(state)
    sample = sampler(params, eval_list, jax.random.fold_in(base_rng, 0))
    metrics = trainer.eval_metrics(params, sft_params, sample_batch(sample, score(sample)))
    if gold is not None:
      metrics["gold_reward"] = jnp.mean(gold(sample.tokens, sample.generated_mask))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    reporter.write_eval(step, metrics)
    return metrics

  history: dict[int, dict[str, float]] = {}
  eval_history: dict[int, dict[str, float]] = {}
  loop = StepLoop(start=start, num_steps=num_steps, guard=guard, reporter=reporter,
                  checkpointer=checkpointer, data_state=lambda: {"prompts": data.get_state()})
  try:
    for step in loop:
      batch = next(data)
      rows = np.repeat(np.asarray(batch["prompts"]), samples_per_prompt, axis=0)
      lengths = np.repeat(np.asarray(batch["prompt_lengths"]), samples_per_prompt)
      prompt_list = [r[len(r) - n:] for r, n in zip(rows.tolist(), lengths.tolist())]
      key = jax.random.fold_in(base_rng, step)
      if diloco is None:
        sample = sampler(state.params, prompt_list, key, prompt_length=rows.shape[1])
        state, metrics = trainer.step(state, sft_params, sample_batch(sample, score(sample)))
      else:  # block m sampled from replica m's params
        sample = diloco_policy.sample_replicas(sampler, state, prompt_list, key,
                                               rows.shape[1], trainer.param_shardings)
        state, metrics = step_trainer.train_step(
            state, diloco_policy.loop_batch(step_trainer, sample_batch(sample, score(sample))),
            sft_params)
      if gold is not None:
        metrics["gold_reward"] = jnp.mean(gold(sample.tokens, sample.generated_mask))
      loop.end_step(step, state, metrics)
      if step % log_every == 0 or step == num_steps:
        history[step] = {k: float(v) for k, v in jax.device_get(metrics).items()
                         if jnp.ndim(v) == 0}
        if diloco is not None:
          step_trainer.write_traffic(reporter, step)
      if eval_list and ((eval_every and step % eval_every == 0) or step == num_steps):
        eval_history[step] = evaluate(step)
    loop.finish(state)
    if diloco is not None:
      reporter.print(step_trainer.summary())
  finally:
    loop.close()
  return PolicyResult(final_step=loop.final_step,
                      metrics=history, eval_metrics=eval_history,
                      resumed_from=resumed_from, preempted=loop.preempted,
                      skipped_steps=guard.skipped, state=state,
                      traffic=step_trainer.traffic() if diloco is not None else None)
