"""The distillation loop end to end: sources, proxy/golden eval, resume, errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.distillation import eval as eval_lib
from posttrain_jax.jobs.distill import distill
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint

STUDENT = ModelConfig(vocab_size=2048, embed_dim=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64, sliding_window_size=16)
TEACHER = dataclasses.replace(STUDENT, embed_dim=48, head_dim=24)
PROMPT_LEN, NEW = 8, 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  dirs = {}
  for name, cfg, seed in (("teacher", TEACHER, 1), ("oracle", TEACHER, 2)):
    params = nn.unbox(Transformer(cfg).init(jax.random.key(seed),
                                            jnp.zeros((1, 1), jnp.int32))["params"])
    params_checkpoint.save(str(root / name), params, cfg)
    dirs[name] = str(root / name)
  from posttrain_jax.data import generated
  rng = np.random.default_rng(0)
  records = [{"prompt": rng.integers(2, 2048, rng.integers(2, PROMPT_LEN + 1)).astype(np.int32),
              "response": rng.integers(2, 2048, rng.integers(1, NEW + 1)).astype(np.int32),
              "prompt_index": i, "sample_index": 0} for i in range(24)]
  generated.write_generated_dataset(records, data_dir=str(root / "data"), name="teacher")
  dirs["task"] = generated.register_generated_task("test_distill_teacher_data", name="teacher",
                                                   data_dir=str(root / "data"))
  return dirs


def run(models, run_dir, num_steps, sources, **kwargs):
  offline = DatasetConfig(task_name=models["task"], split="train",
                          sequence_length=PROMPT_LEN + NEW, batch_size=8, pack=False,
                          inputs_length=PROMPT_LEN)
  prompts = PromptConfig(task_name="pydoc_prompts", split="train",
                         prompt_length=PROMPT_LEN, batch_size=8)
  eval_prompts = PromptConfig(task_name="pydoc_prompts", split="validation",
                              prompt_length=PROMPT_LEN, batch_size=8, shuffle=False)
  args = dict(student_config=STUDENT, teacher_checkpoint=models["teacher"],
              run_dir=str(run_dir), num_steps=num_steps, sources=sources,
              offline_data=offline, prompts=prompts, max_new_tokens=NEW,
              optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1, decay_steps=4),
              oracle_checkpoint=models["oracle"], eval_prompts=eval_prompts,
              num_eval_prompts=8, eval_every=2, checkpoint_every=2,
              async_checkpointing=False, log_every=1)
  args.update(kwargs)
  return distill(**args)


def test_mixture_runs_evaluates_and_resumes_exactly(models, tmp_path):
  sources = {"offline": 1.0, "online_teacher": 1.0, "online_student": 1.0}
  full = run(models, tmp_path / "full", 4, sources)
  assert sorted(full.eval_metrics) == [0, 2, 4]
  metrics = full.eval_metrics[4]
  for k in ("proxy_kl", "proxy_kl_token_sum", "golden_kl", "golden_kl_token_sum"):
    assert np.isfinite(metrics[k]) and metrics[k] > 0, k
  assert sum(full.source_counts.values()) == 4
  # Per-prompt values of every evaluation, saved for paired comparisons; their
  # mean is the logged metric.
  saved = eval_lib.load_per_prompt(str(tmp_path / "full"))
  assert sorted(saved) == [0, 2, 4]
  assert saved[4]["golden"].shape == (8,)
  np.testing.assert_allclose(saved[4]["golden"].mean(), metrics["golden_kl"], rtol=1e-5)
  np.testing.assert_allclose(saved[4]["proxy"].mean(), metrics["proxy_kl"], rtol=1e-5)
  np.testing.assert_allclose(
      eval_lib.paired_stderr(saved[4]["golden"], saved[0]["golden"]),
      metrics["golden_kl_change_stderr"], rtol=1e-5)
  # Stop after 2 steps, resume to 4: same losses and metrics as the single run.
  part = run(models, tmp_path / "split", 2, sources)
  rest = run(models, tmp_path / "split", 4, sources)
  assert rest.resumed_from == 2
  losses = {**part.losses, **rest.losses}
  for step in range(1, 5):
    np.testing.assert_allclose(losses[step], full.losses[step], rtol=1e-5, err_msg=step)
  np.testing.assert_allclose(rest.eval_metrics[4]["golden_kl"], metrics["golden_kl"],
                             rtol=1e-5)
  assert rest.source_counts == full.source_counts


def test_offline_source_needs_data_and_online_needs_prompts(models, tmp_path):
  with pytest.raises(ValueError, match="needs offline_data"):
    run(models, tmp_path / "a", 1, {"offline": 1.0}, offline_data=None)
  with pytest.raises(ValueError, match="need `prompts`"):
    run(models, tmp_path / "b", 1, {"online_student": 1.0}, prompts=None)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    run(models, tmp_path / "c", 1, {"offline": 1.0}, teacher_checkpoint=str(tmp_path / "no"))


def test_teacher_with_another_vocabulary_is_rejected(models, tmp_path):
  with pytest.raises(ValueError, match="one vocabulary"):
    run(models, tmp_path / "d", 1, {"offline": 1.0},
        student_config=dataclasses.replace(STUDENT, vocab_size=1024))


def test_pretraining_distillation_gin_configures_an_lm_source():
  import gin
  from posttrain_jax import cli, main
  main.register_configurables()
  gin.clear_config()
  try:
    cli.configure(cli.parse_flags(["--gin_file=gin/experiments/pretraining_distillation.gin"]))
    assert gin.query_parameter("job.name") == "distill"
    assert gin.query_parameter("distill.sources") == {"offline": 1.0}
    assert gin.query_parameter("lm_text/DatasetConfig.task_name") == "pydoc_lm"
    assert gin.query_parameter("lm_text/DatasetConfig.pack") is True
  finally:
    gin.clear_config()
