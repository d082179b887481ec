"""Samples two responses per prompt from a policy and labels them with the gold reward.

  python tools/label_preferences.py --checkpoint POLICY_DIR --output OUT.jsonl \
      --num_prompts N [--label_noise 0.25] [--temperature 1.0] [--seed 0] \
      [--split train] [--prompt_length 16] [--max_new_tokens 32] [--batch_size 32]

POLICY_DIR is a model directory or a training run (its newest checkpoint).
Prompts: posttrain_jax.data.prompts.load_prompts("pydoc_prompts", ...), the
first --num_prompts documents of the split in file order, each cut to its
first --prompt_length tokens (without posttrain_jax.data.prompts, a fallback
takes corpus lines of posttrain_jax/data/corpus/pydoc_{split}.txt chosen by
--seed). Each prompt gets two samples (sampling.Sampler, --temperature); the
one with the higher gold reward (posttrain_jax/rl/gold_reward.py) is "chosen";
ties are dropped; then exactly round(label_noise * pairs) labels are flipped
(seeded). Output lines: {"prompt", "chosen", "rejected", "flipped",
"gold_chosen", "gold_rejected"} token ids and floats (data/preferences.py).
"""

from __future__ import annotations

import argparse
import importlib.util
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
from posttrain_jax.core import partitioning
from posttrain_jax.data import preferences
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl.gold_reward import gold_reward

CORPUS = os.path.join(_REPO, "posttrain_jax", "data", "corpus", "pydoc_{}.txt")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="label_preferences.py", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="policy model dir or run dir")
  p.add_argument("--output", required=True)
  p.add_argument("--num_prompts", type=int, required=True)
  p.add_argument("--label_noise", type=float, default=0.0,
                 help="fraction of pairs whose label is flipped (exact, seeded)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--split", default="train", help="corpus split the prompts come from")
  p.add_argument("--prompt_length", type=int, default=16)
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--ici", default="data=-1", help="mesh degrees, e.g. data=2,tensor=4")
  return p.parse_args(argv)


def corpus_prompts(split: str, prompt_length: int, num_prompts: int, seed: int):
  """Prefixes of `prompt_length` tokens of seeded-random corpus lines."""
  path = CORPUS.format(split)
  if not os.path.isfile(path):
    raise cli.ConfigError(f"--split {split}: no corpus file {path}.")
  from posttrain_jax.data.vocab import get_vocabulary
  vocab = get_vocabulary()
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
  prompts = []
  for i in np.random.default_rng(seed).permutation(len(lines)):
    ids = vocab.encode(lines[i])
    if len(ids) > prompt_length:
      prompts.append(list(ids[:prompt_length]))
      if len(prompts) == num_prompts:
        return prompts
  raise cli.ConfigError(f"The {split} corpus has only {len(prompts)} lines longer than "
                        f"{prompt_length} tokens; lower --num_prompts or --prompt_length.")


def load_prompts(split: str, prompt_length: int, num_prompts: int, seed: int):
  if importlib.util.find_spec("posttrain_jax.data.prompts") is not None:
    from posttrain_jax.data import prompts as prompts_module
    return prompts_module.load_prompts(task_name="pydoc_prompts", split=split,
                                       prompt_length=prompt_length, num_prompts=num_prompts)
  return corpus_prompts(split, prompt_length, num_prompts, seed)


def sample_pairs(sampler: Sampler, params, prompts, batch_size: int, seed: int):
  """Two samples per prompt: (responses_a, responses_b, gold_a, gold_b)."""
  prompt_length = max(len(p) for p in prompts)
  out = {"a": [], "b": []}, {"a": [], "b": []}
  rng = jax.random.key(seed)
  score = jax.jit(gold_reward)
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    for side, stream in (("a", 0), ("b", 1)):
      key = jax.random.fold_in(jax.random.fold_in(rng, stream), start)
      sample = jax.device_get(sampler(params, padded, key, prompt_length=prompt_length))
      gold = np.asarray(score(jnp.asarray(sample.tokens), jnp.asarray(sample.generated_mask)))
      for i in range(len(chunk)):
        mask = np.asarray(sample.generated_mask[i]).astype(bool)
        out[0][side].append(np.asarray(sample.tokens[i])[mask].tolist())
        out[1][side].append(float(gold[i]))
  return out[0]["a"], out[0]["b"], out[1]["a"], out[1]["b"]


def main(argv) -> int:
  args = parse_args(argv)
  if args.num_prompts < 1:
    raise cli.ConfigError(f"--num_prompts must be >= 1, got {args.num_prompts}.")
  try:
    location = params_checkpoint.locate(args.checkpoint)
    cfg = params_checkpoint.model_config_of(location)
    prompts = load_prompts(args.split, args.prompt_length, args.num_prompts, args.seed)
    ici = {k: int(v) for k, v in (kv.split("=") for kv in args.ici.split(",") if kv)}
    mesh = partitioning.create_mesh(ici)
    sampler = Sampler(cfg, SamplingConfig(max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature), mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params_checkpoint.abstract_params(cfg), sampler.param_shardings)
    params = params_checkpoint.restore_params(args.checkpoint, abstract, cfg)
    a, b, gold_a, gold_b = sample_pairs(sampler, params, prompts, args.batch_size, args.seed)
    records, ties = preferences.label_pairs(prompts, a, b, gold_a, gold_b,
                                            label_noise=args.label_noise, seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    raise cli.ConfigError(str(e)) from e
  preferences.write_preferences(args.output, records)
  flipped = sum(r["flipped"] for r in records)
  gold = np.array([gold_a, gold_b])
  print(f"wrote {len(records)} pairs to {args.output} ({ties} ties dropped, {flipped} "
        f"labels flipped = {args.label_noise:g} of pairs) | gold reward of the samples: "
        f"mean {gold.mean():.4f}, std {gold.std():.4f}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
