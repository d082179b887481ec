"""The `train_clp` job: one policy steerable over several rewards (CLP).

Wang et al. 2024, arXiv 2407.15762; `rl/clp.py` (conditioning) and
`rl/clp_training.py` (the step). Each step draws one w ~ Dirichlet per prompt,
samples G responses per prompt from pi_theta(.|x, w), scores them with every
reward (registered names or reward model directories) and takes one KL-regularised
REINFORCE step on w . r. Checkpoints hold the state and the prompt position
(exact resume); `RUN_DIR/clp.json` records the rewards and the CLPConfig so
tools/sample.py --weights and tools/eval_front.py clp can rebuild the policy.
eval/w=W/reward_i, eval/w=W/kl_sft_token_sum ... on held-out prompts for every
w of eval_weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os

import jax
import numpy as np

from posttrain_jax.core import operative_config as operative_config_lib
from posttrain_jax.core import partitioning
from posttrain_jax.core.checkpointing import Checkpointer
from posttrain_jax.core.nonfinite_guard import NonFiniteGuard
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.progress import ProgressReporter
from posttrain_jax.core.step_loop import StepLoop
from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.inference.sampling import SamplingConfig
from posttrain_jax.models import ModelConfig, params_checkpoint
from posttrain_jax.rl import clp as clp_lib
from posttrain_jax.rl import clp_training
from posttrain_jax.rl import nonfinite_rewards
from posttrain_jax.rl.clp_training import read_clp_json, sentencepiece_encoder, write_clp_json  # pylint: disable=unused-import
from posttrain_jax.rl.gold_reward import VOCAB_PATH
from posttrain_jax.rl.policy_training import (load_eval_prompts, policy_tokenizer,
                                             prompt_iterator, repeated_prompts,
                                             resolve_reward)

SHOWN = (("reward", "w.r", "{:.3f}"), ("reward_0", "r0", "{:.3f}"), ("reward_1", "r1", "{:.3f}"),
         ("kl_sft", "kl_sft", "{:.3f}"), ("response_length", "len", "{:.1f}"),
         ("loss", "loss", "{:.4f}"), ("grad_norm", "gnorm", "{:.3f}"))


@dataclasses.dataclass
class CLPResult:
  final_step: int
  metrics: dict[int, dict[str, float]]
  eval_metrics: dict[int, dict[str, float]]
  resumed_from: int | None
  state: object = None


def weight_label(w) -> str:
  return "w=" + ",".join(f"{x:g}" for x in np.asarray(w).round(4))


def train_clp(*, model_config: ModelConfig, run_dir: str, initial_checkpoint: str,
              rewards: Sequence[str], num_steps: int,
              clp: clp_lib.CLPConfig = clp_lib.CLPConfig(),
              prompts: PromptConfig | None = None, samples_per_prompt: int = 2,
              max_new_tokens: int = 32, temperature: float = 1.0, beta: float = 0.1,
              baseline: str = "leave_one_out",
              optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4,
                                                           warmup_steps=10),
              eval_prompts: PromptConfig | None = None, num_eval_prompts: int = 32,
              eval_every: int = 0,
              eval_weights: Sequence[Sequence[float]] = ((1.0, 0.0), (0.5, 0.5), (0.0, 1.0)),
              ici_parallelism: Mapping[str, int] | None = None, num_microbatches: int = 1,
              seed: int = 0, checkpoint_every: int = 100, keep_checkpoints: int | None = 2,
              async_checkpointing: bool = True, log_every: int = 10, eos_id: int | None = 1,
              vocab_path: str = VOCAB_PATH, operative_config: str | None = None,
              prompt_source=None, eval_prompt_list: list[list[int]] | None = None
              ) -> CLPResult:
  """CLP from an SFT model for num_steps rollout steps.

  Args:
    rewards: m reward names (`rewards.names()`) or reward model directories; w has
      m entries, w_i weighting rewards[i]; clp.num_rewards must equal m.
    clp: the conditioning (`rl.clp.CLPConfig`: mixing none/full/attn/logit, prompt
      conditioning, Dirichlet alpha, ...).
    beta: alpha of the objective, the KL coefficient to the SFT model.
    eval_weights: the weightings evaluated every eval_every steps and at the end.
    vocab_path: the SentencePiece model that serialises w (prompt conditioning).
    Others as in `train_policy`.
  """
  if not initial_checkpoint or not os.path.exists(initial_checkpoint):
    raise FileNotFoundError(f"initial_checkpoint {initial_checkpoint!r} (the SFT model) "
                            "does not exist; set train_clp.initial_checkpoint.")
  if len(rewards) != clp.num_rewards:
    raise ValueError(f"train_clp got {len(rewards)} rewards {list(rewards)} but "
                     f"CLPConfig.num_rewards = {clp.num_rewards}; make them equal.")
  if prompts is None and prompt_source is None:
    raise ValueError("train_clp needs prompts: set train_clp.prompts = "
                     "@train_prompts/PromptConfig() (see gin/experiments/clp/clp.gin).")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  eval_weights = [clp_lib.check_weights(w, clp.num_rewards) for w in eval_weights]
  mesh = partitioning.create_mesh(ici_parallelism or {"data": -1})
  data = prompt_source or prompt_iterator(prompts)
  tokenizer = (policy_tokenizer(initial_checkpoint, prompts)
               if any(os.path.isdir(r) for r in rewards) else None)
  scores = [resolve_reward(r, mesh, vocab_size=model_config.vocab_size, tokenizer=tokenizer,
                           policy=f"the policy ({initial_checkpoint})") for r in rewards]
  encode = sentencepiece_encoder(vocab_path) if clp.prompt_conditioning else None
  os.makedirs(run_dir, exist_ok=True)
  schedule, tx = optimizer.build(num_steps)
  trainer = clp_training.CLPTrainer(model_config, clp, tx, schedule, mesh, beta=beta,
                                    samples_per_prompt=samples_per_prompt, baseline=baseline,
                                    num_microbatches=num_microbatches)
  sampler = clp_training.CLPSampler(trainer.policy, SamplingConfig(
      max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id), mesh,
      trainer.clp_shardings)
  sft_params = params_checkpoint.restore_params(initial_checkpoint, trainer.abstract_params,
                                                model_config)
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              save_every_steps=checkpoint_every, max_to_keep=keep_checkpoints,
                              async_save=async_checkpointing)
  resumed_from, state, data_state = checkpointer.restore_latest(trainer.abstract_state)
  if resumed_from is not None:
    data.set_state(data_state["prompts"])
  else:
    state = trainer.init_state(sft_params)
  start = int(jax.device_get(state.step))
  write_clp_json(run_dir, rewards, clp, vocab_path)
  reporter = ProgressReporter(run_dir, total_steps=num_steps, start_step=start,
                              log_every=log_every, shown=SHOWN)
  operative_config_lib.record(run_dir, operative_config)
  if operative_config:
    reporter.write_text(start, "config", operative_config)
  reporter.print(f"{'resumed from step ' + str(resumed_from) if resumed_from else 'start'} | "
                 f"CLP {clp} | rewards {list(rewards)} | beta {beta} | mesh "
                 f"{dict(mesh.shape)} | run_dir {run_dir}")
  eval_list = eval_prompt_list or (load_eval_prompts(eval_prompts, num_eval_prompts)
                                   if eval_prompts is not None else None)
  shards = int(np.prod([mesh.shape[a] for a in ("replica", "data", "fsdp")]))
  per_step = (prompts.batch_size if prompts else data.batch_size) * samples_per_prompt
  for what, n in (("prompts per step x samples_per_prompt", per_step),
                  ("num_eval_prompts", len(eval_list or ()))):
    if n % shards:
      raise ValueError(f"{what} = {n} is not divisible by the mesh's {shards} batch shards; "
                       "change it or ici_parallelism.")
  base_key = jax.random.key(seed)

  def rollout(params, prompt_list, weights, key, prompt_length=None):
    conditioned, prefix = clp_training.conditioned_prompts(prompt_list, weights, clp, encode)
    length = None if prompt_length is None else prompt_length + int(prefix.max())
    sample = sampler(params, weights, conditioned, key, prompt_length=length)
    r = np.stack([np.asarray(jax.device_get(s(sample)), np.float32) for s in scores], -1)
    return clp_training.sample_batch(sample, weights, r, prefix)

  def evaluate(step):
    out = {}
    for w in eval_weights:
      w_rows = np.repeat(w[None], len(eval_list), 0)
      if clp.prompt_conditioning:
        w_rows = clp_lib.round_to_simplex(w_rows, clp.weight_decimals)
      batch = rollout(state.params, eval_list, w_rows, jax.random.fold_in(base_key, 0))
      metrics = jax.device_get(trainer.eval_metrics(state.params, sft_params, batch))
      out.update({f"{weight_label(w)}/{k}": float(v) for k, v in metrics.items()})
    reporter.write_eval(step, out)
    return out

  history, eval_history = {}, {}
  checks = [nonfinite_rewards.RewardCheck(r, "drop_rows", reporter.print) for r in rewards]
  loop = StepLoop(start=start, num_steps=num_steps, guard=NonFiniteGuard("skip", 10),
                  reporter=reporter, checkpointer=checkpointer,
                  data_state=lambda: {"prompts": data.get_state()})
  try:
    for step in loop:
      batch = next(data)
      prompt_list, prompt_length = repeated_prompts(batch, samples_per_prompt)
      # w of step t from (seed, t) alone: a resumed run draws what it would have
      w = clp_lib.sample_weights(np.random.default_rng([seed, step]), len(batch["prompts"]),
                                 clp.num_rewards, clp.dirichlet_alpha)
      if clp.prompt_conditioning:
        w = clp_lib.round_to_simplex(w, clp.weight_decimals)
      w = np.repeat(w, samples_per_prompt, axis=0)  # one w per prompt, shared by its samples
      sample_batch = rollout(state.params, prompt_list, w, jax.random.fold_in(base_key, step),
                             prompt_length=prompt_length)
      for i, check in enumerate(checks):  # rows with a NaN/inf reward are left out
        check(step, sample_batch["rewards"][:, i])
      state, metrics = trainer.step(state, sft_params, sample_batch)
      loop.end_step(step, state, metrics)
      if step % log_every == 0 or step == num_steps:
        history[step] = {k: float(v) for k, v in jax.device_get(metrics).items()
                         if np.ndim(v) == 0}
      if eval_list and ((eval_every and step % eval_every == 0) or step == num_steps):
        eval_history[step] = evaluate(step)
    loop.finish(state)
  finally:
    loop.close()
  return CLPResult(final_step=loop.final_step, metrics=history, eval_metrics=eval_history,
                   resumed_from=resumed_from, state=state)
