"""tools/bench_sample.py runs, matches transformers' greedy tokens, imports no TF."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_sample_tiny_matches_transformers():
  code = ("import runpy, sys; sys.argv = ['bench_sample.py', '--batch', '3', "
          "'--prompt_len', '12', '--new_tokens', '8', '--repeats', '1', '--json']; "
          "sys.modules['gin'] = None\n"
          "try:\n  runpy.run_path('tools/bench_sample.py', run_name='__main__')\n"
          "except SystemExit:\n  pass\n"
          "print(json.dumps({'tf': 'tensorflow' in sys.modules}))")
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  ours, hf, flags = rows
  assert ours["engine"] == "posttrain_jax" and hf["engine"].startswith("transformers")
  assert ours["new_tokens_per_s"] > 0 and hf["new_tokens_per_s"] > 0
  assert ours["agreement"] == 1.0  # same weights, same greedy tokens
  assert not flags["tf"]


def test_unknown_preset_is_one_line():
  proc = subprocess.run([sys.executable, "tools/bench_sample.py", "--model", "3b"], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert "Unknown model preset '3b'" in proc.stderr.strip().splitlines()[-1]


def test_profile_prints_the_decode_ops(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_cpu_enable_xprof_traceme=true")
  proc = subprocess.run([sys.executable, "tools/bench_sample.py", "--batch", "2",
                         "--prompt_len", "8", "--new_tokens", "4", "--repeats", "1",
                         "--no_hf", f"--profile={tmp_path}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "per decode step" in proc.stdout
  assert "while/body/Transformer/layer_*/attn" in proc.stdout  # the decode loop's ops
