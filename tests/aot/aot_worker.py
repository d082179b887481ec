"""One process for the compile-only TPU tests (tests/aot/test_compile_plan.py):
libtpu loaded once, JAX_PLATFORMS=cpu, every compile of the suite here.

Prints one JSON line of results. Models: the tiny Gemma-2 config, cut to 2
layers (one local + one global) and a 512 vocabulary where the test is about
programs, not sizes, to keep the TPU compiles short.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=wrong-import-position
from posttrain_jax.aot import topology

topology.quiet_libtpu()

import jax.numpy as jnp
import numpy as np

from posttrain_jax.aot import diloco_audit, plan, programs, report
from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.trainer import Trainer
from posttrain_jax.diloco.streaming_diloco import DiLoCoConfig
from posttrain_jax.diloco.trainer import DiLoCoTrainer
from posttrain_jax.models import Transformer, presets

SMALL = dict(num_layers=2, vocab_size=512)


def lm_train_step(out):
  """The tiny model's train step for v5e:2x2 (fsdp=4): table vs memory_analysis."""
  target = topology.parse("v5e:2x2")
  mesh = partitioning.create_mesh({"fsdp": -1}, {}, topology.devices(target))
  cfg = presets.load_preset("tiny")
  schedule, tx = OptimizerConfig().build(100)
  trainer = Trainer(Transformer(cfg), tx, schedule, mesh)
  (program,) = programs.lm_programs(trainer, cfg, 8, 128)
  p = plan.compile_program(program, target, mesh)
  mem = p.compiled.memory_analysis()
  text = report.table(p, dict(mesh.shape))
  out["lm"] = {
      "row": report.row(p, dict(mesh.shape)),
      "memory_analysis": {k: int(getattr(mem, f"{k}_size_in_bytes"))
                          for k in ("argument", "output", "alias", "temp")},
      "table_has_peak": report.nbytes(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                      - mem.alias_size_in_bytes
                                      + mem.temp_size_in_bytes) in text,
      "flops_expected": cfg.flops_per_token(128) * 8 * 128,
      "device_kind": mesh.devices.flat[0].device_kind, "table": text}


def splash_train_step(out):
  """attention_impl="splash" builds and lowers to the TPU kernel (Mosaic)."""
  target = topology.parse("v5e:2x2")
  mesh = partitioning.create_mesh({"data": -1}, {}, topology.devices(target))
  cfg = presets.load_preset("tiny", attention_impl="splash", splash_block_size=128, **SMALL)
  schedule, tx = OptimizerConfig().build(100)
  trainer = Trainer(Transformer(cfg), tx, schedule, mesh)
  (program,) = programs.lm_programs(trainer, cfg, 4, 256)
  hlo = program.lower().compile().as_text()
  # the Pallas kernel as Mosaic custom calls (the interpreter would leave plain HLO loops)
  out["splash"] = {"mosaic_calls": hlo.count('custom_call_target="tpu_custom_call"')}


def two_slice_mesh(out):
  target = topology.parse("v5e:2x2", num_slices=2)
  devices = topology.devices(target)
  mesh = partitioning.create_mesh({"fsdp": -1}, {"replica": 2}, devices)
  rows = [sorted({topology.slice_index(d) for d in mesh.devices[r].flat})
          for r in range(mesh.shape["replica"])]
  try:
    partitioning.create_mesh({"fsdp": -1}, {}, devices)
    error = None
  except ValueError as e:
    error = str(e)
  out["mesh"] = {"shape": dict(mesh.shape), "replica_row_slices": rows,
                 "devices": len(devices), "one_slice_error": error}


def _replica_mean_inside(algo):
  """The mutation: the default inner program with its metrics averaged over
  the replicas inside it (an explicit all-reduce over "replica", DCN)."""
  inner = type(algo).inner_fn(algo)

  def fn(*args):
    step, replicas, metrics = inner(*args)
    return step, replicas, {k: jnp.broadcast_to(jnp.mean(v), v.shape)
                            for k, v in metrics.items()}
  return lambda: fn


def diloco(out):
  """The DiLoCo audit on 2 slices: the LM inner step (metrics per replica,
  averaged after it) passes; with a replica mean inside it (an all-reduce
  over the replica axis) it fails."""
  target = topology.parse("v5e:2x2", num_slices=2)
  mesh = partitioning.create_mesh({"fsdp": -1}, {"replica": 2}, topology.devices(target))
  cfg = presets.load_preset("tiny", **SMALL)
  schedule, tx = OptimizerConfig().build(100)
  config = DiLoCoConfig(num_replicas=2, sync_every=4, num_fragments=2, overlap=1)
  model = Transformer(cfg)
  results = {}
  for name in ("default", "replica_mean"):
    trainer = DiLoCoTrainer(model, tx, schedule, mesh, config)
    if name == "replica_mean":
      trainer.algo.inner_fn = _replica_mean_inside(trainer.algo)
    built = programs.diloco_programs(trainer, programs.lm_batch(8, 128, trainer.batch_sharding),
                                     0.0, 8 * 128)
    keep = [p for p in built if p.role == "inner" or (name == "default" and p.sync == (0,))]
    plans = [plan.compile_program(p, target, mesh) for p in keep]
    r = {"programs": [p.name for p in built],
         "dcn": {p.program.name: p.traffic.dcn_slice_bytes for p in plans},
         "sync_bytes": [trainer.traffic.sync_bytes(f) for f in range(len(trainer.fragments))]}
    try:
      r["audit"] = diloco_audit.audit(trainer.traffic, plans)
    except diloco_audit.AuditError as e:
      r["audit_error"] = str(e)
    results[name] = r
  out["diloco"] = results


def bad_inputs(out):
  """The command's one-line errors (ConfigError -> exit 2 in run_main)."""
  import gin  # pylint: disable=g-import-not-at-top
  import compile_plan  # pylint: disable=g-import-not-at-top  # tools/compile_plan.py
  from posttrain_jax.cli import ConfigError  # pylint: disable=g-import-not-at-top
  quick = os.path.join(REPO, "gin", "experiments", "lm_quickstart.gin")
  cases = {
      "degrees": ["--topology=v5e:2x2", "--ici=fsdp=3"],
      "too_big": ["--topology=v5e:2x2", "--ici=fsdp=-1", "--gin.ModelConfig.num_layers=2",
                  "--gin.ModelConfig.mlp_dim=4194304"],
  }
  errors = {}
  for name, argv in cases.items():
    gin.clear_config()
    try:
      compile_plan.main([f"--gin_file={quick}", *argv])
      errors[name] = None
    except ConfigError as e:
      errors[name] = str(e)
  out["errors"] = errors


def main():
  out = {}
  for fn in (two_slice_mesh, lm_train_step, diloco, splash_train_step, bad_inputs):
    fn(out)
  print("AOT_RESULTS " + json.dumps(out, default=lambda x: np.asarray(x).tolist()))


if __name__ == "__main__":
  main()
