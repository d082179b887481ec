"""Bindings and macros a run never reads are refused before any work
(posttrain_jax/gin_usage.py, main --allow_unused_bindings / --check_config)."""

import glob
import os

import gin
import pytest

from posttrain_jax import cli, gin_usage, main

from test_cli import REPO, error_line, run_main


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@gin.configurable("gin_usage_job")
def _job(model=None, steps=0, extra=None):
  return model, steps, extra


@gin.configurable("gin_usage_model")
def _model(layers=1, width=8):
  return layers, width


@gin.configurable("gin_usage_other")
def _other(x=0):
  return x


def _unused(text):
  gin.parse_config(text)
  return [u.name() for u in gin_usage.unused_bindings(["gin_usage_job"])]


def test_reachable_bindings_are_used_and_the_rest_named(clean_gin):
  assert _unused("""
    STEPS = 3
    WIDTH = 4
    gin_usage_job.steps = %STEPS
    gin_usage_job.model = @big/gin_usage_model()
    gin_usage_model.width = %WIDTH
    big/gin_usage_model.layers = 2
    gin_usage_other.x = 1
    small/gin_usage_model.layers = 5
    NEVER = 7
  """) == ["NEVER", "gin_usage_other.x", "small/gin_usage_model.layers"]


def test_a_shadowed_binding_is_unused_and_a_macro_of_any_binding_is_not(clean_gin):
  # big/ overrides the unscoped layers everywhere it is called: the unscoped
  # value is never read. SHARED is referenced (by an unused binding): only the
  # binding is reported, not the gin file's shared macro.
  assert _unused("""
    SHARED = 2
    gin_usage_job.model = @big/gin_usage_model()
    gin_usage_model.layers = 1
    big/gin_usage_model.layers = 2
    gin_usage_other.x = %SHARED
  """) == ["gin_usage_model.layers", "gin_usage_other.x"]
  assert _job() == ((2, 8), 0, None)


def test_unscoped_references_inherit_the_scope_and_macros_their_own(clean_gin):
  # extra = @gin_usage_other() is evaluated inside big/ (inherited), so
  # big/gin_usage_other.x is read; a macro's value runs in the macro's scope.
  assert _unused("""
    gin_usage_job.model = @big/gin_usage_model()
    big/gin_usage_model.width = @gin_usage_other()
    big/gin_usage_other.x = 3
    gin_usage_job.extra = %M
    M = @gin_usage_other()
    M/gin_usage_other.x = 4
    other/gin_usage_other.x = 5
  """) == ["other/gin_usage_other.x"]
  assert _job() == ((1, 3), 0, 4)  # gin itself reads exactly those


def test_may_be_unused_names_shared_settings(clean_gin):
  assert _unused("""
    MAY_BE_UNUSED = ['gin_usage_other', 'small/gin_usage_model', 'K']
    gin_usage_other.x = 1
    small/gin_usage_model.layers = 5
    K = 8
    L = 9
  """) == ["L"]


def _check(*argv):
  gin.clear_config()
  return main.main([*argv, "--check_config"])


def test_quickstart_overrides_it_does_not_read_are_named(clean_gin):
  # docs/launch.md used to pass these to the three-stage demo, which ran 300
  # steps with no replica axis and no word.
  with pytest.raises(cli.ConfigError) as e:
    _check("--gin_file=gin/experiments/quickstart.gin", "--gin.NUM_STEPS=50",
           "--gin.train.dcn_parallelism={'replica': 2}", "--gin.RUN_DIR='runs/x'")
  line = str(e.value)
  assert "\n" not in line
  assert line.startswith("job 'distillation_demo' does not read NUM_STEPS (command line), "
                         "train.dcn_parallelism (command line, a setting of job 'train').")
  assert "RUN_DIR" not in line and "--allow_unused_bindings" in line
  # The gin file that reads them.
  assert _check("--gin_file=gin/experiments/lm_quickstart.gin", "--gin.NUM_STEPS=50",
                "--gin.train.dcn_parallelism={'replica': 2}") == 0


