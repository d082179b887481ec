"""Hugging Face Gemma 2 checkpoints <-> posttrain_jax model directories.

  python tools/convert_hf.py import --hf_dir HF_DIR --out_dir MODEL_DIR \
      [--pad_vocab_to 256128] [--param_dtype float32] [--dtype auto] \
      [--scan_layers] [--overwrite]
  python tools/convert_hf.py export --checkpoint_dir MODEL_OR_RUN_DIR --out_dir HF_DIR \
      [--step N] [--model_gin FILE] [--dtype auto] [--vocab_size N] \
      [--max_shard_size 5GB] [--overwrite]

import reads a Gemma2ForCausalLM directory (config.json + model.safetensors, or
shards listed in model.safetensors.index.json; bf16/fp16/fp32) and writes a
model directory (see posttrain_jax/models/params_checkpoint.py):
  MODEL_DIR/checkpoint        orbax parameters (param_dtype, default float32)
  MODEL_DIR/model.gin         ModelConfig bindings
  MODEL_DIR/hf_metadata.json  source config.json, stored dtype, HF vocab size
  MODEL_DIR/hf_files/         tokenizer.model & co., copied through
A run starts from it with
  python -m posttrain_jax.main --gin_file=MODEL_DIR/model.gin \
      --gin_file=runs/train.gin --gin.train.initial_checkpoint="'MODEL_DIR'" ...
--dtype is the compute dtype written to model.gin: auto = bfloat16 for 16-bit
checkpoints, float32 otherwise. --pad_vocab_to pads the embedding with zero rows
(a padded id's logit is 0 before the soft-cap, not -inf).

export writes config.json + safetensors (+ the copied tokenizer files) that
transformers.AutoModelForCausalLM.from_pretrained loads, from a model directory
or a training run (RUN_DIR: newest step, or --step; its ModelConfig comes from
RUN_DIR/config.gin or --model_gin). The vocabulary is cut back to the imported
HF size and the dtype defaults to the imported one (auto), so import -> export
is bit-exact.

Bad input (missing files, a config.json that does not match the weights, a
missing or mis-shaped tensor) prints one error naming each tensor with the
expected and found shapes, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from posttrain_jax import cli
from posttrain_jax.core.checkpointing import CheckpointMismatchError
from posttrain_jax.interop import hf_checkpoint
from posttrain_jax.interop import hf_gemma2
from posttrain_jax.models import params_checkpoint

DTYPES = ("auto", "bfloat16", "float16", "float32")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="convert_hf.py",
      description="Convert Gemma 2 checkpoints between Hugging Face and posttrain_jax.")
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF Gemma2ForCausalLM -> model directory")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--out_dir", required=True)
  imp.add_argument("--pad_vocab_to", type=int, default=None,
                   help="pad the embedding with zero rows to this many (e.g. 256128)")
  imp.add_argument("--param_dtype", default="float32", choices=DTYPES[1:])
  imp.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="compute dtype for model.gin (auto: bfloat16 for 16-bit "
                        "checkpoints, else float32)")
  imp.add_argument("--scan_layers", action="store_true",
                   help="store and configure the scanned layer layout")
  imp.add_argument("--overwrite", action="store_true")
  exp = sub.add_parser("export", help="model directory or run -> HF Gemma2ForCausalLM")
  exp.add_argument("--checkpoint_dir", required=True,
                   help="a model directory (from import) or a run directory")
  exp.add_argument("--out_dir", required=True)
  exp.add_argument("--step", type=int, default=None, help="run step (default: newest)")
  exp.add_argument("--model_gin", default=None,
                   help="gin file with the ModelConfig (default: DIR/model.gin "
                        "or RUN_DIR/config.gin)")
  exp.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="tensor dtype (auto: the imported checkpoint's, else "
                        "the parameters')")
  exp.add_argument("--vocab_size", type=int, default=None,
                   help="rows to export (default: the imported HF vocab size)")
  exp.add_argument("--max_shard_size", default="5GB")
  exp.add_argument("--overwrite", action="store_true")
  return parser


def _check_out_dir(path: str, overwrite: bool) -> bool:
  """Whether --out_dir holds something to replace; refuses without --overwrite."""
  path = os.path.abspath(path)
  occupied = os.path.exists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))
  if occupied and not overwrite:
    raise cli.ConfigError(f"--out_dir {path} exists and is not empty; pass "
                          "--overwrite to replace it.")
  return occupied


def _prepare_out_dir(path: str, overwrite: bool) -> str:
  path = os.path.abspath(path)
  if _check_out_dir(path, overwrite):
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  os.makedirs(path, exist_ok=True)
  return path


def _copy_side_files(source: str, dest: str) -> list[str]:
  copied = []
  for name in hf_checkpoint.SIDE_FILES:
    if os.path.isfile(os.path.join(source, name)):
      os.makedirs(dest, exist_ok=True)
      shutil.copyfile(os.path.join(source, name), os.path.join(dest, name))
      copied.append(name)
  return copied


def run_import(args) -> None:
  hf_dir = os.path.abspath(args.hf_dir)
  _check_out_dir(args.out_dir, args.overwrite)  # fail before the slow part
  config = hf_checkpoint.read_config(hf_dir)
  reader = hf_checkpoint.SafetensorsReader(hf_dir)
  stored = reader.stored_dtype()
  dtype = args.dtype
  if dtype == "auto":
    dtype = "bfloat16" if stored in ("bfloat16", "float16") else "float32"
  cfg = hf_gemma2.model_config_from_hf(
      config, vocab_size=args.pad_vocab_to, dtype=dtype,
      param_dtype=args.param_dtype, scan_layers=args.scan_layers)
  hf_vocab = int(config["vocab_size"])
  params = hf_gemma2.params_from_hf(reader, cfg, hf_vocab, where=hf_dir,
                                    tied=hf_gemma2.tie_word_embeddings(config))
  out_dir = _prepare_out_dir(args.out_dir, args.overwrite)
  metadata = {"source": hf_dir, "hf_config": config, "hf_vocab_size": hf_vocab,
              "hf_dtype": stored}
  params_checkpoint.save(out_dir, params, cfg, hf_metadata=metadata, header=(
      f"Imported from Hugging Face {hf_gemma2.HF_ARCHITECTURE} {hf_dir}\n"
      f"by tools/convert_hf.py import (stored dtype {stored}, HF vocab {hf_vocab})."))
  copied = _copy_side_files(hf_dir, os.path.join(out_dir, params_checkpoint.HF_FILES))
  count = sum(int(x.size) for x in _leaves(params))
  print(f"imported {hf_dir}: {cfg.num_layers} layers, {count:,} params, vocab "
        f"{hf_vocab}{f' padded to {cfg.vocab_size}' if cfg.vocab_size > hf_vocab else ''}"
        f", stored {stored} -> param_dtype {cfg.param_dtype}, dtype {cfg.dtype}, "
        f"{'scanned' if cfg.scan_layers else 'unscanned'} layout")
  print(f"wrote {out_dir}/{{{params_checkpoint.PARAMS}, {params_checkpoint.MODEL_GIN}, "
        f"{params_checkpoint.HF_METADATA}}}"
        + (f" and {params_checkpoint.HF_FILES}/ ({', '.join(copied)})" if copied else ""))
  print(f"train from it: python -m posttrain_jax.main --gin_file={out_dir}/"
        f"{params_checkpoint.MODEL_GIN} --gin_file=runs/train.gin "
        f"--gin.train.initial_checkpoint=\"'{out_dir}'\" ...")


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def run_export(args) -> None:
  _check_out_dir(args.out_dir, args.overwrite)
  location = params_checkpoint.locate(args.checkpoint_dir, args.step)
  cfg = params_checkpoint.model_config_of(location, args.model_gin)
  metadata = params_checkpoint.read_hf_metadata(location.root) or {}
  params = params_checkpoint.load_numpy_params(args.checkpoint_dir, cfg, step=args.step)
  vocab = args.vocab_size or metadata.get("hf_vocab_size") or cfg.vocab_size
  dtype = args.dtype
  if dtype == "auto":
    dtype = metadata.get("hf_dtype") or cfg.param_dtype
  tensors = hf_gemma2.params_to_hf(params, cfg, vocab_size=vocab, dtype=dtype)
  config = hf_gemma2.hf_config_from_model(cfg, vocab_size=vocab, dtype=dtype,
                                          base=metadata.get("hf_config"))
  out_dir = _prepare_out_dir(args.out_dir, args.overwrite)
  written = hf_checkpoint.write_checkpoint(
      out_dir, config, tensors, hf_checkpoint.parse_size(args.max_shard_size))
  for root in (location.root, metadata.get("initial_checkpoint")):
    if root and os.path.isdir(os.path.join(root, params_checkpoint.HF_FILES)):
      written += _copy_side_files(os.path.join(root, params_checkpoint.HF_FILES), out_dir)
      break
  step = f" step {location.step}" if location.step is not None else ""
  print(f"exported {location.root}{step}: {cfg.num_layers} layers, vocab {vocab}, "
        f"{dtype} -> {out_dir} ({', '.join(written)})")


def main(argv) -> int:
  args = _parser().parse_args(argv)
  try:
    (run_import if args.command == "import" else run_export)(args)
  except (hf_gemma2.HFConversionError, hf_checkpoint.HFCheckpointError,
          CheckpointMismatchError, FileNotFoundError, ValueError) as e:
    if os.environ.get("POSTTRAIN_JAX_TRACEBACK"):
      raise
    raise cli.ConfigError(str(e)) from e
  return 0


if __name__ == "__main__":
  cli.run_main(main)
