"""The elastic DiLoCo LM path (job `elastic_diloco`, posttrain_jax/jobs/
elastic_diloco.py): each slice trains its row block of the global batch, so 2
slices (two binaries, torchft's Lighthouse) compute the SPMD Streaming DiLoCo
run (`train` with `train.diloco`, M = 2) of the same gin, and report as the LM
job does (progress lines, TensorBoard, config.gin), with torchft's log in
RUN_DIR/lighthouse.log and the launcher leaving with the slices. The ElasticSlice
protocol itself (kills, heals, checkpoints) is tested on the toy task in
tests/diloco/elastic/."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from posttrain_jax.diloco.elastic import membership
from posttrain_jax.diloco.elastic.run_slice import flat_arrays
from posttrain_jax.models import params_checkpoint

pytestmark = pytest.mark.skipif(not membership.available(),
                                reason="torchft (the Lighthouse) is not installed")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(REPO, "launch", "local.py")
GIN = "gin/experiments/elastic_diloco/lm.gin"
SPMD_GIN = "gin/experiments/streaming_diloco/streaming_fp4_h15.gin"
STEPS = 6
SYNC_STEPS = [1, 2, 3, 4, 5, 6]
# A small run of the experiment's configuration: 2 fragments synced every 2
# steps (staggered, overlap 1), fp32 exchange: the comparison is to float
# tolerance, and FP4 would turn a last-bit difference of two differently
# compiled programs into a whole quantization step.
COMMON = [f"--gin.NUM_STEPS={STEPS}", "--gin.BATCH_SIZE=4", "--gin.SEQUENCE_LENGTH=32",
          "--gin.DiLoCoConfig.sync_every=2", "--gin.DiLoCoConfig.quantization='none'"]


def _env():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device per process, as a slice's host here
  return env


def _binary(args, log):
  return subprocess.Popen([sys.executable, "-m", "posttrain_jax.main"] + args, cwd=REPO,
                          env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _tensorboard(log_dir) -> dict[str, list[int]]:
  """{tag: steps} of the TensorBoard events under log_dir (clu writes tensors)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(log_dir))
  acc.Reload()
  return {tag: [e.step for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def test_two_slices_equal_the_spmd_run(tmp_path):
  """launch/local.py --elastic_slices=2 with the LM gin (the Lighthouse and two
  binaries) against the binary's SPMD run, both at once; the elastic run's
  output is the LM job's (progress lines, TensorBoard, config.gin), torchft's
  log goes to RUN_DIR/lighthouse.log, and the launcher leaves with the slices."""
  elastic_dir, spmd_dir = tmp_path / "elastic", tmp_path / "spmd"
  procs = [subprocess.Popen(
      [sys.executable, LAUNCHER, "--elastic_slices=2", "--elastic_join_timeout=10",
       "--elastic_heartbeat_timeout=5", "--timeout=400", f"--gin_file={GIN}",
       f"--gin.RUN_DIR='{elastic_dir}'", "--gin.elastic_diloco.log_every=2"] + COMMON,
      cwd=REPO, env=_env(),
      stdout=open(tmp_path / "elastic.log", "wb"), stderr=subprocess.STDOUT)]
  procs.append(_binary([f"--gin_file={SPMD_GIN}", f"--gin.RUN_DIR='{spmd_dir}'",
                        "--gin.train.eval_every=0"] + COMMON,
                       open(tmp_path / "spmd.log", "wb")))
  try:
    codes = [procs[0].wait(timeout=450)]
    launcher_exit = time.time()
    codes.append(procs[1].wait(timeout=450))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = {n: (tmp_path / f"{n}.log").read_text()[-3000:] for n in ("elastic", "spmd")}
  assert codes == [0, 0], logs
  text = (tmp_path / "elastic.log").read_text()
  for s in range(2):  # each slice's progress lines, as the LM job's
    lines = re.findall(rf"^\[s{s}\] step +(\d+)/{STEPS} \| loss \d+\.\d+ .*$", text, re.M)
    assert lines == ["2", "4", "6"], text[-3000:]
    assert re.search(rf"^\[s{s}\] step +6/{STEPS} \| .*steps/s \| ETA ", text, re.M)
    tags = _tensorboard(elastic_dir / f"slice_{s}")
    assert tags["loss"] == [2, 4, 6] and tags["steps_per_sec"] == [2, 4, 6], tags
    assert {"tokens_per_sec", "learning_rate", "grad_norm", "config"} <= tags.keys()
    assert tags["elastic/members"] == SYNC_STEPS == tags["elastic/sync_wait_s"]
  config = (elastic_dir / "config.gin").read_text()
  assert "elastic_diloco.slice_index = 0" in config and f"NUM_STEPS = {STEPS}" in config
  # torchft's INFO lines are in RUN_DIR/lighthouse.log, one console line says where
  assert "[INFO]" not in text, text[-3000:]
  assert f"torchft's log: {elastic_dir / 'lighthouse.log'}" in text
  assert "[INFO] [torchft::lighthouse] - Quorum!" in (elastic_dir / "lighthouse.log").read_text()
  # the launcher leaves with the slices (a few seconds here): the Lighthouse
  # stops at its SIGTERM (no SIGKILL after the 5 s grace), and no slice's exit
  # waits out a timer (tf.data's autotuning thread held one up to 60 s)
  assert "after SIGTERM; killing it" not in text, text[-3000:]
  last = max(json.loads(l)["time"] for s in range(2)
             for l in open(elastic_dir / f"slice{s}.jsonl") if l.strip())
  assert launcher_exit - last < 15, (launcher_exit - last, text[-3000:])
  spmd = flat_arrays(params_checkpoint.load_numpy_params(
      str(spmd_dir), params_checkpoint.model_config_of(params_checkpoint.locate(str(spmd_dir)))))
  slices = [dict(np.load(elastic_dir / f"slice{s}_outer.npz")) for s in range(2)]
  assert slices[0].keys() == spmd.keys()
  for k, v in spmd.items():
    np.testing.assert_array_equal(slices[1][k], slices[0][k], err_msg=k)  # slices agree
    # AdamW's 1/sqrt(v) turns a last-bit gradient difference of the two programs
    # into ~1e-6 on rare near-zero elements: absolute tolerance 2e-5 (an inner
    # step moves a weight by ~lr = 3e-3)
    np.testing.assert_allclose(slices[0][k], v, rtol=1e-5, atol=2e-5, err_msg=k)
  for s in range(2):
    recs = [json.loads(l) for l in open(elastic_dir / f"slice{s}.jsonl") if l.strip()]
    syncs = [r for r in recs if r["event"] == "sync"]
    assert [r["step"] for r in syncs] == SYNC_STEPS
    assert all(r["members"] == [0, 1] for r in syncs)
