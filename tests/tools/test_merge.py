"""tools/merge.py average: model dirs in, merged model dir out, one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax import cli, merging
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl.reward_model import RewardModel, is_reward_model, save_reward_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)


def run_tool(*args):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", "merge.py"), *args],
                        env=env, capture_output=True, text=True, timeout=300)


def rm(seed):
  p = nn.unbox(RewardModel(CFG).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))[
      "params"])
  return jax.tree.map(np.asarray, dict(p, head={"kernel": np.full((16, 1), seed, np.float32)}))


def test_average_of_reward_models_and_policies(tmp_path):
  dirs = [str(tmp_path / f"m{i}") for i in range(3)]
  for i, d in enumerate(dirs):
    save_reward_model(d, rm(i), CFG)
  out = str(tmp_path / "warm")
  proc = run_tool("average", "--output", out, *dirs, "--weights", "1", "1", "2")
  assert proc.returncode == 0, proc.stderr
  assert "weights 0.25, 0.25, 0.5" in proc.stdout and is_reward_model(out)
  merged = merging.load_models([out])[0].params
  expected = merging.average([rm(i) for i in range(3)], [0.25, 0.25, 0.5])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), merged, expected)
  np.testing.assert_allclose(merged["head"]["kernel"], 1.25)
  # policies merge too, into a policy model dir (M = 1 is the identity)
  policy = nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
      "params"])
  params_checkpoint.save(str(tmp_path / "p"), policy, CFG)
  proc = run_tool("average", "--output", str(tmp_path / "p1"), str(tmp_path / "p"))
  assert proc.returncode == 0, proc.stderr
  assert not is_reward_model(str(tmp_path / "p1"))
  same = params_checkpoint.load_numpy_params(str(tmp_path / "p1"), CFG)
  jax.tree.map(np.testing.assert_array_equal, same, jax.tree.map(np.asarray, policy))


def test_errors_are_one_line(tmp_path):
  save_reward_model(str(tmp_path / "a"), rm(0), CFG)
  other = ModelConfig(**{**CFG.__dict__, "num_layers": 4})
  params = nn.unbox(RewardModel(other).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))[
      "params"])
  save_reward_model(str(tmp_path / "b"), params, other)
  proc = run_tool("average", "--output", str(tmp_path / "out"), str(tmp_path / "a"),
                  str(tmp_path / "b"))
  assert proc.returncode == 2
  assert "different architectures (num_layers: 2 vs 4)" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = run_tool("average", "--output", str(tmp_path / "a"), str(tmp_path / "a"))
  assert proc.returncode == 2 and "must differ from the merged directories" in proc.stderr
  proc = run_tool("average", "--output", str(tmp_path / "o"), str(tmp_path / "a"),
                  "--weights", "1", "2")
  assert proc.returncode == 2 and "one weight per model" in proc.stderr


def test_slerp_and_liti_subcommands(tmp_path):
  init, a, b = rm(0), rm(1), rm(2)
  for name, p in (("init", init), ("a", a), ("b", b)):
    save_reward_model(str(tmp_path / name), p, CFG)
  proc = run_tool("slerp", "--init", str(tmp_path / "init"), "--output",
                  str(tmp_path / "s"), str(tmp_path / "a"), str(tmp_path / "b"))
  assert proc.returncode == 0, proc.stderr
  merged = merging.load_models([str(tmp_path / "s")])[0].params
  expected = merging.slerp(init, a, b, 0.5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               merged, expected)
  proc = run_tool("liti", "--init", str(tmp_path / "init"), "--merged", str(tmp_path / "s"),
                  "--eta", "0.3", "--output", str(tmp_path / "l"))
  assert proc.returncode == 0, proc.stderr
  out = merging.load_models([str(tmp_path / "l")])[0].params
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               out, merging.liti(init, merged, 0.3))


def test_task_vector_subcommands_merge_leaf_by_leaf(tmp_path):
  init, a, b = rm(0), rm(1), rm(2)
  for name, p in (("init", init), ("a", a), ("b", b)):
    save_reward_model(str(tmp_path / name), p, CFG)
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  cases = {
      "task_arithmetic": (["--lambdas", "0.5", "1.5"],
                          merging.task_arithmetic(init, [a, b], [0.5, 1.5])),
      "ties": (["--density", "0.3", "--lambda", "0.9"],
               merging.ties(init, [a, b], density=0.3, lam=0.9)),
      "dare": (["--drop", "0.5", "--seed", "3"], merging.dare(init, [a, b], 0.5, seed=3)),
      "model_stock": ([], merging.model_stock(init, [a, b])),
  }
  for method, (flags, expected) in cases.items():
    out = str(tmp_path / method)
    proc = run_tool(method, "--init", str(tmp_path / "init"), "--output", out, *dirs, *flags)
    assert proc.returncode == 0, proc.stderr
    assert is_reward_model(out) and "2 reward model directories" in proc.stdout
    merged = merging.load_models([out])[0].params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 merged, expected)
  proc = run_tool("ties", "--init", str(tmp_path / "init"), "--output", str(tmp_path / "t0"),
                  *dirs, "--density", "0")
  assert proc.returncode == 2 and "--density must be in (0, 1]" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_greedy_soup_of_reward_models_on_heldout_pairs(tmp_path):
  pos = rm(1)
  neg = dict(pos, head={"kernel": -pos["head"]["kernel"]})
  save_reward_model(str(tmp_path / "pos"), pos, CFG)
  save_reward_model(str(tmp_path / "neg"), neg, CFG)
  rng = np.random.default_rng(0)
  with open(tmp_path / "pairs.jsonl", "w") as f:
    for _ in range(16):
      row = {k: rng.integers(1, 64, size=n).tolist()
             for k, n in (("prompt", 3), ("chosen", 4), ("rejected", 4))}
      f.write(json.dumps(row) + "\n")
  out = str(tmp_path / "soup")
  proc = run_tool("greedy_soup", "--pairs", str(tmp_path / "pairs.jsonl"), "--output", out,
                  str(tmp_path / "pos"), str(tmp_path / "neg"))
  assert proc.returncode == 0, proc.stderr
  # opposite heads: alone, accuracies a and 1 - a; together the head is 0 (accuracy 0),
  # so the soup is the better one alone
  alone = {line.split(":")[0].strip(): float(line.split("alone ")[1].split(",")[0])
           for line in proc.stdout.splitlines() if "alone" in line}
  best = max(alone, key=alone.get)
  assert "1 of 2 kept" in proc.stdout and "dropped" in proc.stdout
  merged = merging.load_models([out])[0].params
  jax.tree.map(np.testing.assert_array_equal, merged, pos if best.endswith("pos") else neg)
  proc = run_tool("greedy_soup", "--pairs", str(tmp_path / "pairs.jsonl"), "--output",
                  str(tmp_path / "x"), str(tmp_path / "p"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr


def _merge_in_process(*args):
  """tools/merge.py main() in this process: 0, or the one-line error it exits 2 with."""
  spec = importlib.util.spec_from_file_location("merge_tool", os.path.join(REPO, "tools", "merge.py"))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  try:
    return tool.main(list(args))
  except cli.ConfigError as e:
    assert "\n" not in str(e)
    return str(e)


def test_output_must_be_new_or_empty_and_never_a_run_directory(tmp_path):
  save_reward_model(str(tmp_path / "a"), rm(0), CFG)
  save_reward_model(str(tmp_path / "b"), rm(2), CFG)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  out = tmp_path / "out"
  out.mkdir()  # an empty directory is fine
  assert _merge_in_process("average", "--output", str(out), a) == 0
  # A second merge into it: refused in one line, nothing touched.
  before = sorted(os.listdir(out))
  line = _merge_in_process("average", "--output", str(out), a, b)
  assert line.startswith(f"--output {out} is not empty (checkpoint, model.gin")
  assert "--overwrite" in line and sorted(os.listdir(out)) == before
  # --overwrite replaces the earlier merge.
  assert _merge_in_process("average", "--output", str(out), a, b, "--overwrite") == 0
  np.testing.assert_allclose(merging.load_models([str(out)])[0].params["head"]["kernel"], 1.0)
  # A training run directory is refused even with --overwrite: its own
  # checkpoints/ would be loaded, not the merge.
  run = tmp_path / "run"
  (run / "checkpoints" / "10" / "state").mkdir(parents=True)
  (run / "config.gin").write_text("")
  line = _merge_in_process("average", "--output", str(run), a, b, "--overwrite")
  assert "is a training run directory" in line
  assert sorted(os.listdir(run)) == ["checkpoints", "config.gin"]
  # Other files are never deleted by --overwrite.
  (out / "notes.txt").write_text("mine")
  line = _merge_in_process("average", "--output", str(out), a, "--overwrite")
  assert "holds more than a model directory (notes.txt)" in line
  assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint").is_dir()
