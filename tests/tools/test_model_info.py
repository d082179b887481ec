"""tools/model_info.py: exact Gemma 2 parameter counts and one-line gin errors."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "model_info.py")

# (non_embedding, embedding) with the vocabulary padded to 256,128.
EXPECTED = {
    "2b": (2_024_517_888, 590_118_912),
    "9b": (8_324_201_984, 917_962_752),
    "27b": (26_047_480_320, 1_180_237_824),
}


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  return env


def _start(*args):
  return subprocess.Popen([sys.executable, TOOL, *args], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def infos():
  procs = {name: _start(f"--gin_file=gin/models/gemma2_{name}.gin")
           for name in EXPECTED}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    out[name] = json.loads(lines[0])
  return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_counts(infos, name):
  info = infos[name]
  non_embedding, embedding = EXPECTED[name]
  assert info["non_embedding"] == non_embedding
  assert info["embedding"] == embedding
  assert info["total"] == info["embedding"] + info["non_embedding"]
  assert info["closed_form_matches"] is True
  assert info["vocab_size"] == 256_128
  assert info["config"] == f"gemma2_{name}"
  assert info["seq_len"] == 8192
  assert info["flops_per_token"] > 6 * info["total"]
  assert info["param_bytes"] == 4 * info["total"]  # float32 parameters
  groups = info["non_embedding_groups"]
  assert sum(groups.values()) == info["non_embedding"]


def test_bindings_and_seq_len_flag():
  proc = _start("--model=tiny", "--gin.ModelConfig.num_layers=2",
                "--gin.ModelConfig.param_dtype='bfloat16'", "--seq_len=128")
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  info = json.loads(stdout)
  # tiny: d=128, heads 4, kv 2, head_dim 32, mlp 512, vocab 2048.
  per_layer = 128 * 32 * (2 * 4 + 2 * 2) + 3 * 128 * 512 + 4 * 128
  assert info["num_layers"] == 2
  assert info["non_embedding"] == 2 * per_layer + 128
  assert info["embedding"] == 2048 * 128
  assert info["param_bytes"] == 2 * info["total"]
  assert info["seq_len"] == 128


def test_misspelt_binding_is_one_line_exit_2():
  proc = _start("--gin_file=gin/models/gemma2_2b.gin", "--gin.ModelConfig.num_hedas=3")
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert stdout == ""
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  assert "num_hedas" in lines[0]
  assert "Did you mean" in lines[0] and "num_heads" in lines[0]
  assert "Traceback" not in stderr


def test_no_model_is_a_config_error():
  proc = _start("--seq_len=128")
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2
  assert len(stderr.strip().splitlines()) == 1
  assert "--gin_file" in stderr
