"""Training binary.

  python -m posttrain_jax.main --gin_file=gin/experiments/quickstart.gin \
      [--gin_file=more.gin] [--gin.NAME=VALUE ...] [--module_import=my.tasks]

Registers the library's plain configuration classes and the jobs in `JOBS`
with gin, parses the configuration and runs the job the gin files select with
`job.name = "..."` (default "train": `posttrain_jax.jobs.train.train`). Configuration
and input errors print one line and exit with status 2 (set
POSTTRAIN_JAX_TRACEBACK=1 for the full traceback).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

# Quiet TF/absl before anything imports them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # pylint: disable=g-import-not-at-top

from posttrain_jax import cli, gin_usage
from posttrain_jax.core import distributed
from posttrain_jax.core.checkpointing import CheckpointDamagedError, CheckpointSaveError
from posttrain_jax.core.nonfinite_guard import NonFiniteError
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.diloco.streaming_diloco import DiLoCoConfig
from posttrain_jax.models import ModelConfig

# Job name (gin: `job.name = "..."`) -> "module:function". Each function takes
# plain arguments plus `operative_config` and is registered under the job name.
JOBS = {
    "train": "posttrain_jax.jobs.train:train",
    "train_reward_model": "posttrain_jax.jobs.train_reward_model:train_reward_model",
    "train_policy": "posttrain_jax.jobs.train_policy:train_policy",
    "train_dpo": "posttrain_jax.jobs.train_dpo:train_dpo",
    "distill": "posttrain_jax.jobs.distill:distill",
    "distillation_demo": "posttrain_jax.jobs.distillation_demo:distillation_demo",
    "cfg_distill": "posttrain_jax.jobs.cfg_distill:cfg_distill",
    "warp": "posttrain_jax.jobs.warp:warp",
    "train_clp": "posttrain_jax.jobs.train_clp:train_clp",
    "elastic_diloco": "posttrain_jax.jobs.elastic_diloco:elastic_diloco",
    "elastic_lighthouse": "posttrain_jax.jobs.elastic_diloco:elastic_lighthouse",
}


def job(name: str = "train") -> str:
  """Which entry of JOBS the binary runs (gin: `job.name`)."""
  return name


def _job_function(spec: str):
  module, _, fn = spec.partition(":")
  return getattr(importlib.import_module(module), fn)


def register_configurables():
  """The names gin files may use; idempotent."""
  if getattr(register_configurables, "done", False):
    return
  cli.register(ModelConfig)
  cli.register(DatasetConfig)
  cli.register(OptimizerConfig)
  cli.register(DiLoCoConfig)
  cli.register(_job_function("posttrain_jax.diloco.elastic.membership:LighthouseConfig"))
  cli.register(job)
  cli.register(importlib.import_module("posttrain_jax.data.generated").register_generated_task,
               name="generated_task")
  cli.register(importlib.import_module("posttrain_jax.data.generated").register_tfds_text_task,
               name="tfds_text_task")
  cli.register(PromptConfig)
  cli.register(importlib.import_module("posttrain_jax.data.chat").sft_task, name="sft_task")
  cli.register(_job_function("posttrain_jax.models.lora:LoraConfig"))
  for algorithm in ("reinforce:Reinforce", "rloo:RLOO", "grpo:GRPO", "bond:BOND", "bond:JBOND"):
    cli.register(_job_function("posttrain_jax.rl." + algorithm))
  cli.register(_job_function("posttrain_jax.rl.clp:CLPConfig"))
  for name, spec in JOBS.items():
    cli.register(_job_function(spec), name=name)
  register_configurables.done = True


def check_bindings_used(name: str, flags: cli.GinFlags, allow: bool = False) -> None:
  """Refuses (allow: warns about) bindings and macros job `name` never reads.

  A gin file's binding that only a command-line binding made unread (e.g.
  --gin.train.eval_data=None orphans the file's eval_data/DatasetConfig.*) is
  not reported: the file alone reads it, and the override says what was meant.
  """
  unused = gin_usage.unused_bindings(gin_usage.job_roots(name))
  if unused and flags.bindings:
    typed = gin_usage.binding_names(flags.bindings)
    try:  # what the gin files alone have their job read
      gin.clear_config()
      cli.configure(dataclasses.replace(flags, bindings=[]), finalize=False)
      by_files = gin_usage.read_bindings(gin_usage.job_roots(gin_usage.selected_job()))
    except cli.ConfigError:
      by_files = set()
    finally:
      gin.clear_config()
      cli.configure(flags)
    unused = [u for u in unused if u.name() in typed or
              (u.scope, u.selector, u.param) not in by_files]
  if not unused:
    return
  if not allow:
    raise cli.ConfigError(gin_usage.describe(unused, name, flags.bindings, JOBS))
  print(f"posttrain_jax: warning: "
        f"{gin_usage.describe(unused, name, flags.bindings, JOBS, advice=False)}"
        " (--allow_unused_bindings).", file=sys.stderr)


def main(argv) -> int:
  flags = cli.parse_flags(argv)
  modules = [a.partition("=")[2] for a in flags.rest if a.startswith("--module_import=")]
  flags.rest = [a for a in flags.rest if not a.startswith("--module_import=")]
  options = {a for a in flags.rest if a in ("--allow_unused_bindings", "--check_config")}
  flags.rest = [a for a in flags.rest if a not in options]
  if flags.rest:
    raise cli.ConfigError(f"Unknown arguments: {' '.join(flags.rest)}. Use "
                          "--gin_file=FILE and --gin.NAME=VALUE.")
  if not flags.gin_files:
    raise cli.ConfigError("No --gin_file given; try "
                          "--gin_file=gin/experiments/quickstart.gin.")
  try:
    distributed.initialize_from_env()
  except ValueError as e:
    raise cli.ConfigError(str(e)) from e
  register_configurables()
  cli.configure(flags)
  import posttrain_jax.data.tasks  # pylint: disable=g-import-not-at-top,unused-import  # registers seqio tasks
  for module in modules:  # user modules that register their own seqio tasks
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise cli.ConfigError(f"--module_import={module}: {e}") from e
  name = cli.call(gin.get_configurable("posttrain_jax.job"))
  if name not in JOBS:
    raise cli.ConfigError(f"Unknown job.name {name!r}; choose one of {sorted(JOBS)}.")
  check_bindings_used(name, flags, allow="--allow_unused_bindings" in options)
  if "--check_config" in options:
    print(f"posttrain_jax: configuration of job '{name}' resolves; --check_config: not run")
    return 0
  job_fn = gin.get_configurable(f"posttrain_jax.{name}")
  try:
    cli.call(job_fn, operative_config=gin.config_str())
  except (ValueError, FileNotFoundError) as e:
    if os.environ.get("POSTTRAIN_JAX_TRACEBACK"):
      raise
    text = cli.strip_gin_context(str(e))
    raise cli.ConfigError(gin_usage.macro_settings(name, text) + text) from e
  except (NonFiniteError, CheckpointDamagedError, CheckpointSaveError) as e:
    raise cli.RunError(cli.strip_gin_context(str(e))) from e
  return 0


if __name__ == "__main__":
  cli.run_main(main)
