"""The gin binary: flag conventions, operative config, one-line errors."""

import os
import subprocess
import sys
import typing

import gin
import pytest

from posttrain_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = "--gin_file=gin/experiments/lm_quickstart.gin"


def run_main(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "posttrain_jax.main", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def error_line(proc):
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("posttrain_jax: error:")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_flag_parsing_follows_t5x_conventions():
  flags = cli.parse_flags(["--gin_file=a.gin", "--gin_file", "b.gin",
                           "--gin.train.num_steps=5", "--gin.RUN_DIR='x'",
                           "--gin_bindings=A = 1", "--gin_search_paths=/p,/q", "pos"])
  assert flags.gin_files == ["a.gin", "b.gin"]
  assert flags.bindings == ["train.num_steps = 5", "RUN_DIR = 'x'", "A = 1"]
  assert flags.search_paths == ["/p", "/q"] and flags.rest == ["pos"]
  with pytest.raises(cli.ConfigError, match="expected --gin.NAME=VALUE"):
    cli.parse_flags(["--gin.train.num_steps"])


def test_later_files_and_bindings_override_earlier(tmp_path):
  @gin.configurable("cli_test_fn")
  def fn(a=0, b=0):
    return a, b
  first, second = tmp_path / "1.gin", tmp_path / "2.gin"
  first.write_text("cli_test_fn.a = 1\ncli_test_fn.b = 1\n")
  second.write_text("cli_test_fn.b = 2\n")
  gin.clear_config()
  try:
    cli.configure(cli.parse_flags([f"--gin_file={first}", f"--gin_file={second}",
                                   "--gin.cli_test_fn.a=3"]))
    assert fn() == (3, 2)
  finally:
    gin.clear_config()


def test_unknown_configurable_names_the_closest():
  line = error_line(run_main(QUICKSTART, "--gin.ModelConfg.embed_dim=64"))
  assert "Unknown configurable 'ModelConfg'" in line and "ModelConfig" in line


@pytest.mark.parametrize("binding, offered", [
    ("train_policy.algorithm = @PPOXYZ()", "Did you mean: GRPO"),   # no close name
    ("grpo.epsilon = 0.1", "Did you mean: GRPO"),                    # case differs
    ("QQQQQ.x = 1", "Registered configurables: BOND, "),             # nothing near
])
def test_unknown_configurable_always_offers_names(binding, offered):
  from posttrain_jax import main  # registers the binary's configurables
  main.register_configurables()
  gin.clear_config()
  try:
    with pytest.raises(cli.ConfigError) as raised:
      cli.configure(cli.parse_flags(["--gin_file=experiments/rl/reinforce_tiny.gin",
                                     f"--gin_bindings={binding}"]), finalize=False)
  finally:
    gin.clear_config()
  line = str(raised.value)
  assert "\n" not in line and line.startswith("Unknown configurable") and offered in line


def test_unknown_parameter_names_the_closest():
  line = error_line(run_main(QUICKSTART, "--gin.ModelConfig.num_hedas=2"))
  assert "Unknown parameter 'num_hedas'" in line and "num_heads" in line


def test_missing_required_macro_is_named(tmp_path):
  cfg = tmp_path / "incomplete.gin"
  cfg.write_text("include 'models/gemma2_tiny.gin'\ninclude 'runs/train.gin'\n"
                 "TASK = 'pydoc_lm'\nSEQUENCE_LENGTH = 32\nBATCH_SIZE = 8\nNUM_STEPS = 1\n")
  line = error_line(run_main(f"--gin_file={cfg}"))
  assert "Required macro RUN_DIR is not set" in line and "--gin.RUN_DIR" in line


def test_unparsable_value_shows_the_binding():
  line = error_line(run_main(QUICKSTART, "--gin.NUM_STEPS=abc("))
  assert "Could not parse" in line and "NUM_STEPS = abc(" in line


@pytest.mark.parametrize("binding,named,expected", [
    ("--gin.train.checkpoint_every='20'", "train.checkpoint_every = '20'", "expected int"),
    ("--gin.ModelConfig.embed_dim=128.5", "ModelConfig.embed_dim = 128.5", "expected int"),
    ("--gin.BATCH_SIZE='16'", "batch_size = %BATCH_SIZE (= '16')", "expected int"),
    ("--gin.NUM_STEPS=2.5", "train.num_steps = %NUM_STEPS (= 2.5)", "expected int"),
    ("--gin.OptimizerConfig.learning_rate='fast'", "learning_rate = 'fast'", "expected float"),
    ("--gin.train.ici_parallelism={'data': 'all'}", "train.ici_parallelism",
     "expected Mapping[str, int] | None"),
])
def test_ill_typed_setting_is_one_line_before_any_work(tmp_path, binding, named, expected):
  proc = run_main(QUICKSTART, f"--gin.RUN_DIR='{tmp_path / 'run'}'", binding)
  line = error_line(proc)
  assert named in line and expected in line, line
  assert not (tmp_path / "run").exists()  # nothing started


def test_well_typed_values_pass_the_type_check():
  assert cli.conforms(3, float) and not cli.conforms(True, int) and cli.conforms(None, int | None)
  assert cli.conforms(("local", "global"), tuple[str, ...])
  assert not cli.conforms(("local", 5), tuple[str, ...])
  assert cli.conforms({"fsdp": 4}, typing.Mapping[str, int]) and not cli.conforms([1], str)


def test_missing_gin_file_is_named():
  line = error_line(run_main("--gin_file=gin/nope.gin"))
  assert "Gin file not found: gin/nope.gin" in line


def test_library_input_errors_are_one_line(tmp_path):
  proc = run_main(QUICKSTART, f"--gin.RUN_DIR='{tmp_path}'", "--gin.NUM_STEPS=1",
                  "--gin.ModelConfig.vocab_size=100")
  line = error_line(proc)
  assert "token id" in line and "vocab_size=100" in line


def test_binary_trains_saves_config_and_resumes(tmp_path):
  args = [QUICKSTART, f"--gin.RUN_DIR='{tmp_path}'", "--gin.SEQUENCE_LENGTH=32",
          "--gin.BATCH_SIZE=4", "--gin.train.log_every=1", "--gin.train.eval_batches=1",
          "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.embed_dim=32"]
  first = run_main(*args, "--gin.NUM_STEPS=2")
  assert first.returncode == 0, first.stderr
  assert "step 2/2 | loss" in first.stdout and "ETA" in first.stdout
  config = (tmp_path / "config.gin").read_text()
  assert "ModelConfig.embed_dim = 32" in config and "NUM_STEPS = 2" in config
  second = run_main(*args, "--gin.NUM_STEPS=3")
  assert second.returncode == 0, second.stderr
  assert "resumed from step 2" in second.stdout and "step 3/3" in second.stdout
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]


