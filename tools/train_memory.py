"""Memory of one train step, from the compiled program: does it fit on a card?

    python tools/train_memory.py --model 9b --batch_size 1 --seq_len 2048 \
        --param_dtype bfloat16 --mu_dtype bfloat16 --remat full --device_gib 141

Compiles (never runs) the LM train step of `Trainer` for abstract arrays on the
current backend and prints a table: the exact bytes of the parameters, the
optimizer state and the gradients, and XLA's buffer assignment for the step
(arguments, outputs, donated aliases, temporaries) with the peak it implies,
against --device_gib. Nothing is allocated, so a 9B step can be planned on a
laptop. Temporaries come from the backend that compiles: XLA:CPU's numbers
are an estimate of an accelerator's (different fusion and scheduling); the
parameter, optimizer and gradient bytes are exact anywhere. One device: the
question is what fits on one card (FSDP over several cards divides the
parameter, gradient and optimizer bytes by the fsdp degree; --ici shows it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp

from posttrain_jax import cli
from posttrain_jax.cli import ConfigError
from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.trainer import Trainer
from posttrain_jax.models import Transformer, presets
from posttrain_jax.models.config import REMAT_POLICIES

from bench_train import parse_parallelism  # tools/bench_train.py, this script's folder

GIB = 1024 ** 3


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="tiny", help="preset (tiny, 2b, 9b, 27b) or a model .gin")
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
  p.add_argument("--param_dtype", default=None, help="parameter dtype override")
  p.add_argument("--mu_dtype", default=None, help="AdamW first-moment dtype, e.g. bfloat16")
  p.add_argument("--remat", choices=REMAT_POLICIES, default=None)
  p.add_argument("--scan_layers", choices=("true", "false"), default=None)
  p.add_argument("--loss_chunk_size", type=int, default=None)
  p.add_argument("--num_microbatches", type=int, default=1)
  p.add_argument("--ici", default="", help="ICI degrees, e.g. 'fsdp=8' (needs that many devices)")
  p.add_argument("--device_gib", type=float, default=141.0,
                 help="memory of the card to plan for (H200: 141, H100: 80)")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
  return p.parse_args(argv)


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def plan(args) -> dict:
  overrides = {k: v for k, v in (
      ("dtype", args.dtype), ("param_dtype", args.param_dtype), ("remat_policy", args.remat),
      ("scan_layers", None if args.scan_layers is None else args.scan_layers == "true"))
      if v is not None}
  try:
    cfg = presets.load_preset(args.model, **overrides)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  schedule, tx = OptimizerConfig(mu_dtype=args.mu_dtype).build(1000)
  mesh = partitioning.create_mesh(parse_parallelism(args.ici, "ici"), {})
  trainer = Trainer(Transformer(cfg), tx, schedule, mesh,
                    num_microbatches=args.num_microbatches,
                    loss_chunk_size=args.loss_chunk_size)
  state = trainer.abstract_state
  batch = {k: jax.ShapeDtypeStruct((args.batch_size, args.seq_len), dtype,
                                   sharding=trainer.batch_sharding)
           for k, dtype in (("decoder_input_tokens", jnp.int32),
                            ("decoder_target_tokens", jnp.int32),
                            ("decoder_loss_weights", jnp.float32))}
  t0 = time.perf_counter()
  compiled = trainer.lower_train_step(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  devices = mesh.devices.size
  row = {
      "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
      "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
      "mu_dtype": args.mu_dtype or cfg.param_dtype, "remat": cfg.remat_policy,
      "scan_layers": cfg.scan_layers, "loss_chunk_size": args.loss_chunk_size,
      "num_microbatches": args.num_microbatches, "devices": devices,
      "backend": jax.default_backend(), "compile_s": compile_s,
      # exact, whole model (divide by the fsdp degree for one device's share)
      "params_bytes": _bytes(state.params),
      "optimizer_bytes": _bytes(state.opt_state),
      "gradient_bytes": _bytes(state.params),
      # XLA buffer assignment, per device
      "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "alias_bytes": mem.alias_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes,
  }
  row["peak_bytes"] = (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                       + row["temp_bytes"])
  row["device_gib"] = args.device_gib
  row["fits"] = row["peak_bytes"] <= args.device_gib * GIB
  return row


def table(row: dict) -> str:
  g = lambda n: f"{n / GIB:,.1f} GiB"
  lines = [
      f"{row['model']} train step, batch {row['batch_size']} x {row['seq_len']}, compute "
      f"{row['dtype']}, params {row['param_dtype']}, Adam mu {row['mu_dtype']}, remat "
      f"{row['remat']}, scan {row['scan_layers']}, loss chunk {row['loss_chunk_size']}, "
      f"microbatches {row['num_microbatches']}, {row['devices']} device(s), compiled on "
      f"{row['backend']} in {row['compile_s']:.1f} s",
      "",
      "| part | bytes |", "|---|---|",
      f"| parameters (exact) | {g(row['params_bytes'])} |",
      f"| optimizer state (exact) | {g(row['optimizer_bytes'])} |",
      f"| gradients (exact, param dtype) | {g(row['gradient_bytes'])} |",
      f"| XLA arguments (state + batch) | {g(row['argument_bytes'])} |",
      f"| XLA outputs | {g(row['output_bytes'])} |",
      f"| XLA donated (aliased) | {g(row['alias_bytes'])} |",
      f"| XLA temporaries (activations, gradients, ...) | {g(row['temp_bytes'])} |",
      f"| **peak per device** | **{g(row['peak_bytes'])}** |",
      "",
      f"{'fits' if row['fits'] else 'does NOT fit'} on a {row['device_gib']:g} GiB card"
      + ("" if row["backend"] != "cpu" else
         " (temporaries as XLA:CPU assigns them: an estimate of an accelerator's)"),
  ]
  return "\n".join(lines)


def main(argv) -> int:
  args = parse_args(argv)
  row = plan(args)
  print(json.dumps(row) if args.json else table(row), flush=True)
  return 0


if __name__ == "__main__":
  cli.run_main(main)
