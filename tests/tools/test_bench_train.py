"""tools/bench_train.py: synthetic-token train-step benchmark, run as a subprocess."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "bench_train.py")
SMALL = ["--batch_size=4", "--seq_len=32", "--steps=3", "--warmup=1"]


def _run(args, devices=1, prelude=""):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  if prelude:  # run the tool through runpy after `prelude` (e.g. hiding gin)
    code = (f"import runpy, sys; {prelude}; sys.argv = {[TOOL, *args]!r}; "
            f"runpy.run_path({TOOL!r}, run_name='__main__')")
    cmd = [sys.executable, "-c", code]
  else:
    cmd = [sys.executable, TOOL, *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def _json_row(proc):
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout
  return json.loads(lines[0])


def test_tiny_gin_json_row_without_tensorflow():
  proc = _run(["--gin_file=gin/models/gemma2_tiny.gin",
               "--gin.ModelConfig.num_layers=2", *SMALL, "--json"])
  row = _json_row(proc)
  assert row["tokens_per_s"] > 0 and row["step_ms"] > 0
  assert row["compile_s"] > 0
  assert row["model_tflops_per_device"] > 0
  assert row["backend"] == "cpu" and row["devices"] == 1
  assert row["mfu_percent"] is None  # no known peak for CPU
  assert row["peak_memory_source"] == "host RSS" and row["peak_memory_bytes"] > 0
  assert row["model"] == "tiny*"
  assert row["batch_size"] == 4 and row["seq_len"] == 32 and row["steps"] == 3
  # tiny with 2 layers: embedding 2048*128 + 2 layers + final norm.
  per_layer = 128 * 32 * (2 * 4 + 2 * 2) + 3 * 128 * 512 + 4 * 128
  assert row["params"] == 2048 * 128 + 2 * per_layer + 128
  assert 0 < row["loss"] < 20
  assert row["tensorflow_imported"] is False
  assert row["seqio_imported"] is False


def test_preset_without_gin_two_devices_fsdp_table():
  # gin hidden: --model must work from the literal gin-file reader alone.
  proc = _run(["--model=tiny", *SMALL, "--ici=fsdp=-1", "--num_microbatches=2",
               "--remat=full", "--peak_tflops=1.0"],
              devices=2, prelude="sys.modules['gin'] = None")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3, proc.stdout
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
  for col in ("backend", "devices", "device kind", "model", "params", "batch x seq",
              "tokens/s", "step ms", "model TFLOP/s/dev", "MFU", "peak mem",
              "compile s"):
    assert col in row, header
  assert set(lines[1]) <= set("|-")
  assert row["devices"] == "2" and row["mesh"] == "fsdp=2"
  assert row["model"] == "tiny" and row["batch x seq"] == "4 x 32"
  assert float(row["tokens/s"].replace(",", "")) > 0
  assert float(row["step ms"]) > 0
  assert row["MFU"].endswith("%")
  assert "host RSS" in row["peak mem"]


def test_literal_reader_matches_gin_for_every_preset():
  code = f"""
import dataclasses, runpy, sys
mod = runpy.run_path({TOOL!r})
import gin
from posttrain_jax import cli
from posttrain_jax.models import ModelConfig
configurable = cli.register(ModelConfig)
for name in ("tiny", "2b", "9b", "27b"):
  gin.clear_config()
  path = mod["model_gin_path"](name)
  cli.configure(cli.parse_flags(["--gin_file=" + path]))
  assert mod["read_model_gin"](path) and ModelConfig(**mod["read_model_gin"](path)) == configurable(), name
print("ok")
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "ok"