def _task_module(tmp_path, name, train_text):
  (tmp_path / "train.txt").write_text(train_text)
  (tmp_path / "val.txt").write_text(train_text)
  (tmp_path / f"{name}.py").write_text(
      "from posttrain_jax.data.tasks import register_text_lm_task\n"
      f"register_text_lm_task({name!r}, {{'train': {str(tmp_path / 'train.txt')!r}, "
      f"'validation': {str(tmp_path / 'val.txt')!r}}})\n")


def test_module_import_registers_user_tasks(tmp_path):
  _task_module(tmp_path, "user_tasks_ok", "A line of English text about tests.\n" * 50)
  env_path = f"{tmp_path}:{REPO}"
  proc = subprocess.run(
      [sys.executable, "-m", "posttrain_jax.main", QUICKSTART,
       "--module_import=user_tasks_ok", "--gin.TASK='user_tasks_ok'",
       f"--gin.RUN_DIR='{tmp_path / 'run'}'", "--gin.NUM_STEPS=1",
       "--gin.SEQUENCE_LENGTH=16", "--gin.BATCH_SIZE=2", "--gin.train.eval_batches=1"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=env_path, XLA_FLAGS=""),
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "step 1/1" in proc.stdout


def test_empty_dataset_is_one_clear_line(tmp_path):
  _task_module(tmp_path, "user_tasks_empty", "")
  proc = subprocess.run(
      [sys.executable, "-m", "posttrain_jax.main", QUICKSTART,
       "--module_import=user_tasks_empty", "--gin.TASK='user_tasks_empty'",
       f"--gin.RUN_DIR='{tmp_path / 'run'}'", "--gin.NUM_STEPS=1"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}", XLA_FLAGS=""),
      capture_output=True, text=True, timeout=300)
  line = error_line(proc)
  assert "user_tasks_empty" in line and "train" in line


def test_run_directories_in_the_working_directory_do_not_break_includes(tmp_path,
                                                                        monkeypatch):
  # ./runs/ and ./models/ look like Python namespace packages to gin's resource
  # reader; `include 'runs/train.gin'` must still find gin/runs/train.gin.
  (tmp_path / "runs" / "quickstart").mkdir(parents=True)
  (tmp_path / "models").mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  from posttrain_jax import main as main_lib
  main_lib.register_configurables()
  gin.clear_config()
  try:
    cli.configure(cli.parse_flags([f"--gin_file={REPO}/gin/experiments/lm_quickstart.gin"]))
    assert gin.query_parameter("ModelConfig.embed_dim") == 128
  finally:
    gin.clear_config()
