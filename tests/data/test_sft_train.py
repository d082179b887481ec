"""The train job on an SFT task, full and LoRA: resume, run directory contents, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.data import chat, tasks
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.jobs.train import train
from posttrain_jax.models import lora_training
from posttrain_jax.models.lora import LoraConfig

from lm_runs import MODEL  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SFT = DatasetConfig(task_name=tasks.PYDOC_SFT_TASK, split="train", sequence_length=128,
                    batch_size=8, seed=1)
SFT_EVAL = DatasetConfig(task_name=tasks.PYDOC_SFT_TASK, split="validation",
                         sequence_length=128, batch_size=8, shuffle=False, num_epochs=1)
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1)


def run(run_dir, num_steps, **kw):
  return train(model_config=MODEL, run_dir=str(run_dir), train_data=SFT, num_steps=num_steps,
               optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1, decay_steps=4),
               checkpoint_every=2, log_every=1, **kw)


def test_a_resumed_lora_sft_run_is_exact(tmp_path, capfd):
  full = run(tmp_path / "full", 4, lora=LORA, eval_data=SFT_EVAL, eval_batches=1)
  first = run(tmp_path / "split", 2, lora=LORA)
  second = run(tmp_path / "split", 4, lora=LORA)
  assert second.resumed_from == 2 and sorted(second.losses) == [3, 4]
  for step in (3, 4):
    assert second.losses[step] == full.losses[step]  # bit-exact (adapters, data, dropout)
  assert first.losses[1] == full.losses[1] and np.isfinite(full.eval_metrics[4]["loss"])
  out = capfd.readouterr().out
  assert "LoRA rank 4, alpha 8 on 14 weights" in out and "base random init (seed 0)" in out
  assert "conversations," in out and "longer than sequence_length=128 dropped" in out
  info = lora_training.read_run_info(str(tmp_path / "split"))
  assert info["rank"] == 4 and info["base"] is None and len(info["adapted"]) == 14
  # the checkpoint holds the adapters (and their optimizer state), not the base
  meta = ocp.PyTreeCheckpointer().metadata(str(tmp_path / "split" / "checkpoints" / "4" /
                                               "state")).item_metadata.tree
  names = [p for p in _leaf_paths(meta["params"])]
  assert len(names) == 28 and all(p[-1].endswith(("_lora_a", "_lora_b")) for p in names)
  with pytest.raises(ValueError, match="records another LoRA run .*rank: saved=4, now=8"):
    run(tmp_path / "split", 6, lora=LoraConfig(rank=8, alpha=8.0, dropout=0.1))


def _leaf_paths(tree, prefix=()):
  if not isinstance(tree, dict):
    return [prefix]
  return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (k,))]


def _bad_jsonl(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "a", "response": "b"}\n{"text": "no turns"}\n')
  return str(path)


@pytest.mark.parametrize("case", ["target", "overlong", "rank", "line"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
  run_dir = tmp_path / "run"
  long = [{"prompt": "q " * 5, "response": "a " * 200}]
  (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long))
  with pytest.raises(ValueError) as raised:
    if case == "target":
      run(run_dir, 2, lora=LoraConfig(targets=("attn/q$", "attn/query")))
    elif case == "overlong":
      chat.register_sft_task("test_sft_long", {"train": str(tmp_path / "long.jsonl")},
                             overlong="error")
      train(model_config=MODEL, run_dir=str(run_dir), num_steps=2,
            train_data=DatasetConfig("test_sft_long", "train", 128, 8))
    elif case == "rank":
      run(run_dir, 2, lora=LoraConfig(rank=0))
    else:
      chat.sft_task("test_sft_bad_line", _bad_jsonl(tmp_path))
  text = str(raised.value)
  assert "\n" not in text and {
      "target": "pattern 'attn/query' matches no adaptable weight",
      "overlong": "long.jsonl:1 (", "rank": "LoraConfig.rank must be an integer >= 1",
      "line": "bad.jsonl:2: no \"messages\""}[case] in text
  assert not run_dir.exists()


def test_the_binary_reports_a_bad_line_and_exits_2(tmp_path):
  run_dir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, "-m", "posttrain_jax.main", "--gin_file=gin/experiments/sft_lora.gin",
       f"--gin.RUN_DIR='{run_dir}'", "--gin.TASK=@sft_task()",
       "--gin.sft_task.task_name='bad'", f"--gin.sft_task.train_files='{_bad_jsonl(tmp_path)}'",
       "--gin.train.initial_checkpoint=None", "--gin.train.eval_data=None"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("posttrain_jax: error:")]
  assert len(lines) == 1 and "bad.jsonl:2: no \"messages\"" in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not run_dir.exists()
