"""The distillation loop: frozen teacher -> student, with proxy/golden evaluation.

`distill` takes plain arguments (the binary wires them from gin: `job.name =
"distill"`, see gin/runs/distill.gin). Each step draws a batch from the data
source mixture (`distillation_sources`: offline teacher generations, fresh
teacher samples, on-policy student samples), scores it with the frozen teacher
and updates the student on the token-level divergence
(`distillation_trainer`). Every `eval_every` steps it computes the proxy
KL(teacher || student) and, given an oracle, the golden KL(oracle || student)
on held-out prompts (`distillation_eval`), written as eval/* TensorBoard
scalars. Resuming restores the student, the optimizer and every source's
position, so a preempted run continues exactly where it stopped.

With `diloco`, the student trains under Streaming DiLoCo (`diloco_loop.
distillation`): M replicas on the mesh's "replica" axis, each taking the
distillation step on its rows of every batch with the shared frozen teacher.
As in `train.train`, evaluation (proxy/golden, LM eval) uses the OUTER
parameters, checkpoints hold the whole DiLoCoState (exact resume mid-window),
traffic is written as traffic/* scalars, and the online_student source
samples from the outer parameters (the replicas' own params are not shared
between syncs).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os

import jax

from posttrain_jax.core import operative_config as operative_config_lib
from posttrain_jax.core import partitioning
from posttrain_jax.core.checkpointing import Checkpointer
from posttrain_jax.core.nonfinite_guard import NonFiniteGuard
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.progress import ProgressReporter
from posttrain_jax.core.step_loop import StepLoop
from posttrain_jax.data.dataset_config import DatasetConfig, PromptConfig
from posttrain_jax.diloco import loop as diloco_loop
from posttrain_jax.diloco.streaming_diloco import DiLoCoConfig
from posttrain_jax.distillation.eval import ProxyGoldenEvaluator, restore_frozen, save_per_prompt
from posttrain_jax.distillation.sources import (
    MixtureSource, OfflineSource, OnlineSource, check_weights)
from posttrain_jax.distillation.trainer import DistillationTrainer
from posttrain_jax.inference.sampling import SamplingConfig
from posttrain_jax.jobs import train as train_lib
from posttrain_jax.models import ModelConfig
from posttrain_jax.models import params_checkpoint


@dataclasses.dataclass
class DistillResult:
  final_step: int
  losses: dict[int, float]
  eval_metrics: dict[int, dict[str, float]]
  resumed_from: int | None
  source_counts: dict[str, int]
  preempted: bool = False
  traffic: dict[str, float] | None = None  # DiLoCo bytes (DiLoCoLoop.traffic)


def _prompt_iterator(cfg: PromptConfig):
  from posttrain_jax.data.prompts import PromptIterator  # TF lives in data/
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"Prompt batch_size {cfg.batch_size} is not divisible by "
                     f"{jax.process_count()} processes.")
  return PromptIterator(task_name=cfg.task_name, split=cfg.split,
                        prompt_length=cfg.prompt_length,
                        batch_size=cfg.batch_size // jax.process_count(),
                        shuffle=cfg.shuffle, seed=cfg.seed, num_epochs=cfg.num_epochs,
                        shard_index=jax.process_index(), num_shards=jax.process_count())


def _load_prompts(cfg: PromptConfig, num_prompts: int) -> list[list[int]]:
  from posttrain_jax.data.prompts import load_prompts
  return load_prompts(task_name=cfg.task_name, split=cfg.split,
                      prompt_length=cfg.prompt_length, num_prompts=num_prompts)


def reference_config(checkpoint: str, config: ModelConfig | None,
                     dtype: str | None = None) -> ModelConfig:
  """A frozen model's config: given, else read from its checkpoint; dtype override."""
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"Checkpoint {checkpoint} does not exist.")
  config = config or params_checkpoint.model_config_of(params_checkpoint.locate(checkpoint))
  return dataclasses.replace(config, dtype=dtype) if dtype else config


