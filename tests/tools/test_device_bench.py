"""tools/device_bench.sh at a tiny shape on CPU (the GPU run uses the 2B defaults)."""

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "device_bench.sh")

TINY_ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "BENCH_MODEL": "tiny", "BENCH_BATCH": "2", "BENCH_SEQ": "16",
            "BENCH_STEPS": "1", "BENCH_WARMUP": "1", "BENCH_BIG_BATCHES": "4",
            "BENCH_LOSS_CHUNK": "8", "BENCH_PEER_COMPILE": "0",
            # 0: no per-command limit (GNU timeout), so a loaded machine cannot turn
            # the expected exit status into 124: the tests do not depend on speed.
            "BENCH_TIMEOUT": "0"}


def _run(out_dir, **env):
  return subprocess.run(["bash", SCRIPT, str(out_dir)], cwd=REPO,
                        env={**os.environ, **TINY_ENV, **env}, capture_output=True,
                        text=True, timeout=3600)  # a hang guard only


def test_tiny_run_writes_tables_and_rows(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  proc = _run(tmp_path, BENCH_PEER_THREADS="1")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in (tmp_path / "device_bench.jsonl").read_text().splitlines()]
  engines = [r["engine"] for r in rows]
  # peer section: ours + transformers eager; batch: chunked at 2 and 4;
  # attn: reference without soft-cap, then dot_product_attention/xla (CPU).
  assert len(rows) == 6, engines
  assert engines[0] == "posttrain_jax (xla)" and engines[1].startswith("transformers")
  assert rows[1]["ours_speedup"] > 0
  assert [r["batch_size"] for r in rows[2:4]] == [2, 4]
  assert all(r["loss_chunk_size"] == 8 for r in rows[2:])
  assert rows[4]["attention_impl"] == "xla"
  assert rows[5]["attention_impl"] == "dot_product_attention"
  assert rows[5]["dpa_implementation"] == "xla"
  assert all(r["seq_len"] == 16 and r["step"] == "train" for r in rows)
  assert not any(r["tensorflow_imported"] for r in rows)
  md = (tmp_path / "device_bench.md").read_text()
  assert md.count("| engine") == 5 and "failed runs: 0" in md
  assert "python tools/bench_train.py --model=tiny" in md  # the commands are recorded
  assert not (tmp_path / "last_table.md").exists()


def test_failed_run_is_reported_and_script_goes_on(tmp_path):
  # An impossible batch (not divisible) fails one run; the summary counts it.
  proc = _run(tmp_path, BENCH_SECTIONS="batch", BENCH_BATCH="2",
              BENCH_BIG_BATCHES="4", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  # batch 2 on 4 devices cannot be split; batch 4 can.
  assert proc.returncode == 0, proc.stderr
  md = (tmp_path / "device_bench.md").read_text()
  assert "FAILED (exit 2)" in md and "failed runs: 1" in md
  rows = (tmp_path / "device_bench.jsonl").read_text().splitlines()
  assert len(rows) == 1 and json.loads(rows[0])["batch_size"] == 4


def test_unknown_section_exits_2(tmp_path):
  proc = _run(tmp_path, BENCH_SECTIONS="nope")
  assert proc.returncode == 2 and "unknown section nope" in proc.stderr
