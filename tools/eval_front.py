"""Reward-KL fronts: gold reward, proxy reward and KL to SFT along interpolations.

  python tools/eval_front.py --sft SFT_DIR --reward PROXY --out FRONT.json \
      [--plot FRONT.png] [--num_prompts 64] [--samples_per_prompt 2] ... MODE ...

Modes (every model dir may be a model or a run directory, newest checkpoint):
  models DIR [DIR ...]                  each model as it is (labels: --labels)
  liti --merge DIR [--grid 0,0.25,...]  WARP's deliverable front (arXiv 2406.16768):
                                        (1 - eta) theta_sft + eta theta_merge, eta in grid
  slerp --init DIR --a DIR --b DIR [--grid ...] [--lerp]
                                        slerp(theta_init, theta_a, theta_b, lambda)
                                        per tensor (or LERP: (1 - lambda) theta_a +
                                        lambda theta_b), lambda in grid (rewarded
                                        soups of two single-reward runs: w = (1 - lambda, lambda))
  clp RUN [--grid ...]                  a train_clp run (CLP, arXiv 2407.15762) steered
                                        by w = (1 - lambda, lambda), lambda in grid

Every point is sampled on the same held-out prompts (the first --num_prompts of
pydoc_prompts' validation split, each --samples_per_prompt times at
--temperature, one rng from --seed) and scored with the project's gold reward
(rl/gold_reward.py), the proxy --reward (a registered reward name or a reward
model directory) and KL(pi || pi_sft) (kl_sft_token_sum: the exact per-token
KL summed along the sampled responses; at temperature 1 an estimate of the
sequence KL). --rewards r0,r1,... adds reward_i (each a registered reward
name or reward model directory) to every point. Writes a JSON list of points {label, coefficient, gold_reward,
gold_reward_stderr, proxy_reward, kl_sft_token_sum, kl_sft, entropy,
response_length} and, with --plot, proxy and gold reward against KL.
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
from posttrain_jax.merging import model_dirs
from posttrain_jax.merging.interpolation import average, liti, slerp
from posttrain_jax.models import Transformer, params_checkpoint
from posttrain_jax.rl.clp import ConditionedPolicy, round_to_simplex
from posttrain_jax.rl.clp_training import (CLPSampler, clp_shardings, conditioned_prompts,
                                          read_clp_json, sentencepiece_encoder)
from posttrain_jax.rl.clp_training import eval_metrics as clp_eval_metrics
from posttrain_jax.rl.clp_training import sample_batch as clp_sample_batch
from posttrain_jax.rl.gold_reward import gold_reward
from posttrain_jax.rl.policy_training import eval_metrics, resolve_reward, sample_batch
from posttrain_jax.rl.warp import check_sequence

DEFAULT_GRID = "0,0.1,0.2,0.3,0.5,0.7,0.9,1"


def parse_args(argv):
  p = argparse.ArgumentParser(prog="eval_front.py", description=__doc__.split("\n")[0])
  p.add_argument("--sft", required=True, help="the SFT model: KL reference, LITI's start")
  p.add_argument("--reward", required=True, help="proxy reward: name or reward model dir")
  p.add_argument("--rewards", default=None,
                 help="comma-separated rewards reported as reward_0, reward_1, ...")
  p.add_argument("--out", required=True, help="JSON output")
  p.add_argument("--plot", default=None, help="PNG output (optional)")
  p.add_argument("--num_prompts", type=int, default=64)
  p.add_argument("--samples_per_prompt", type=int, default=2)
  p.add_argument("--prompt_length", type=int, default=24)
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  sub = p.add_subparsers(dest="mode", required=True)
  m = sub.add_parser("models")
  m.add_argument("dirs", nargs="+")
  m.add_argument("--labels", default=None, help="comma-separated, one per dir")
  li = sub.add_parser("liti")
  li.add_argument("--merge", required=True)
  li.add_argument("--grid", default=DEFAULT_GRID)
  s = sub.add_parser("slerp")
  s.add_argument("--init", required=True)
  s.add_argument("--a", required=True)
  s.add_argument("--b", required=True)
  s.add_argument("--grid", default=DEFAULT_GRID)
  s.add_argument("--lerp", action="store_true", help="linear instead of spherical")
  c = sub.add_parser("clp")
  c.add_argument("run")
  c.add_argument("--grid", default=DEFAULT_GRID)
  return p.parse_args(argv)


def points(args, sft_params, load):
  """(label, coefficient, params) of every point of the front, lazily."""
  if args.mode == "models":
    labels = args.labels.split(",") if args.labels else args.dirs
    if len(labels) != len(args.dirs):
      raise cli.ConfigError(f"--labels has {len(labels)} entries for {len(args.dirs)} dirs.")
    for label, d in zip(labels, args.dirs):
      yield label, None, load(d)
  elif args.mode == "liti":
    merged = load(args.merge)
    for eta in check_sequence(args.grid.split(","), "--grid (eta)", 0.0, 1.0):
      yield f"eta={eta:g}", eta, liti(sft_params, merged, eta)
  else:
    init, a, b = load(args.init), load(args.a), load(args.b)
    for lam in check_sequence(args.grid.split(","), "--grid (lambda)", 0.0, 1.0):
      params = (average([a, b], [1.0 - lam, lam]) if 0.0 < lam < 1.0 else (a if lam == 0 else b)
                ) if args.lerp else slerp(init, a, b, lam)
      yield f"{'lerp' if args.lerp else 'slerp'} lambda={lam:g}", lam, params


def evaluate(args) -> list[dict]:
  if args.num_prompts < 1 or args.samples_per_prompt < 1:
    raise cli.ConfigError("--num_prompts and --samples_per_prompt must be >= 1.")
  try:
    sft_model = model_dirs.load_models([args.sft])[0]
  except (FileNotFoundError, ValueError) as e:
    raise cli.ConfigError(str(e)) from e
  cfg = sft_model.config
  mesh = partitioning.create_mesh({"data": -1})
  sampler = Sampler(cfg, SamplingConfig(max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, eos_id=1), mesh)
  proxy = resolve_reward(args.reward, mesh)

  def load(d):
    try:  # with the SFT model: load_models checks that the architectures match
      return model_dirs.load_models([args.sft, d])[1].params
    except (FileNotFoundError, ValueError) as e:
      raise cli.ConfigError(str(e)) from e

  def to_device(params):
    return jax.tree.map(jax.device_put, params, sampler.param_shardings)

  prompts = load_prompts(task_name="pydoc_prompts", split="validation",
                         prompt_length=args.prompt_length, num_prompts=args.num_prompts)
  rows = [p for p in prompts for _ in range(args.samples_per_prompt)]
  named = [resolve_reward(r, mesh) for r in args.rewards.split(",")] if args.rewards else []
  sft = to_device(sft_model.params)

  def scores(sample) -> dict:
    gold = np.asarray(jax.device_get(gold_reward(sample.tokens, sample.generated_mask)))
    out = {"gold_reward": float(gold.mean()),
           "gold_reward_stderr": float(gold.std(ddof=1) / np.sqrt(len(gold)))}
    for i, fn in enumerate(named):
      r = np.asarray(jax.device_get(fn(sample)), np.float64)
      out.update({f"reward_{i}": float(r.mean()),
                  f"reward_{i}_stderr": float(r.std(ddof=1) / np.sqrt(len(r)))})
    return out

  if args.mode == "clp":
    return evaluate_clp(args, cfg, mesh, sampler, sft, rows, proxy, scores)
  metrics_fn = jax.jit(functools.partial(eval_metrics, Transformer(cfg)))
  out = []
  for label, coefficient, params in points(args, sft_model.params, load):
    params = to_device(params)
    sample = sampler(params, rows, jax.random.key(args.seed))
    batch = sample_batch(sample, np.asarray(jax.device_get(proxy(sample))))
    metrics = {k: float(v) for k, v in jax.device_get(metrics_fn(params, sft, batch)).items()}
    point = {"label": label, "coefficient": coefficient, "proxy_reward": metrics.pop("reward"),
             **scores(sample), **metrics}
    print(json.dumps(point, sort_keys=True), flush=True)
    out.append(point)
  return out


def evaluate_clp(args, cfg, mesh, plain_sampler, sft, rows, proxy, scores) -> list[dict]:
  """The points of a train_clp run steered by w = (1 - lambda, lambda)."""
  try:
    _, clp_cfg, vocab_path = read_clp_json(args.run)
  except FileNotFoundError as e:
    raise cli.ConfigError(str(e)) from e
  if clp_cfg.num_rewards != 2:
    raise cli.ConfigError(f"clp mode steers two rewards; {args.run} has {clp_cfg.num_rewards}.")
  policy = ConditionedPolicy(cfg, clp_cfg)
  plain_abstract = params_checkpoint.abstract_params(cfg)
  abstract, shardings = clp_shardings(policy, plain_abstract, plain_sampler.param_shardings)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  try:
    params = params_checkpoint.restore_params(args.run, abstract, cfg)
  except (FileNotFoundError, ValueError) as e:
    raise cli.ConfigError(str(e)) from e
  sampler = CLPSampler(policy, plain_sampler.config, mesh, shardings)
  encode = sentencepiece_encoder(vocab_path) if clp_cfg.prompt_conditioning else None
  metrics_fn = jax.jit(functools.partial(clp_eval_metrics, policy, Transformer(cfg)))
  out = []
  for lam in check_sequence(args.grid.split(","), "--grid (lambda = w_1)", 0.0, 1.0):
    w = np.repeat(np.asarray([[1.0 - lam, lam]], np.float32), len(rows), 0)
    if clp_cfg.prompt_conditioning:
      w = round_to_simplex(w, clp_cfg.weight_decimals)
    prompts, prefix = conditioned_prompts(rows, w, clp_cfg, encode)
    sample = sampler(params, w, prompts, jax.random.key(args.seed))
    proxy_r = np.asarray(jax.device_get(proxy(sample)), np.float32)
    batch = clp_sample_batch(sample, w, proxy_r[:, None], prefix)
    metrics = {k: float(v) for k, v in jax.device_get(metrics_fn(params, sft, batch)).items()}
    metrics.pop("reward_0")
    point = {"label": f"clp w={1 - lam:g},{lam:g}", "coefficient": lam,
             "proxy_reward": float(proxy_r.mean()), **scores(sample), **metrics}
    print(json.dumps(point, sort_keys=True), flush=True)
    out.append(point)
  return out


def plot(front: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  kl = [p["kl_sft_token_sum"] for p in front]
  for ax, key in zip(axes, ("proxy_reward", "gold_reward")):
    ax.plot(kl, [p[key] for p in front], "o-")
    for p in front:
      ax.annotate(p["label"].split()[-1], (p["kl_sft_token_sum"], p[key]), fontsize=7)
    ax.set_xlabel("KL(pi || pi_sft) (token sum)")
    ax.set_ylabel(key)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv) -> int:
  args = parse_args(argv)
  front = evaluate(args)
  with open(args.out, "w") as f:
    json.dump({"mode": args.mode, "args": vars(args), "points": front}, f, indent=1)
  if args.plot:
    plot(front, args.plot, f"{args.mode}: {args.out}")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