def distill(*, student_config: ModelConfig, teacher_checkpoint: str, run_dir: str,
            num_steps: int, sources: Mapping[str, float] = None,
            teacher_config: ModelConfig | None = None, teacher_dtype: str | None = None,
            offline_data: DatasetConfig | None = None,
            prompts: PromptConfig | None = None, max_new_tokens: int = 64,
            sampling_temperature: float = 1.0,
            loss: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
            chunk_size: int | None = None,
            optimizer: OptimizerConfig = OptimizerConfig(),
            initial_checkpoint: str | None = None,
            oracle_checkpoint: str | None = None,
            oracle_config: ModelConfig | None = None,
            eval_prompts: PromptConfig | None = None, num_eval_prompts: int = 64,
            eval_max_new_tokens: int | None = None, eval_every: int = 0,
            eval_data: DatasetConfig | None = None, eval_batches: int | None = 20,
            ici_parallelism: Mapping[str, int] | None = None,
            dcn_parallelism: Mapping[str, int] | None = None,
            num_microbatches: int = 1, seed: int = 0, checkpoint_every: int = 1000,
            keep_checkpoints: int | None = 3, async_checkpointing: bool = True,
            log_every: int = 10, operative_config: str | None = None,
            nonfinite_policy: str = "skip",
            max_consecutive_nonfinite: int = 10,
            diloco: DiLoCoConfig | None = None) -> DistillResult:
  """Distils a frozen teacher into the student for `num_steps` steps.

  Args:
    student_config / teacher_config: architectures (teacher_config None: read
      from teacher_checkpoint's model.gin / config.gin); teacher_dtype overrides
      the teacher's compute dtype (e.g. "bfloat16").
    teacher_checkpoint: model or run directory of the teacher (required).
    sources: {source: weight} over "offline", "online_teacher",
      "online_student" (default {"offline": 1.0}); one source per step, drawn
      with these probabilities.
    offline_data: the offline dataset (a prompt+response task, e.g. written by
      tools/generate_dataset.py; or a plain LM task for pretraining distillation).
    prompts: prompts for the online sources; max_new_tokens and
      sampling_temperature set their sampling.
    loss / temperature / beta / chunk_size: the token-level divergence, see
      distillation_losses (chunk_size computes logits chunk by chunk).
    initial_checkpoint: the student's starting parameters (e.g. its SFT run).
    oracle_checkpoint / oracle_config: the oracle for the golden metric.
    eval_prompts / num_eval_prompts / eval_max_new_tokens / eval_every:
      proxy/golden evaluation on that many held-out prompts every eval_every
      steps and at the end (eval_every 0: only at the end).
    eval_data / eval_batches: also the student's LM loss on a held-out set.
    diloco: train the student with Streaming DiLoCo (see the module docstring);
      every batch size must be a multiple of num_replicas x the batch shards.
    Other arguments as `train.train`.
  """
  sources = dict(sources or {"offline": 1.0})
  check_weights(sources)
  active = {n for n, w in sources.items() if w > 0}
  if "offline" in active and offline_data is None:
    raise ValueError("Source 'offline' needs offline_data (a DatasetConfig of teacher "
                     "generations, e.g. written by tools/generate_dataset.py).")
  if active - {"offline"} and prompts is None:
    raise ValueError(f"Sources {sorted(active - {'offline'})} sample online and need "
                     "`prompts` (a PromptConfig).")
  guard = NonFiniteGuard(nonfinite_policy, max_consecutive_nonfinite)
  os.makedirs(run_dir, exist_ok=True)
  teacher_config = reference_config(teacher_checkpoint, teacher_config, teacher_dtype)
  mesh = partitioning.create_mesh(ici_parallelism or {"data": -1}, dcn_parallelism)
  schedule, tx = optimizer.build(num_steps)
  trainer = DistillationTrainer(student_config, teacher_config, tx, schedule, mesh,
                                kind=loss, temperature=temperature, beta=beta,
                                chunk_size=chunk_size, num_microbatches=num_microbatches)
  teacher_params = params_checkpoint.restore_params(
      teacher_checkpoint, trainer.abstract_teacher_params, teacher_config)
  step_trainer, eval_params = trainer, lambda s: s.params
  if diloco is not None:
    sizes = [c.batch_size for n, c in (("offline", offline_data), ("online", prompts))
             if any(a.startswith(n) for a in active)]
    step_trainer = diloco_loop.distillation(
        trainer, diloco, batch_size=sizes, kind=loss, temperature=temperature,
        beta=beta, chunk_size=chunk_size, num_microbatches=num_microbatches)
    eval_params = step_trainer.eval_params

  sampling = SamplingConfig(max_new_tokens=max_new_tokens,
                            temperature=sampling_temperature)
  built = {}
  for name in sorted(active):
    if name == "offline":
      built[name] = OfflineSource(
          train_lib._train_iterator(offline_data), trainer.shard_batch,  # pylint: disable=protected-access
          lambda b: train_lib.check_token_ids(b, student_config.vocab_size))
    else:
      config = teacher_config if name == "online_teacher" else student_config
      built[name] = OnlineSource(name, config, _prompt_iterator(prompts), sampling,
                                 mesh, seed=seed + 1 + SOURCE_SEEDS[name])
  data = MixtureSource(built, {n: sources[n] for n in active}, seed=seed)

  checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"),
                              save_every_steps=checkpoint_every,
                              max_to_keep=keep_checkpoints, async_save=async_checkpointing)
  resumed_from, state, data_state = checkpointer.restore_latest(step_trainer.abstract_state)
  if resumed_from is not None:
    data.set_state(data_state["sources"])
    data.counts.update(data_state.get("counts", {}))
    origin = f"resumed from step {resumed_from}"
  elif initial_checkpoint:
    state = (train_lib.state_from_initial_checkpoint(trainer, student_config,
                                                     initial_checkpoint)
             if diloco is None else step_trainer.state_from_initial_checkpoint(
                 student_config, initial_checkpoint))
    origin = f"student initialised from {os.path.abspath(initial_checkpoint)}"
  else:
    state = step_trainer.init_state(jax.random.key(seed))
    origin = "student initialised at random"
  start = int(jax.device_get(state.step))
  if diloco is not None:
    step_trainer.start(start)

  evaluator = None
  if eval_prompts is not None and num_steps > start:
    references = {"proxy": (teacher_config, teacher_params)}
    if oracle_checkpoint:
      oracle_config = reference_config(oracle_checkpoint, oracle_config)
      references["golden"] = (oracle_config, restore_frozen(oracle_checkpoint,
                                                            oracle_config, mesh))
    evaluator = ProxyGoldenEvaluator(
        student_config, references, _load_prompts(eval_prompts, num_eval_prompts),
        max_new_tokens=eval_max_new_tokens or max_new_tokens,
        batch_size=eval_prompts.batch_size, mesh=mesh, seed=seed + 7919)
  lm_eval_set = (train_lib._eval_batches(eval_data, eval_batches)  # pylint: disable=protected-access
                 if eval_data is not None and num_steps > start else None)

  reporter = ProgressReporter(run_dir, total_steps=num_steps, start_step=start,
                              log_every=log_every,
                              shown=ProgressReporter.SHOWN[:1] + (("nll", "nll", "{:.4f}"),)
                              + ProgressReporter.SHOWN[1:])
  operative_config_lib.record(run_dir, operative_config)  # the start succeeded
  if operative_config:
    reporter.write_text(start, "config", operative_config)
  reporter.print(f"{origin} | teacher {teacher_checkpoint} | sources {dict(sources)} | "
                 f"loss {loss} | mesh {dict(mesh.shape)} | run_dir {run_dir}")
  if start >= num_steps:
    reporter.print(f"run already complete at step {start} (num_steps={num_steps}); "
                   "raise num_steps to train further")

  def evaluate(step):
    metrics = evaluator(eval_params(state)) if evaluator is not None else {}
    if evaluator is not None and jax.process_index() == 0:
      save_per_prompt(run_dir, step, evaluator.per_prompt)
    if lm_eval_set:
      lm = train_lib.evaluate(trainer, eval_params(state), lm_eval_set)
      metrics.update({f"lm_{k}": v for k, v in lm.items()})
    if metrics:
      eval_metrics[step] = metrics
      reporter.write_eval(step, metrics)

  eval_metrics = {}
  if start == 0 and num_steps > 0 and eval_every:
    evaluate(0)  # the starting point of the proxy/golden curves
  loop = StepLoop(start=start, num_steps=num_steps, guard=guard, reporter=reporter,
                  checkpointer=checkpointer, data_state=lambda: _data_state(data))
  try:
    for step in loop:
      batch = data.next_batch(step, eval_params(state), teacher_params)
      state, metrics = step_trainer.train_step(state, batch, teacher_params)
      loop.end_step(step, state, metrics)
      if diloco is not None and (step % log_every == 0 or step == num_steps):
        step_trainer.write_traffic(reporter, step)
      if (eval_every and step % eval_every == 0) or step == num_steps:
        evaluate(step)
    loop.finish(state)
    if diloco is not None:
      reporter.print(step_trainer.summary())
  finally:
    loop.close()
  return DistillResult(final_step=loop.final_step,
                       losses=dict(reporter.history), eval_metrics=eval_metrics,
                       resumed_from=resumed_from, source_counts=dict(data.counts),
                       preempted=loop.preempted,
                       traffic=step_trainer.traffic() if diloco is not None else None)


SOURCE_SEEDS = {"online_teacher": 0, "online_student": 1}


def _data_state(data: MixtureSource) -> dict:
  return {"sources": data.get_state(), "counts": dict(data.counts)}