def test_a_file_binding_only_an_override_orphans_is_not_reported(clean_gin):
  # --gin.train.eval_data=None leaves the gin file's eval_data/DatasetConfig.*
  # unread: that is what the user asked for. A binding typed for it is refused.
  assert _check("--gin_file=gin/experiments/lm_quickstart.gin",
                "--gin.train.eval_data=None") == 0
  with pytest.raises(cli.ConfigError, match=r"^job 'train' does not read "
                     r"eval_data/DatasetConfig.batch_size \(command line\)\. Remove it"):
    _check("--gin_file=gin/experiments/lm_quickstart.gin", "--gin.train.eval_data=None",
           "--gin.eval_data/DatasetConfig.batch_size=3")


def test_allow_unused_bindings_warns_in_one_line(clean_gin, capsys):
  assert _check("--gin_file=gin/experiments/quickstart.gin", "--gin.NUM_STEPS=50",
                "--allow_unused_bindings") == 0
  err = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]
  assert err == ["posttrain_jax: warning: job 'distillation_demo' does not read "
                 "NUM_STEPS (command line) (--allow_unused_bindings)."]


def test_the_elastic_lighthouse_reads_the_slices_configuration(clean_gin):
  for extra in ([], ["--gin.job.name='elastic_lighthouse'"]):
    assert _check("--gin_file=gin/experiments/elastic_diloco/lm.gin", *extra) == 0


def _experiments():
  """Every shipped gin file that selects a job (the others are fragments that
  experiments include)."""
  for path in sorted(glob.glob(os.path.join(REPO, "gin", "experiments", "**", "*.gin"),
                               recursive=True)):
    if "job.name" in open(path).read() or "include" in open(path).read():
      yield os.path.relpath(path, REPO)


_FRAGMENTS = {  # included by experiments; no run of their own
    "gin/experiments/teacher_hacking/constant_lr.gin",
    "gin/experiments/teacher_hacking/student_model.gin",
    "gin/experiments/teacher_hacking/teacher_size_model.gin",
    "gin/experiments/warm_rl/rm_sizes.gin",
}


def test_every_shipped_experiment_reads_all_its_bindings(clean_gin):
  main.register_configurables()
  bad = {}
  for path in _experiments():
    if path in _FRAGMENTS:
      continue
    gin.clear_config()
    cli.configure(cli.GinFlags([path], [], [], []), finalize=False)
    unused = gin_usage.unused_bindings(gin_usage.job_roots(gin_usage.selected_job()))
    if unused:
      bad[path] = [u.name() for u in unused]
  assert bad == {}


def test_binary_refuses_an_unused_override_before_any_work(tmp_path):
  run_dir = tmp_path / "qs"
  proc = run_main("--gin_file=gin/experiments/quickstart.gin", f"--gin.RUN_DIR='{run_dir}'",
                  "--gin.NUM_STEPS=5", timeout=120)
  assert "does not read NUM_STEPS (command line)" in error_line(proc)
  assert not run_dir.exists()


def test_a_job_error_names_the_macro_the_user_set(clean_gin, tmp_path):
  # train_policy.initial_checkpoint = %SFT_CHECKPOINT: the error starts with
  # what the user typed, then the job's own words.
  with pytest.raises(cli.ConfigError) as e:
    main.main(["--gin_file=gin/experiments/rloo_gold.gin", "--gin.SFT_CHECKPOINT='runs/nope'",
               f"--gin.RUN_DIR='{tmp_path / 'run'}'"])
  assert str(e.value).startswith(
      "SFT_CHECKPOINT = 'runs/nope': initial_checkpoint runs/nope does not exist: give the "
      "SFT model")
  assert not (tmp_path / "run").exists()
  # Only parameters the error names are attributed, and only through macros.
  assert gin_usage.macro_settings("train_policy", "num_steps must be >= 1") == \
      "NUM_STEPS = 200: "
  assert gin_usage.macro_settings("train_policy", "prompts.batch_size is odd") == ""
