"""The warp job on a tiny config: 2 iterations x 2 runs x 2 steps, the expected
directories, the merges' arithmetic, and resume after a kill between runs."""

import json
import os

import numpy as np
import pytest

from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.jobs.warp import warp
from posttrain_jax.merging.interpolation import liti, slerp_many
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl import warp as warp_lib

from policy_runs import CFG, FixedPrompts, run, sft_dir  # pylint: disable=g-bad-import-order,unused-import

PROMPTS = PromptConfig(task_name="unused", split="train", prompt_length=5, batch_size=4, seed=3)


class Killed(Exception):
  pass


class Runs:
  """train_run for the tests: a tiny train_policy run whose prompt order comes
  from prompts.seed; records its calls and can be 'killed' before a given run."""

  def __init__(self, kill_before=None):
    self.calls, self.kill_before = [], kill_before

  def __call__(self, *, run_dir, initial_checkpoint, num_steps, prompts, operative_config):
    if run_dir == self.kill_before:
      self.kill_before = None
      raise Killed(run_dir)
    self.calls.append((run_dir, initial_checkpoint, num_steps, prompts.seed))
    source = FixedPrompts()
    source.position = 10 * prompts.seed   # the prompt order: the only difference
    return run(run_dir, initial_checkpoint, num_steps, prompt_source=source)


def _params(d):
  return params_checkpoint.load_numpy_params(d, CFG)


def test_warp_job_directories_merges_and_resume(tmp_path, sft_dir):
  root = str(tmp_path / "warp")
  kill_at = warp_lib.run_dir(root, 2, 1)
  first = Runs(kill_before=kill_at)
  with pytest.raises(Killed):
    warp(run_dir=root, initial_checkpoint=sft_dir, num_runs=2, steps_per_iteration=[2, 2],
         eta=0.3, prompts=PROMPTS, train_run=first)
  assert [c[0] for c in first.calls] == [warp_lib.run_dir(root, 1, 0), warp_lib.run_dir(root, 1, 1),
                                         warp_lib.run_dir(root, 2, 0)]
  assert [c[3] for c in first.calls] == [3, 4, 5]   # distinct prompt orders
  assert first.calls[2][1] == warp_lib.liti_dir(root, 1)  # iteration 2 starts from the LITI
  assert not os.path.exists(os.path.join(root, "warp.json"))
  mtime = os.path.getmtime(os.path.join(warp_lib.slerp_dir(root, 1), warp_lib.DONE_FILE))

  second = Runs()
  summary = warp(run_dir=root, initial_checkpoint=sft_dir, num_runs=2,
                 steps_per_iteration=[2, 2], eta=0.3, prompts=PROMPTS, train_run=second)
  assert [c[0] for c in second.calls] == [kill_at]     # finished runs are not redone
  assert os.path.getmtime(os.path.join(warp_lib.slerp_dir(root, 1), warp_lib.DONE_FILE)) == mtime
  for i in (1, 2):
    for d in ([warp_lib.run_dir(root, i, m) for m in (0, 1)] +
              [warp_lib.slerp_dir(root, i), warp_lib.liti_dir(root, i)]):
      assert warp_lib.is_done(d), d
  assert summary["final_slerp"] == os.path.abspath(warp_lib.slerp_dir(root, 2))
  with open(os.path.join(root, "warp.json")) as f:
    assert json.load(f)["steps_per_iteration"] == [2, 2]

  # The merges are SLERP of the task vectors from the iteration's init, then LITI.
  for i in (1, 2):
    init = _params(warp_lib.init_of(root, i, sft_dir))
    runs = [_params(warp_lib.run_dir(root, i, m)) for m in (0, 1)]
    want = slerp_many(init, runs)
    got = _params(warp_lib.slerp_dir(root, i))
    for a, b in zip(_leaves(want), _leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(_leaves(liti(init, want, 0.3)), _leaves(_params(warp_lib.liti_dir(root, i)))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not any(np.allclose(a, b) for a, b in zip(_leaves(runs[0]), _leaves(runs[1]))
                   if a.size > 1)   # the two runs differ
  with open(os.path.join(warp_lib.slerp_dir(root, 1), "angles.json")) as f:
    angles = json.load(f)
  assert 0.0 < angles["summary"]["0-1"]["mean"] < 180.0
  assert len(angles["per_tensor_degrees"]["0-1"]) == len(_leaves(init))


def _leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_warp_job_rejects_a_missing_init(tmp_path):
  with pytest.raises(FileNotFoundError, match="SFT model directory"):
    warp(run_dir=str(tmp_path), initial_checkpoint=str(tmp_path / "nope"),
         steps_per_iteration=[1], train_run=Runs())


def test_warp_gin_selects_the_job_and_binds_the_runs():
  import gin  # pylint: disable=g-import-not-at-top
  from posttrain_jax import cli, main  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main.register_configurables()
  gin.clear_config()
  try:
    cli.configure(cli.parse_flags([f"--gin_file={repo}/gin/experiments/warp/warp_tiny.gin"]))
    assert gin.query_parameter("job.name") == "warp"
    assert gin.query_parameter("warp.steps_per_iteration") == [2, 2]
    assert (gin.query_parameter("warp.num_runs"), gin.query_parameter("warp.eta")) == (2, 0.3)
    assert gin.query_parameter("warp.train_run").selector == "train_policy"
    assert (gin.query_parameter("train_policy.anchor"), gin.query_parameter(
        "train_policy.ema_rate"), gin.query_parameter("train_policy.beta")) == ("ema", 0.01, 0.1)
  finally:
    gin.clear_config()
