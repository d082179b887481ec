"""Parameter counts, bytes and training FLOPs of a gin-configured model.

  python tools/model_info.py --gin_file=gin/models/gemma2_2b.gin \
      [--gin.ModelConfig.NAME=VALUE ...] [--seq_len=8192]
  python tools/model_info.py --model=27b          # = gin/models/gemma2_27b.gin

Prints one JSON line. Counts come from `jax.eval_shape` of the model's init,
so nothing is allocated and the 27B model takes seconds on a CPU:
`embedding` is the (tied) embedder table, `non_embedding` every other leaf,
`total` their sum. `closed_form_matches` compares them with
ModelConfig.embedding_params() / non_embedding_params(). `flops_per_token` is
ModelConfig.flops_per_token(seq_len) (training: 6N + causal attention).

Configuration errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
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
from posttrain_jax.models import ModelConfig
from posttrain_jax.models import params_checkpoint


def _parse_args(rest):
  parser = argparse.ArgumentParser(
      prog="model_info.py",
      description="Parameter counts and FLOPs of a ModelConfig given by gin.")
  parser.add_argument("--model", default=None,
                      help="preset name (tiny, 2b, 9b, 27b): prepends "
                           "gin/models/gemma2_NAME.gin to the gin files")
  parser.add_argument("--seq_len", type=int, default=8192,
                      help="sequence length for flops_per_token (default 8192)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also report parameters per top-level module path")
  args, unknown = parser.parse_known_args(rest)
  if unknown:
    raise cli.ConfigError(f"Unknown arguments: {' '.join(unknown)}. Use "
                          "--gin_file=FILE, --gin.NAME=VALUE, --model=NAME, "
                          "--seq_len=N.")
  if args.seq_len <= 0:
    raise cli.ConfigError(f"--seq_len must be positive, got {args.seq_len}.")
  return args


def build_config(flags: cli.GinFlags) -> ModelConfig:
  """ModelConfig() configured by the gin files and bindings in `flags`."""
  configurable = cli.register(ModelConfig)
  try:
    cli.configure(flags)
  except cli.ConfigError as e:
    raise cli.ConfigError(str(e)) from e
  try:
    return cli.call(configurable)
  except (ValueError, TypeError) as e:
    raise cli.ConfigError(cli.strip_gin_context(str(e))) from e


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def count(params) -> dict:
  """Counts and bytes from a tree of ShapeDtypeStructs."""
  embedding = params["embedder"]["embedding"]
  n_embedding = int(np.prod(embedding.shape))
  total = 0
  total_bytes = 0
  groups = {"attention": 0, "mlp": 0, "norms": 0, "other": 0}
  modules: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    n = int(np.prod(leaf.shape))
    total += n
    total_bytes += n * jnp.dtype(leaf.dtype).itemsize
    name = _path_name(path)
    top = name.split("/")[0]
    modules[top] = modules.get(top, 0) + n
    if name == "embedder/embedding":
      continue
    if "/attn/" in f"/{name}/":
      groups["attention"] += n
    elif "/mlp/" in f"/{name}/":
      groups["mlp"] += n
    elif "norm" in name:
      groups["norms"] += n
    else:
      groups["other"] += n
  return {"total": total, "embedding": n_embedding,
          "non_embedding": total - n_embedding, "param_bytes": total_bytes,
          "groups": groups, "modules": modules}


def info(cfg: ModelConfig, seq_len: int, name: str = "ModelConfig",
         breakdown: bool = False) -> dict:
  counts = count(params_checkpoint.abstract_params(cfg))
  flops = cfg.flops_per_token(seq_len)
  out = {
      "config": name,
      "total": counts["total"],
      "embedding": counts["embedding"],
      "non_embedding": counts["non_embedding"],
      "closed_form_matches": (
          counts["embedding"] == cfg.embedding_params()
          and counts["non_embedding"] == cfg.non_embedding_params()),
      "vocab_size": cfg.vocab_size,
      "embed_dim": cfg.embed_dim,
      "num_layers": cfg.num_layers,
      "num_heads": cfg.num_heads,
      "num_kv_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "mlp_dim": cfg.mlp_dim,
      "attention_pattern": list(cfg.attention_pattern),
      "sliding_window_size": cfg.sliding_window_size,
      "dtype": cfg.dtype,
      "param_dtype": cfg.param_dtype,
      "param_bytes": counts["param_bytes"],
      "param_gib": round(counts["param_bytes"] / 2**30, 3),
      # AdamW keeps two moments per parameter in the parameter dtype.
      "train_state_bytes": 3 * counts["param_bytes"],
      "seq_len": seq_len,
      "flops_per_token": flops,
      "flops_per_token_6n": 6 * counts["total"],
      "attention_flops_fraction": round(1 - 6 * counts["total"] / flops, 4),
      "non_embedding_groups": counts["groups"],
  }
  if breakdown:
    out["modules"] = counts["modules"]
  return out


def main(argv) -> int:
  flags = cli.parse_flags(argv)
  args = _parse_args(flags.rest)
  if args.model:
    path = args.model
    if not path.endswith(".gin"):
      path = os.path.join(cli.GIN_DIR, "models", f"gemma2_{args.model}.gin")
      if not os.path.exists(path):
        presets = sorted(f[len("gemma2_"):-len(".gin")] for f in os.listdir(
            os.path.join(cli.GIN_DIR, "models")) if f.startswith("gemma2_"))
        raise cli.ConfigError(f"Unknown --model {args.model!r}; presets: "
                              f"{', '.join(presets)} (or a .gin path).")
    flags.gin_files.insert(0, path)
  if not flags.gin_files:
    raise cli.ConfigError("No model given; pass --gin_file=gin/models/gemma2_2b.gin "
                          "or --model=2b.")
  cfg = build_config(flags)
  name = "+".join(os.path.splitext(os.path.basename(f))[0] for f in flags.gin_files)
  if flags.bindings:
    name += f" ({len(flags.bindings)} binding{'s' if len(flags.bindings) > 1 else ''})"
  print(json.dumps(info(cfg, args.seq_len, name, args.breakdown)))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
