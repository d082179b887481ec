"""Compile-only TPU plans (posttrain_jax/aot, tools/compile_plan.py).

The compiles run in one subprocess (aot_worker.py: libtpu, JAX_PLATFORMS=cpu,
no TPU needed), shared by the tests through a module fixture; parsing and
bad-input checks that need no compile run here.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from posttrain_jax.aot import collectives, topology

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install -e '.[tpu]')")


@pytest.fixture(scope="module")
def results():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "aot", "aot_worker.py")],
                        capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("AOT_RESULTS ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return json.loads(lines[-1][len("AOT_RESULTS "):])


@needs_libtpu
def test_the_tiny_train_step_compiles_for_v5e_2x2_and_the_table_is_memory_analysis(results):
  lm = results["lm"]
  assert lm["device_kind"] == "TPU v5 lite"
  row, mem = lm["row"], lm["memory_analysis"]
  assert {k: row[f"{k}_bytes"] for k in mem} == mem
  assert row["peak_bytes"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  assert lm["table_has_peak"] and row["fits"]
  assert row["capacity_bytes"] == 16 * 1024 ** 3
  assert row["flops"] == lm["flops_expected"]
  # fsdp over one slice: parameters all-gathered over ICI, nothing over DCN
  assert row["dcn_bytes_per_chip"] == 0 and row["ici_bytes_per_chip"] > 0
  assert any(c[0] == "ICI" and c[1] == "all-gather" and c[2] == 4 for c in row["collectives"])


@needs_libtpu
def test_a_two_slice_mesh_puts_every_replica_row_in_one_slice(results):
  mesh = results["mesh"]
  assert mesh["devices"] == 8 and mesh["shape"]["replica"] == 2
  assert mesh["replica_row_slices"] == [[0], [1]]
  assert "2 TPU slices" in mesh["one_slice_error"]


@needs_libtpu
def test_diloco_audit_passes_for_the_lm_inner_step_and_fails_on_a_replica_all_reduce(results):
  default = results["diloco"]["default"]
  assert "audit_error" not in default, default
  # the LM step's metrics stay per replica: nothing crosses DCN in the step
  inner = [n for n in default["dcn"] if n.endswith("inner step")]
  assert default["dcn"][inner[0]] == 0
  sync = [n for n in default["dcn"] if "sync" in n]
  # the exchange moves exactly traffic.py's bytes: FP4 codes + scales
  assert default["dcn"][sync[0]] == default["sync_bytes"][0] > 0
  # a replica mean of the metrics inside the step is an all-reduce over the
  # replica (DCN) axis in every inner step, which the audit refuses
  mean = results["diloco"]["replica_mean"]
  assert "inner step" in mean["audit_error"] and "DCN all-reduce" in mean["audit_error"]


@needs_libtpu
def test_splash_attention_lowers_to_the_tpu_kernel(results):
  assert results["splash"]["mosaic_calls"] > 0


@needs_libtpu
def test_bad_mesh_degrees_and_a_job_that_does_not_fit_are_one_line_errors(results):
  errors = results["errors"]
  assert "needs 3 devices but 4 are available" in errors["degrees"]
  # the TPU compiler refuses it: its HBM need and the chip's usable HBM
  assert "does not fit on v5e:2x2 (4 chips)" in errors["too_big"]
  assert "of HBM per chip" in errors["too_big"] and "15.75GB available" in errors["too_big"]
  assert "\n" not in errors["degrees"] + errors["too_big"]


def test_an_unknown_topology_is_one_error_line_and_exit_2():
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "compile_plan.py"),
       "--gin_file=gin/experiments/lm_quickstart.gin", "--topology=v7x:4x4"],
      capture_output=True, text=True, timeout=120, cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "posttrain_jax: error: Unknown TPU topology 'v7x:4x4': Unknown TPU generation "
      "'v7x'; known: v4, v5e, v5p, v6e (e.g. v5e:4x4, v5p:2x2x2)."]


def test_topology_names_and_hosts():
  t = topology.parse("v5e:16x16", 2)
  assert (t.num_chips, t.chips_per_host_bounds, t.chip.hbm_gib) == (512, (2, 2, 1), 16)
  assert topology.parse("v5p:4x4x4").chip.chip_config_name == "megacore"
  assert topology.parse("v6e:2x4").chips_per_host_bounds == (2, 4, 1)
  assert topology.parse("v5e:1x1").chips_per_host_bounds == (1, 1, 1)
  for bad, match in (("v5e-16", "expected GENERATION:AxB"), ("v5p:4x4", "3-D"),
                     ("v5e:32x32", "1 to 256 chips"), ("v5e:3x3", "hosts of 2x2x1")):
    with pytest.raises(topology.TopologyError, match=match):
      topology.parse(bad)


HLO = """HloModule jit_step, num_partitions=4

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[8]{0} all-gather(f32[2]{0} %x), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
  %ag.1 = f32[8]{0} all-gather(f32[2]{0} %x), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %n = s32[]{:T(128)} constant(13)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %ar = bf16[4,8]{1,0} all-reduce(bf16[4,8]{1,0} %a), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %s = (u8[1,64,1]{1,2,0}, u32[], token[]) send(%codes, %tok), channel_id=18, is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous="all-gather.67_0",_xla_megascale_transfer_type="ALL_GATHER"}
}
"""


def test_collectives_count_loop_trips_once_per_channel_and_megascale_as_dcn():
  # the loop's trips from its condition i < 13 (the TPU compiler's while has no
  # known_trip_count); the two pieces of channel 3 are one all-gather
  s = collectives.parse(HLO, [0, 0, 0, 0, 1, 1, 1, 1])
  by = {(c.link, c.kind): c for c in s.collectives}
  assert set(by) == {("ICI", "all-reduce"), ("ICI", "all-gather"), ("DCN", "all-gather")}
  ar, ag, dcn = by["ICI", "all-reduce"], by["ICI", "all-gather"], by["DCN", "all-gather"]
  assert (ar.group_size, ar.array_bytes, ar.count, ar.wire_bytes) == (2, 64, 1, 64)
  assert (ag.group_size, ag.array_bytes, ag.count, ag.wire_bytes) == (4, 32, 13, 24)
  assert (dcn.group_size, dcn.array_bytes, dcn.wire_bytes) == (2, 64, 64)
  assert s.devices_per_slice == 4 and s.dcn_slice_bytes == 4 * 64
  assert s.wire_bytes("ICI") == 64 + 13 * 24
