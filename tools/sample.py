"""Samples continuations of prompts from a checkpoint with the KV-cache sampler.

  python tools/sample.py --checkpoint_dir DIR --prompts_file PROMPTS.jsonl \
      --out OUT.jsonl [--greedy | --temperature T --top_k K --top_p P] \
      --max_new_tokens N [--batch_size B] [--vocab tokenizer.model] [--seed S]

DIR is a model directory (tools/convert_hf.py import) or a training run
directory (its newest checkpoint, or --step). Each prompt line is
{"tokens": [ids...]} or {"text": "..."} (text needs a SentencePiece vocabulary:
--vocab, else DIR/hf_files/tokenizer.model, else the shipped 2k vocabulary
when the model's vocab_size matches it). Each output line holds the prompt
index, the prompt and generated token ids, the generated text when a
vocabulary is known, and per-token log-probs under the sampling distribution
and the model; the first --show samples (3) are printed too. A train_clp run
directory needs --weights (its reward weighting). Imports no TensorFlow.
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
import numpy as np

from posttrain_jax import cli
from posttrain_jax.core import partitioning
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl import clp as clp_lib
from posttrain_jax.rl import clp_training

SHIPPED_VOCAB = os.path.join(_REPO, "posttrain_jax", "data", "vocab", "pydoc_sp2k.model")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint_dir", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--model_gin", default=None, help="ModelConfig gin file, if not in DIR")
  p.add_argument("--prompts_file", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--greedy", action="store_true")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--max_cache_length", type=int, default=None,
                 help="bound on prompt length + max_new_tokens (default: none)")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--eos_id", type=int, default=1)
  p.add_argument("--vocab", default=None, help="SentencePiece model for text")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--weights", default=None,
                 help="CLP reward weighting w, e.g. 0.3,0.7 (a train_clp run directory)")
  p.add_argument("--ici", default="data=-1", help="mesh degrees, e.g. data=2,tensor=4")
  p.add_argument("--show", type=int, default=3,
                 help="print the first N samples (text, else token ids); 0: none")
  return p.parse_args(argv)


def load_vocab(path: str | None, checkpoint_dir: str, vocab_size: int):
  """A SentencePieceProcessor, or None when no vocabulary applies."""
  import sentencepiece as spm
  if path is None:
    hf_tok = os.path.join(checkpoint_dir, params_checkpoint.HF_FILES, "tokenizer.model")
    if os.path.isfile(hf_tok):
      path = hf_tok
    else:
      shipped = spm.SentencePieceProcessor(model_file=SHIPPED_VOCAB)
      return shipped if shipped.get_piece_size() == vocab_size else None
  if not os.path.isfile(path):
    raise cli.ConfigError(f"--vocab {path}: file not found.")
  return spm.SentencePieceProcessor(model_file=path)


def read_prompts(path: str, vocab) -> list[list[int]]:
  prompts = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise cli.ConfigError(f"{path}:{n}: not a JSON line ({e.msg}).") from e
      if "tokens" in record:
        prompts.append([int(t) for t in record["tokens"]])
      elif "text" in record:
        if vocab is None:
          raise cli.ConfigError(f"{path}:{n}: a text prompt needs a vocabulary; pass "
                                "--vocab tokenizer.model or give {\"tokens\": [...]}.")
        prompts.append(vocab.encode(record["text"]))
      else:
        raise cli.ConfigError(f"{path}:{n}: expected a \"tokens\" or \"text\" field.")
  if not prompts:
    raise cli.ConfigError(f"{path}: no prompts.")
  return prompts


def check_clp_weights(checkpoint_dir: str, weights: str | None) -> None:
  """A train_clp run holds a reward-conditioned policy: sampling it needs the
  weighting w (its parameters do not fit the plain model)."""
  if weights is not None or not os.path.isfile(
      os.path.join(checkpoint_dir, clp_training.CLP_JSON)):
    return
  rewards, _, _ = clp_training.read_clp_json(checkpoint_dir)
  example = ",".join([f"{1 / len(rewards):.2g}"] * len(rewards))
  raise cli.ConfigError(
      f"{checkpoint_dir} is a CLP run (train_clp; rewards {', '.join(rewards)}): pass "
      f"--weights with one weight per reward, summing to 1, e.g. --weights {example}.")


def conditioned_sampler(args, cfg, mesh, sampler, abstract, prompts):
  """(generate(prompts, rng, prompt_length), prompts, w or None): the plain model, or a
  CLP run steered by --weights (module docstring)."""
  if args.weights is None:
    params = params_checkpoint.restore_params(args.checkpoint_dir, abstract, cfg,
                                              step=args.step)
    return (lambda p, key, n: sampler(params, p, key, prompt_length=n)), prompts, None
  try:
    _, clp_cfg, vocab_path = clp_training.read_clp_json(args.checkpoint_dir)
  except FileNotFoundError as e:
    raise cli.ConfigError(f"--weights needs a CLP run directory (train_clp): {e}") from e
  w = clp_lib.parse_weights(args.weights, clp_cfg.num_rewards)
  if clp_cfg.prompt_conditioning:
    w = clp_lib.round_to_simplex(w, clp_cfg.weight_decimals)
  policy = clp_lib.ConditionedPolicy(cfg, clp_cfg)
  plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
  clp_abstract, shardings = clp_training.clp_shardings(policy, plain, sampler.param_shardings)
  clp_abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              clp_abstract, shardings)
  params = params_checkpoint.restore_params(args.checkpoint_dir, clp_abstract, cfg,
                                            step=args.step)
  encode = (clp_training.sentencepiece_encoder(vocab_path) if clp_cfg.prompt_conditioning
            else None)
  prompts, _ = clp_training.conditioned_prompts(prompts, [w] * len(prompts), clp_cfg, encode)
  if clp_cfg.mixing == "logit":
    steered = clp_training.CLPSampler(policy, sampler.config, mesh, shardings)
    return (lambda p, key, n: steered(params, np.repeat(w[None], len(p), 0), p, key,
                                      prompt_length=n)), prompts, w
  mixed = jax.jit(lambda t: clp_lib.mix(t, w, clp_cfg),
                  out_shardings=sampler.param_shardings)(params)
  return (lambda p, key, n: sampler(mixed, p, key, prompt_length=n)), prompts, w


def main(argv) -> int:
  args = parse_args(argv)
  try:
    location = params_checkpoint.locate(args.checkpoint_dir, args.step)
    cfg = params_checkpoint.model_config_of(location, args.model_gin)
  except (FileNotFoundError, ValueError) as e:
    raise cli.ConfigError(str(e)) from e
  check_clp_weights(args.checkpoint_dir, args.weights)
  vocab = load_vocab(args.vocab, args.checkpoint_dir, cfg.vocab_size)
  prompts = read_prompts(args.prompts_file, vocab)
  try:
    config = SamplingConfig(max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, greedy=args.greedy, eos_id=args.eos_id)
    ici = {k: int(v) for k, v in (kv.split("=") for kv in args.ici.split(",") if kv)}
    mesh = partitioning.create_mesh(ici)
    sampler = Sampler(cfg, config, mesh, max_cache_length=args.max_cache_length)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params_checkpoint.abstract_params(cfg), sampler.param_shardings)
    generate, prompts, weights = conditioned_sampler(args, cfg, mesh, sampler, abstract,
                                                     prompts)
    prompt_length = max(len(p) for p in prompts)
    rng = jax.random.key(args.seed)
    rows = []
    for start in range(0, len(prompts), args.batch_size):
      chunk = prompts[start:start + args.batch_size]
      padded = chunk + [chunk[0]] * (args.batch_size - len(chunk))  # one compiled shape
      out = jax.device_get(generate(padded, jax.random.fold_in(rng, start), prompt_length))
      for i, prompt in enumerate(chunk):
        gen = np.asarray(out.generated_mask[i])
        tokens = np.asarray(out.tokens[i])[gen].tolist()
        row = {"index": start + i, "prompt_tokens": prompt, "tokens": tokens,
               "sampling_logprobs": np.asarray(out.sampling_logprobs[i])[gen].tolist(),
               "model_logprobs": np.asarray(out.model_logprobs[i])[gen].tolist()}
        if weights is not None:
          row["weights"] = weights.tolist()
        if vocab is not None:
          row["text"] = vocab.decode([t for t in tokens if t != args.eos_id])
        rows.append(row)
  except ValueError as e:
    raise cli.ConfigError(str(e)) from e
  with open(args.out, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  for row in rows[:args.show]:
    shown = row.get("text", " ".join(map(str, row["tokens"])))
    print(f"[{row['index']}] {shown!r}")
  print(f"wrote {len(rows)} samples to {args.out}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
