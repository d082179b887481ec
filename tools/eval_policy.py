"""Gold reward and KL to the SFT model of a policy's samples on held-out prompts.

  python tools/eval_policy.py --checkpoint POLICY_DIR --sft SFT_DIR \
      [--num_prompts 64] [--samples_per_prompt 4] [--prompt_length 24] \
      [--max_new_tokens 32] [--temperature 1.0] [--seed 0] [--out RESULT.json]

POLICY_DIR and SFT_DIR are model or run directories (newest checkpoint), so
every trainer's output is evaluated the same way (REINFORCE, RLOO, GRPO, DPO:
docs/rlhf.md, "Algorithms compared"). Prompts: the first --num_prompts of the
pydoc_prompts validation split, each sampled --samples_per_prompt times at
--temperature (rng from --seed). Prints one JSON line (and writes it to --out):
gold_reward (mean and its standard error over samples), kl_sft_token_sum (the
per-token exact KL(pi || pi_sft) summed along the sampled responses; at
temperature 1 an unbiased estimate of the sequence KL), kl_sft (Monte Carlo),
entropy, response_length.
"""

from __future__ import annotations

import argparse
import functools
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
from posttrain_jax.data.prompts import load_prompts
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import Transformer, params_checkpoint
from posttrain_jax.rl.gold_reward import gold_reward
from posttrain_jax.rl.policy_training import eval_metrics, sample_batch


def parse_args(argv):
  p = argparse.ArgumentParser(prog="eval_policy.py", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="policy model dir or run dir")
  p.add_argument("--sft", required=True, help="the SFT model (KL reference)")
  p.add_argument("--num_prompts", type=int, default=64)
  p.add_argument("--samples_per_prompt", type=int, default=4)
  p.add_argument("--prompt_length", type=int, default=24)
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def evaluate(args) -> dict[str, float]:
  try:
    location = params_checkpoint.locate(args.checkpoint)
    cfg = params_checkpoint.model_config_of(location)
  except (FileNotFoundError, ValueError) as e:
    raise cli.ConfigError(str(e)) from e
  if args.num_prompts < 1 or args.samples_per_prompt < 1:
    raise cli.ConfigError("--num_prompts and --samples_per_prompt must be >= 1.")
  mesh = partitioning.create_mesh({"data": -1})
  sampler = Sampler(cfg, SamplingConfig(max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, eos_id=1), mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params_checkpoint.abstract_params(cfg), sampler.param_shardings)
  params = params_checkpoint.restore_params(args.checkpoint, abstract, cfg)
  sft = params_checkpoint.restore_params(args.sft, abstract, cfg)
  prompts = load_prompts(task_name="pydoc_prompts", split="validation",
                         prompt_length=args.prompt_length, num_prompts=args.num_prompts)
  rows = [p for p in prompts for _ in range(args.samples_per_prompt)]
  sample = sampler(params, rows, jax.random.key(args.seed))
  gold = np.asarray(jax.device_get(gold_reward(sample.tokens, sample.generated_mask)))
  metrics = jax.jit(functools.partial(eval_metrics, Transformer(cfg)))(
      params, sft, sample_batch(sample, gold))
  out = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "reward"}
  out.update(gold_reward=float(gold.mean()),
             gold_reward_stderr=float(gold.std(ddof=1) / np.sqrt(len(gold))),
             num_samples=len(gold), checkpoint=os.path.abspath(args.checkpoint))
  return out


def main(argv) -> int:
  args = parse_args(argv)
  result = evaluate(args)
  line = json.dumps(result, sort_keys=True)
  print(line)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