def test_config_errors_exit_2_with_one_line():
  for args, needle in ((["--model=nope"], "presets"),
                       (["--model=tiny", "--ici=bogus=2"], "--ici"),
                       (["--model=tiny", "--remat=dots", "--dtype=notadtype"], "dtype")):
    proc = _run(args)
    assert proc.returncode == 2, (args, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


def _json_rows(proc):
  assert proc.returncode == 0, proc.stderr
  return [json.loads(line) for line in proc.stdout.strip().splitlines()]


def _skip_without_peer():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")


TINY2 = ["--gin_file=gin/models/gemma2_tiny.gin", "--gin.ModelConfig.num_layers=2"]
PEER_SMALL = ["--batch_size=2", "--seq_len=16", "--steps=2", "--warmup=1"]


def test_forward_step_peer_same_weights_same_loss_without_tensorflow():
  _skip_without_peer()
  # Hide TensorFlow: the tool (and its peer) must not need it.
  proc = _run([*TINY2, *PEER_SMALL, "--step=forward", "--peer=hf", "--peer_threads=1",
               "--json"], prelude="sys.modules['tensorflow'] = None")
  ours, peer = _json_rows(proc)
  assert ours["engine"].startswith("posttrain_jax") and ours["step"] == "forward"
  assert peer["engine"].startswith("transformers") and "eager" in peer["engine"]
  # Same weights and batches: the forward loss agrees (fp32).
  assert abs(ours["loss"] - peer["loss"]) < 1e-4 * abs(ours["loss"]), (ours, peer)
  assert peer["ours_speedup"] == ours["tokens_per_s"] / peer["tokens_per_s"]
  assert peer["params"] == ours["params"]
  # forward FLOPs are a third of the train step's
  assert ours["flops_per_token"] * 3 == _train_flops_tiny2(16)
  for row in (ours, peer):
    assert row["tensorflow_imported"] is False and row["seqio_imported"] is False
    assert row["interleaved"] is True  # a CPU peer: windows alternate (--interleave auto)


def _train_flops_tiny2(seq_len):
  code = (f"import runpy; mod = runpy.run_path({TOOL!r}); "
          "from posttrain_jax.models import presets; "
          f"print(repr(presets.load_preset('tiny', num_layers=2).flops_per_token({seq_len})))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  return float(proc.stdout.strip())


def test_train_peer_table_has_ratio_column_and_distill_chunked_runs():
  _skip_without_peer()
  proc = _run([*TINY2, *PEER_SMALL, "--peer=hf", "--peer_threads=1",
               "--loss_chunk_size=5"])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4, proc.stdout
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
          for line in lines[2:]]
  assert rows[0]["engine"] == "posttrain_jax (xla) loss chunk 5"
  assert rows[0]["ours / this"] == "-" and rows[1]["ours / this"].endswith("x")
  assert rows[1]["step"] == "train" and rows[1]["batch x seq"] == "2 x 16"
  # distill step (teacher = the same model), chunked loss, dot_product_attention.
  proc = _run([*TINY2, *PEER_SMALL, "--step=distill", "--loss_chunk_size=8",
               "--attention_impl=dot_product_attention", "--no_attn_soft_cap", "--json"])
  (row,) = _json_rows(proc)
  assert row["step"] == "distill" and row["attention_impl"] == "dot_product_attention"
  assert row["flops_per_token"] == _train_flops_tiny2(16) * 4 / 3
  assert 0 <= row["loss"] < 20


def test_new_flag_errors_exit_2_with_one_line():
  for args, needle in (
      (["--model=tiny", "--attention_impl=dot_product_attention"], "attn_logits_soft_cap"),
      (["--model=tiny", "--teacher_model=tiny"], "--step=distill"),
      (["--model=tiny", "--step=forward", "--loss_chunk_size=4"], "forward"),
      (["--model=tiny", "--loss_chunk_size=0"], "--loss_chunk_size"),
      (["--model=tiny", "--repeats=0"], "--repeats"),
      (["--model=tiny", "--peer_no_eager"], "--peer_compile")):
    proc = _run(args)
    assert proc.returncode == 2, (args, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


def _windows(name, log, repeats=2):
  """A fake engine for run_windows: logs its setup, windows and release."""
  log.append(f"{name} setup")
  for r in range(repeats):
    yield
    log.append(f"{name} window {r}")
  yield
  log.append(f"{name} release")
  return {"engine": name}


def test_run_windows_interleaves_windows_and_releases_after_all():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("bench_train_tool", TOOL)
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  log = []
  rows = tool.run_windows([_windows("peer", log), _windows("ours", log)], interleave=True)
  assert rows == [{"engine": "peer"}, {"engine": "ours"}]
  assert log == ["peer setup", "ours setup", "peer window 0", "ours window 0",
                 "peer window 1", "ours window 1", "peer release", "ours release"]
  log.clear()
  tool.run_windows([_windows("peer", log), _windows("ours", log)], interleave=False)
  assert log == ["peer setup", "peer window 0", "peer window 1", "peer release",
                 "ours setup", "ours window 0", "ours window 1", "ours release"]
