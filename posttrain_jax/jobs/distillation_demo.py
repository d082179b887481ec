"""The post-training demo: oracle -> teacher -> student distillation on CPU in minutes.

A miniature of the teacher-hacking setup (Tiapkin et al. 2025, arXiv
2502.02671; the full study is gin/experiments/teacher_hacking/):

1. the oracle pi*: a language model of the shipped corpus (`train.train`);
2. the teacher pi_T: a smaller model trained for fewer steps on the same
   corpus, an imperfect copy of the oracle's distribution;
3. the student pi_S: the smallest model, distilled from the frozen teacher
   (`distill.distill`, fresh teacher samples by default), printing the
   distillation loss and, on held-out prompts, the proxy KL(teacher || student)
   and the golden KL(oracle || student).

Each stage writes its own run directory under run_dir and is skipped when it
is already complete, so running the command again resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.jobs import distill as distill_lib
from posttrain_jax.jobs import train as train_lib
from posttrain_jax.models import ModelConfig
from posttrain_jax.models import params_checkpoint


def distillation_demo(*, run_dir: str, oracle_config: ModelConfig,
                      teacher_config: ModelConfig, student_config: ModelConfig,
                      oracle_steps: int, teacher_steps: int, student_steps: int,
                      task: str = "pydoc_lm", sequence_length: int = 128,
                      batch_size: int = 16, learning_rate: float = 3e-3,
                      sources: Mapping[str, float] | None = None,
                      prompt_length: int = 32, max_new_tokens: int = 32,
                      distill_batch_size: int = 16, distill_learning_rate: float = 1e-3,
                      num_eval_prompts: int = 32, eval_every: int = 50,
                      log_every: int = 20, operative_config: str | None = None):
  """Runs the three stages; returns the student's `distill.DistillResult`.

  Args:
    run_dir: parent of the oracle/, teacher/ and student/ run directories.
    oracle_config / teacher_config / student_config: the three models (one
      vocabulary).
    oracle_steps / teacher_steps / student_steps: steps of each stage.
    task, sequence_length, batch_size, learning_rate: LM training of the
      oracle and the teacher.
    sources: the student's data sources (default fresh teacher samples).
    prompt_length, max_new_tokens, distill_batch_size, distill_learning_rate:
      the student's distillation.
    num_eval_prompts, eval_every: proxy/golden evaluation on held-out prompts.
    operative_config: saved with every stage.
  """
  data = DatasetConfig(task_name=task, split="train", sequence_length=sequence_length,
                       batch_size=batch_size)
  eval_data = DatasetConfig(task_name=task, split="validation",
                            sequence_length=sequence_length, batch_size=batch_size,
                            shuffle=False, num_epochs=1)
  lm_optimizer = OptimizerConfig(learning_rate=learning_rate,
                                 warmup_steps=max(1, oracle_steps // 10), weight_decay=0.1)
  dirs = {name: os.path.join(run_dir, name) for name in ("oracle", "teacher", "student")}
  configs = {"oracle": oracle_config, "teacher": teacher_config, "student": student_config}
  for stage, config in configs.items():
    # Each stage's own model.gin: tools (sample, convert_hf, distill) read it
    # before the operative config.gin, whose unscoped ModelConfig is the oracle.
    os.makedirs(dirs[stage], exist_ok=True)
    with open(os.path.join(dirs[stage], "model.gin"), "w") as f:
      f.write(params_checkpoint.model_gin(config, f"{stage} of the demo"))
  for stage, (config, steps) in (("oracle", (oracle_config, oracle_steps)),
                                 ("teacher", (teacher_config, teacher_steps))):
    print(f"== stage {stage}: {config.num_layers} layers x {config.embed_dim}, "
          f"{steps} steps of LM training on {task!r} -> {dirs[stage]}", flush=True)
    train_lib.train(model_config=config, run_dir=dirs[stage], train_data=data,
                    num_steps=steps, optimizer=lm_optimizer, eval_data=eval_data,
                    eval_batches=4, checkpoint_every=steps, keep_checkpoints=1,
                    log_every=log_every, operative_config=operative_config)
  prompts = PromptConfig(task_name="pydoc_prompts", split="train",
                         prompt_length=prompt_length, batch_size=distill_batch_size)
  eval_prompts = PromptConfig(task_name="pydoc_prompts", split="validation",
                              prompt_length=prompt_length, batch_size=num_eval_prompts,
                              shuffle=False)
  sources = dict(sources or {"online_teacher": 1.0})
  print(f"== stage student: {student_config.num_layers} layers x "
        f"{student_config.embed_dim}, {student_steps} steps of distillation from the "
        f"teacher on {sources} -> {dirs['student']}; eval: proxy = KL(teacher || "
        f"student), golden = KL(oracle || student) on {num_eval_prompts} held-out "
        "prompts (nats per sequence)", flush=True)
  result = distill_lib.distill(
      student_config=student_config, teacher_checkpoint=dirs["teacher"],
      teacher_config=teacher_config, oracle_config=oracle_config,
      run_dir=dirs["student"], num_steps=student_steps, sources=sources,
      prompts=prompts, max_new_tokens=max_new_tokens,
      optimizer=OptimizerConfig(learning_rate=distill_learning_rate,
                                warmup_steps=max(1, student_steps // 10), weight_decay=0.0),
      oracle_checkpoint=dirs["oracle"], eval_prompts=eval_prompts,
      num_eval_prompts=num_eval_prompts, eval_every=eval_every,
      checkpoint_every=student_steps, keep_checkpoints=1, log_every=log_every,
      operative_config=operative_config)
  if result.eval_metrics:
    first, last = min(result.eval_metrics), max(result.eval_metrics)
    a, b = result.eval_metrics[first], result.eval_metrics[last]
    print(f"== done: proxy {a['proxy_kl']:.2f} -> {b['proxy_kl']:.2f}, golden "
          f"{a['golden_kl']:.2f} -> {b['golden_kl']:.2f} (steps {first} -> {last}); "
          f"TensorBoard: tensorboard --logdir {run_dir}", flush=True)
  return result
