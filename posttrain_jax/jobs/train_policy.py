"""The `train_policy` job: on-policy RL from an SFT checkpoint (REINFORCE, RLOO, GRPO).

Wires `rl.policy_training` (the partitioned RL step and `PolicyTrainer`) into a
run: prompts, the sampler, the reward (a registered reward or a reward model
directory), atomic checkpoints with the prompt iterator's position (exact
resume), eval on held-out prompts, progress and TensorBoard scalars.

Streaming DiLoCo (diloco=DiLoCoConfig): M policy replicas, replica m samples
and updates on row block m of each step with its own params θ_m, each with its
own EMA anchor; eval/* and exports use the outer params θ̃ (`diloco.policy`).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.core import operative_config as operative_config_lib
from posttrain_jax.core import partitioning
from posttrain_jax.core.checkpointing import Checkpointer
from posttrain_jax.core.nonfinite_guard import NonFiniteGuard
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.progress import ProgressReporter
from posttrain_jax.core.step_loop import StepLoop
from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.diloco import policy as diloco_policy
from posttrain_jax.diloco.streaming_diloco import DiLoCoConfig
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import ModelConfig, params_checkpoint
from posttrain_jax.rl import mixed_rollout
from posttrain_jax.rl import nonfinite_rewards as nonfinite_rewards_lib
from posttrain_jax.rl import policy_optimization as po
from posttrain_jax.rl import rewards as rewards_lib
from posttrain_jax.rl.policy_training import (
    PolicyState, PolicyTrainer, load_eval_prompts, policy_tokenizer, prompt_iterator,
    repeated_prompts, resolve_reward, sample_batch)
from posttrain_jax.rl.reinforce import Reinforce

SHOWN = (("reward", "reward", "{:.3f}"), ("gold_reward", "gold", "{:.3f}"),
         ("kl_sft", "kl_sft", "{:.3f}"), ("kl_anchor", "kl_anchor", "{:.3f}"),
         ("entropy", "entropy", "{:.2f}"), ("response_length", "len", "{:.1f}"),
         ("clip_fraction", "clip", "{:.3f}"), ("loss", "loss", "{:.4f}"),
         ("grad_norm", "gnorm", "{:.3f}"),
         ("learning_rate", "lr", "{:.2e}"))


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


def _describe(algorithm) -> str:
  """'GRPO(epsilon=0.2, ...)': the algorithm and its settings, for the start line."""
  fields = ", ".join(f"{k}={v}" for k, v in vars(algorithm).items())
  return f"{algorithm.name}({fields})"


def train_policy(*, model_config: ModelConfig, run_dir: str, initial_checkpoint: str,
                 reward: str, num_steps: int, prompts: PromptConfig | None = None,
                 samples_per_prompt: int = 2, max_new_tokens: int = 64,
                 temperature: float = 0.9, beta: float = 0.1, anchor: str = "ema",
                 ema_rate: float = 0.01, baseline: str = "leave_one_out",
                 gold_reward: bool = False, algorithm=None, num_epochs: int = 1,
                 num_minibatches: int = 1,
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
                 nonfinite_rewards: str = "drop_rows",
                 operative_config: str | None = None, prompt_source=None,
                 eval_prompt_list: list[list[int]] | None = None,
                 diloco: DiLoCoConfig | None = None,
                 anchor_reset_every: int = 0) -> PolicyResult:
  """On-policy RL (default: KL-regularised REINFORCE) from an SFT model for
  `num_steps` rollout steps.

  Args:
    model_config: the policy's architecture (that of initial_checkpoint).
    run_dir: checkpoints/, TensorBoard events, config.gin.
    initial_checkpoint: the SFT model (model or run directory): the policy's
      initialisation, the EMA anchor's start and the fixed "kl_sft" reference.
    reward: a registered reward name (`rewards.names()`, e.g. "gold") or a
      reward model directory (`reward_model.save_reward_model`); a reward model
      with another vocab_size (or recorded tokenizer) than the policy is
      refused before any step.
    nonfinite_rewards: rows whose reward is NaN/inf: "drop_rows" (default:
      left out of the update and its baselines, a warning names the reward and
      the rows, metric nonfinite_rewards counts them), "skip_step" (the step is
      not applied and counts for nonfinite_policy) or "error" (stop, exit 1).
    num_steps: total RL steps (a resumed run counts from its checkpoint).
    prompts: the training prompts (PromptConfig; batch_size = prompts per step);
      each is sampled samples_per_prompt times, so a step has
      batch_size * samples_per_prompt sequences.
    max_new_tokens / temperature / eos_id: sampling (WARP: temperature 0.9).
    beta: the KL coefficient towards the anchor, for every algorithm: in the
      reward for REINFORCE and RLOO (r_beta = r - beta (log pi - log pi_anchor)),
      a k3 loss term for GRPO (the paper's 0.04).
    anchor: "ema" (WARP) or "sft"; ema_rate: mu of the EMA (0.01 in WARP). The
      anchor is the reference of every algorithm's KL.
    baseline: REINFORCE's baseline when `algorithm` is None: "leave_one_out"
      (needs samples_per_prompt >= 2), "mean", "none".
    algorithm: a `policy_optimization` algorithm: Reinforce(baseline) (None),
      RLOO(epsilon) or GRPO(epsilon, epsilon_high, scale_rewards,
      loss_normalization, ...); gin: `train_policy.algorithm = @GRPO()`.
    num_epochs / num_minibatches: optimizer steps per rollout batch (PPO
      epochs x strided minibatches; TRL's num_iterations / steps_per_generation).
      REINFORCE takes one; RLOO and GRPO clip the importance ratio. The
      optimizer schedule (warmup, decay) counts optimizer steps:
      num_steps x num_epochs x num_minibatches.
    gold_reward: also report the gold reward (training batches and eval).
    optimizer: Adam(W) settings (WARP: lr 1e-6, warmup 100).
    eval_prompts / num_eval_prompts / eval_every: held-out prompts (the first
      num_eval_prompts of eval_prompts, one sample each, fixed rng) scored every
      eval_every steps and at the end: eval/reward, eval/gold_reward,
      eval/kl_sft, eval/kl_sft_token_sum, eval/entropy, eval/response_length.
    prompt_source / eval_prompt_list: replace the prompt tasks (tests): an
      iterator like data.prompts.PromptIterator, and token-id prompts.
    diloco: train the policy with Streaming DiLoCo (`diloco_policy`): M
      replicas, replica m samples and updates on row block m of each step's
      batch with its own params θ_m (EMA anchor per replica); eval/* and
      checkpoint exports use the outer params θ̃; traffic/* scalars. The batch
      must be a multiple of num_replicas x the batch shards.
    anchor_reset_every: K > 0 sets the anchor to the policy every K steps (hard
      anchor updates, iterative BOND; needs anchor "ema"). An algorithm with
      `row_sources` (BOND, J-BOND) gets rows sampled from the anchor too
      (`mixed_rollout`); then reward/gold_reward average all rows.
  """
  if not initial_checkpoint:
    raise ValueError("train_policy needs initial_checkpoint: the SFT model directory "
                     "(policy init and KL reference); set train_policy.initial_checkpoint.")
  if not os.path.exists(initial_checkpoint):
    raise FileNotFoundError(f"initial_checkpoint {initial_checkpoint} does not exist: give the "
                            "SFT model (a model or run directory, e.g. runs/lm_quickstart from "
                            "gin/experiments/lm_quickstart.gin).")
  if prompts is None and prompt_source is None:
    raise ValueError("train_policy needs prompts: set train_policy.prompts = "
                     "@train_prompts/PromptConfig() (see gin/experiments/rl/reinforce.gin).")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  algorithm = algorithm or Reinforce(baseline)
  po.check_updates(algorithm, num_epochs, num_minibatches, samples_per_prompt)
  sources = mixed_rollout.row_sources(algorithm, samples_per_prompt)
  if (sources or anchor_reset_every) and diloco is not None:
    raise ValueError("Anchor samples (row_sources) and anchor_reset_every are not "
                     "supported with diloco; unset one of them.")
  if anchor_reset_every and anchor != "ema":
    raise ValueError("anchor_reset_every needs anchor = 'ema' (a stored anchor), got "
                     f"{anchor!r}.")
  guard = NonFiniteGuard(nonfinite_policy, max_consecutive_nonfinite)
  po.check_nonfinite_rewards(nonfinite_rewards)
  mesh = partitioning.create_mesh(ici_parallelism or {"data": -1}, dcn_parallelism)
  data = prompt_source or prompt_iterator(prompts)
  score = resolve_reward(reward, mesh, vocab_size=model_config.vocab_size,
                         tokenizer=(policy_tokenizer(initial_checkpoint, prompts)
                                    if os.path.isdir(reward) else None),
                         policy=f"the policy ({initial_checkpoint})")
  gold = rewards_lib.get("gold") if gold_reward else None
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
  updates = num_epochs * num_minibatches   # optimizer steps per rollout step
  schedule, tx = optimizer.build(num_steps * updates)
  trainer = PolicyTrainer(model_config, tx, schedule, mesh, beta=beta, anchor=anchor,
                          ema_rate=ema_rate, samples_per_prompt=samples_per_prompt,
                          algorithm=algorithm, num_epochs=num_epochs,
                          num_minibatches=num_minibatches,
                          num_microbatches=num_microbatches,
                          nonfinite_rewards=nonfinite_rewards)
  sampler = Sampler(model_config, SamplingConfig(max_new_tokens=max_new_tokens,
                                                 temperature=temperature, eos_id=eos_id),
                    mesh)
  sft_params = params_checkpoint.restore_params(initial_checkpoint, trainer.abstract_params,
                                                model_config)
  step_trainer, eval_params = trainer, lambda s: s.params
  if diloco is not None:
    step_trainer = diloco_policy.policy_loop(
        trainer, diloco, batch_size=batch_size, num_microbatches=num_microbatches)
    eval_params = step_trainer.eval_params
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              save_every_steps=checkpoint_every, max_to_keep=keep_checkpoints,
                              async_save=async_checkpointing)
  resumed_from, state, data_state = checkpointer.restore_latest(step_trainer.abstract_state)
  if resumed_from is not None:
    if "prompts" in data_state:
      data.set_state(data_state["prompts"])
    origin = f"resumed from step {resumed_from}"
  else:
    state = (trainer.init_state(sft_params) if diloco is None else
             step_trainer.trainer.state_from_params(sft_params))
    origin = f"initialised from {os.path.abspath(initial_checkpoint)}"
  start = int(jax.device_get(state.step))
  if diloco is None:  # PolicyState.step counts optimizer steps
    if start % updates:
      raise ValueError(
          f"The checkpoint in {run_dir} has taken {start} optimizer steps, not a multiple "
          f"of num_epochs x num_minibatches = {updates}: it was written with other "
          "settings. Resume with those, or start in a new run_dir.")
    start //= updates
  if diloco is not None:
    step_trainer.start(start)
  shown = SHOWN  # an algorithm's readable objective pieces in place of its surrogate "loss"
  if getattr(algorithm, "shown", None):
    shown = tuple(x for e in SHOWN for x in (algorithm.shown if e[0] == "loss" else (e,)))
  reporter = ProgressReporter(run_dir, total_steps=num_steps, start_step=start,
                              log_every=log_every, shown=shown)
  operative_config_lib.record(run_dir, operative_config)  # the start succeeded
  if operative_config:
    reporter.write_text(start, "config", operative_config)
  # mu only moves an EMA anchor; BOND's KL weight is fixed by N (no job beta).
  anchor_text = f"anchor {anchor}" + (f" (mu {ema_rate})" if anchor == "ema" else "")
  beta_text = f" | beta {beta}" if getattr(algorithm, "uses_beta", True) else ""
  reporter.print(f"{origin} | {_describe(algorithm)} | {anchor_text}{beta_text} | reward "
                 f"{reward} | {batch_size // samples_per_prompt}x{samples_per_prompt} "
                 f"samples/step | mesh {dict(mesh.shape)} | run_dir {run_dir}")
  if start >= num_steps:
    reporter.print(f"run already complete at step {start} (num_steps={num_steps})")
  base_rng = jax.random.key(seed)
  check = nonfinite_rewards_lib.RewardCheck(reward, nonfinite_rewards, reporter.print,
                                            "train_policy.nonfinite_rewards")
  scored = lambda sample, step: check(step, score(sample))

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
      prompt_list, prompt_length = repeated_prompts(batch, samples_per_prompt)
      key = jax.random.fold_in(base_rng, step)
      if diloco is None:
        if sources is None:
          sample = sampler(state.params, prompt_list, key, prompt_length=prompt_length)
        else:
          anchor_params = sft_params if state.anchor_params is None else state.anchor_params
          sample = mixed_rollout.sample(sampler, {"policy": state.params, "anchor": anchor_params},
                                        prompt_list, key, prompt_length, sources)
        state, metrics = trainer.step(state, sft_params,
                                      sample_batch(sample, scored(sample, step)))
        if anchor_reset_every and step % anchor_reset_every == 0:
          state = mixed_rollout.reset_anchor(state)
      else:  # block m sampled from replica m's params
        sample = diloco_policy.sample_replicas(sampler, state, prompt_list, key,
                                               prompt_length, trainer.param_shardings)
        state, metrics = step_trainer.train_step(
            state, diloco_policy.loop_batch(step_trainer,
                                            sample_batch(sample, scored(sample, step))),
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
