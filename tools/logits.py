"""Forward-pass checker: float32 logits of a converted or trained checkpoint.

  python tools/logits.py --checkpoint_dir DIR --tokens_npy IN.npy --out_npy OUT.npy \
      [--step N] [--model_gin FILE] [--dtype float32|model] [--full_vocab]

IN.npy holds an integer array [batch, length] of token ids (no padding needed:
every row is read in full, positions 0..length-1). OUT.npy receives float32
logits [batch, length, V]. DIR is a model directory (tools/convert_hf.py import)
or a run directory (newest step, or --step). By default the forward pass runs
in float32 (parameters upcast, exactly) so the result can be compared with
transformers' float32 logits; --dtype=model keeps the dtypes of the model's gin.
V is the imported Hugging Face vocabulary size when DIR records one (padding
rows dropped), else the model's; --full_vocab keeps every row.

Compare after a conversion, e.g.:
  python - <<'EOF'
  import numpy as np, torch, transformers
  m = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32,
                                                       attn_implementation="eager")
  ref = m(torch.tensor(np.load("IN.npy"))).logits.numpy()
  print(np.abs(np.load("OUT.npy") - ref).max() / np.abs(ref).max())
  EOF

Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax import cli
from posttrain_jax.core.checkpointing import CheckpointMismatchError
from posttrain_jax.models import params_checkpoint
from posttrain_jax.models import Transformer


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="logits.py", description=(
      "Write a checkpoint's float32 logits for a [batch, length] token array."))
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--tokens_npy", required=True)
  parser.add_argument("--out_npy", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--model_gin", default=None)
  parser.add_argument("--dtype", default="float32", choices=("float32", "model"))
  parser.add_argument("--full_vocab", action="store_true")
  return parser


def load_tokens(path: str, vocab_size: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise cli.ConfigError(f"--tokens_npy {path} not found.")
  try:
    tokens = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise cli.ConfigError(f"--tokens_npy {path} is not a .npy array: {e}") from e
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or not tokens.size:
    raise cli.ConfigError(f"--tokens_npy {path} must hold a non-empty integer array "
                          f"[batch, length]; found {tokens.dtype} {tokens.shape}.")
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < 0 or hi >= vocab_size:
    raise cli.ConfigError(f"--tokens_npy {path} has token id {lo if lo < 0 else hi}, "
                          f"outside [0, {vocab_size}).")
  return tokens.astype(np.int32)


def main(argv) -> int:
  args = _parser().parse_args(argv)
  try:
    location = params_checkpoint.locate(args.checkpoint_dir, args.step)
    cfg = params_checkpoint.model_config_of(location, args.model_gin)
    if args.dtype == "float32":
      cfg = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
    tokens = load_tokens(args.tokens_npy, cfg.vocab_size)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = params_checkpoint.restore_params(
        args.checkpoint_dir, params_checkpoint.abstract_params(cfg, device), cfg,
        step=args.step)
  except (CheckpointMismatchError, FileNotFoundError, ValueError) as e:
    raise cli.ConfigError(str(e)) from e
  metadata = params_checkpoint.read_hf_metadata(location.root) or {}
  vocab = cfg.vocab_size if args.full_vocab else int(
      metadata.get("hf_vocab_size") or cfg.vocab_size)
  forward = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t)[..., :vocab])
  logits = np.asarray(forward(params, jnp.asarray(tokens)), dtype=np.float32)
  os.makedirs(os.path.dirname(os.path.abspath(args.out_npy)), exist_ok=True)
  np.save(args.out_npy, logits)
  print(f"wrote {args.out_npy}: float32 {logits.shape} logits of {location.root}"
        f"{f' step {location.step}' if location.step is not None else ''}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
