"""tools/profile_ops.py: op events of a jax.profiler trace summed by JAX source."""

import gzip
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))

import profile_ops  # pylint: disable=wrong-import-position

HLO = """
  %fusion.1 = f32[8,16]{1,0} fusion(%p0), kind=kLoop, metadata={op_name="jit(step)/Transformer/layer_0/mlp/dot_general"}
  %fusion.2 = f32[8,16]{1,0} fusion(%p1), kind=kLoop, metadata={op_name="jit(step)/Transformer/layer_1/mlp/dot_general"}
  %copy.3 = f32[4,4]{1,0} copy(%p2)
"""


def _trace(directory, events):
  path = directory / "plugins" / "profile" / "run" / "host.trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_summarize_folds_layers_and_keeps_unnamed_ops(tmp_path):
  _trace(tmp_path, [
      {"ph": "X", "name": "fusion.1", "dur": 30.0}, {"ph": "X", "name": "fusion.2", "dur": 10.0},
      {"ph": "X", "name": "fusion.1", "dur": 20.0}, {"ph": "X", "name": "copy.3", "dur": 5.0},
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 999.0},  # runtime, not an op
      {"ph": "M", "name": "thread_name"}])
  rows = profile_ops.summarize(str(tmp_path), HLO)
  assert rows[0] == {"source": "Transformer/layer_*/mlp/dot_general", "us": 60.0, "ops": 2,
                     "calls": 3}
  assert rows[1]["source"] == "[copy f32[4,4]{1,0}]" and rows[1]["us"] == 5.0
  text = profile_ops.table(rows, per=2)
  assert "op time 0.03 ms per iteration over 3 XLA ops" in text
  assert "| Transformer/layer_*/mlp/dot_general | 30 | 2 | 92.3% |" in text


def test_missing_trace_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="create_perfetto_trace"):
    profile_ops.summarize(str(tmp_path), HLO)


def test_bench_train_profile_prints_the_model_ops(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
                       "--xla_cpu_enable_xprof_traceme=true")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "bench_train.py"), "--model=tiny",
       "--batch_size=2", "--seq_len=32", "--steps=2", "--warmup=1",
       f"--profile={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "Profile of 2 steps" in proc.stdout
  assert "layer_*/mlp/dot_general" in proc.stdout  # the model's ops, mapped to sources
