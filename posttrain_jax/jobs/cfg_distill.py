"""The `cfg_distill` job: diversity-rewarded CFG distillation from an initial model.

Cideron et al. 2024 (arXiv 2410.06084). The student starts at the initial
model theta_0 and is trained on its own samples (the online-student source:
prompts x samples_per_prompt, sampled from the current student, no gradient
through sampling) to maximise Q + beta * D (`rl.quality_diversity`): Q the
negative per-token reverse KL to the frozen theta_0 with classifier-free
guidance gamma (`distillation.cfg`), D the pairwise diversity reward
(`rl.diversity`). beta = 0 gives the quality model, beta > 0 the diversity
model; `tools/cfg_front.py` merges them by LERP and traces the front.

Checkpoints (TrainState: step, params, opt_state, plus the prompt iterator's
position) are atomic and resumable; the run directory is readable by
`params_checkpoint.locate` (sampling, merges, the front tool).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from posttrain_jax.core.trainer import TrainState
from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.distillation.cfg import cfg_batch
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import ModelConfig, params_checkpoint
from posttrain_jax.rl import diversity as diversity_lib
from posttrain_jax.rl.policy_training import prompt_iterator, repeated_prompts
from posttrain_jax.rl.quality_diversity import QDTrainer

SHOWN = (("kl", "kl", "{:.3f}"), ("diversity", "div", "{:.3f}"),
         ("response_length", "len", "{:.1f}"), ("loss", "loss", "{:.4f}"),
         ("grad_norm", "gnorm", "{:.3f}"), ("learning_rate", "lr", "{:.2e}"))


@dataclasses.dataclass
class CFGDistillResult:
  final_step: int
  metrics: dict[int, dict[str, float]]
  resumed_from: int | None
  state: TrainState | None = None


def cfg_distill(*, model_config: ModelConfig, run_dir: str, initial_checkpoint: str,
                num_steps: int, prompts: PromptConfig | None = None, gamma: float = 3.0,
                beta: float = 0.0, null_prompt: Sequence[int] = (0,),
                samples_per_prompt: int = 2, diversity_baseline: str = "batch",
                max_new_tokens: int = 32, temperature: float = 1.0,
                eos_id: int | None = 1,
                optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4,
                                                             warmup_steps=10),
                ici_parallelism: Mapping[str, int] | None = None,
                dcn_parallelism: Mapping[str, int] | None = None, seed: int = 0,
                checkpoint_every: int = 100, keep_checkpoints: int | None = 2,
                async_checkpointing: bool = True, log_every: int = 10,
                nonfinite_policy: str = "skip", max_consecutive_nonfinite: int = 10,
                operative_config: str | None = None, prompt_source=None) -> CFGDistillResult:
  """Trains a student by Q + beta * D for num_steps steps.

  Args:
    model_config: the architecture of initial_checkpoint (student and teacher).
    run_dir: checkpoints/, TensorBoard events, config.gin.
    initial_checkpoint: theta_0 (model or run directory): the student's start and
      the frozen CFG teacher.
    prompts: the conditions (PromptConfig; batch_size prompts per step), each
      sampled samples_per_prompt times (consecutive rows).
    gamma: the teacher's guidance (3 [M]); null_prompt: the token ids of the
      dropped condition (the unconditional branch).
    beta: the diversity weight (0: quality model; the paper's 15 [M]);
      diversity_baseline: "batch" (default), "leave_one_out" (G >= 3), "none".
    max_new_tokens / temperature / eos_id: the student's sampling (temperature 1
      keeps the diversity gradient unbiased).
    prompt_source: replaces the prompt task (tests): a PromptIterator-like object.
  """
  if not initial_checkpoint or not os.path.exists(initial_checkpoint):
    raise FileNotFoundError(f"cfg_distill needs initial_checkpoint (theta_0, an existing "
                            f"model or run directory), got {initial_checkpoint!r}.")
  if prompts is None and prompt_source is None:
    raise ValueError("cfg_distill needs prompts: set cfg_distill.prompts = "
                     "@train_prompts/PromptConfig() (gin/experiments/cfg_distillation/).")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  null_prompt = tuple(int(t) for t in null_prompt)
  data = prompt_source or prompt_iterator(prompts)
  num_prompts = prompts.batch_size if prompts is not None else data.batch_size
  if beta > 0:
    diversity_lib.check_baseline(diversity_baseline, samples_per_prompt, num_prompts)
  guard = NonFiniteGuard(nonfinite_policy, max_consecutive_nonfinite)
  mesh = partitioning.create_mesh(ici_parallelism or {"data": -1}, dcn_parallelism)
  shards = int(np.prod([mesh.shape[a] for a in ("replica", "data", "fsdp")]))
  if (num_prompts * samples_per_prompt) % shards:
    raise ValueError(f"prompts.batch_size * samples_per_prompt = "
                     f"{num_prompts * samples_per_prompt} is not divisible by the "
                     f"mesh's {shards} batch shards.")
  os.makedirs(run_dir, exist_ok=True)
  schedule, tx = optimizer.build(num_steps)
  trainer = QDTrainer(model_config, tx, schedule, mesh, gamma=gamma, beta=beta,
                      samples_per_prompt=samples_per_prompt, baseline=diversity_baseline)
  sampler = Sampler(model_config, SamplingConfig(max_new_tokens=max_new_tokens,
                                                 temperature=temperature, eos_id=eos_id),
                    mesh)
  teacher_params = params_checkpoint.restore_params(
      initial_checkpoint, trainer.abstract_teacher_params, model_config)
  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              save_every_steps=checkpoint_every, max_to_keep=keep_checkpoints,
                              async_save=async_checkpointing)
  resumed_from, state, data_state = checkpointer.restore_latest(trainer.abstract_state)
  if resumed_from is not None:
    data.set_state(data_state["prompts"])
    origin = f"resumed from step {resumed_from}"
  else:
    init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                   out_shardings=trainer.state_shardings)
    state = init(teacher_params)
    origin = f"student initialised from {os.path.abspath(initial_checkpoint)}"
  start = int(jax.device_get(state.step))
  reporter = ProgressReporter(run_dir, total_steps=num_steps, start_step=start,
                              log_every=log_every, shown=SHOWN)
  operative_config_lib.record(run_dir, operative_config)
  if operative_config:
    reporter.write_text(start, "config", operative_config)
  reporter.print(f"{origin} | CFG distillation gamma {gamma} null {null_prompt} | beta "
                 f"{beta} ({diversity_baseline} baseline) | {num_prompts}x"
                 f"{samples_per_prompt} samples/step | mesh {dict(mesh.shape)} | "
                 f"run_dir {run_dir}")
  base_rng = jax.random.key(seed)
  history: dict[int, dict[str, float]] = {}
  loop = StepLoop(start=start, num_steps=num_steps, guard=guard, reporter=reporter,
                  checkpointer=checkpointer, data_state=lambda: {"prompts": data.get_state()})
  try:
    for step in loop:
      batch = next(data)
      prompt_list, prompt_length = repeated_prompts(batch, samples_per_prompt)
      sample = sampler(state.params, prompt_list, jax.random.fold_in(base_rng, step),
                       prompt_length=prompt_length)
      state, metrics = trainer.train_step(state, cfg_batch(sample, null_prompt),
                                          teacher_params)
      loop.end_step(step, state, metrics)
      if step % log_every == 0 or step == num_steps:
        history[step] = {k: float(v) for k, v in jax.device_get(metrics).items()
                         if np.ndim(v) == 0}
    loop.finish(state)
  finally:
    loop.close()
  return CFGDistillResult(final_step=loop.final_step, metrics=history,
                          resumed_from=resumed_from, state=state)
