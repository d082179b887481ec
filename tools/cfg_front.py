"""The quality-diversity front of diversity-rewarded CFG distillation.

  python tools/cfg_front.py --base runs/lm_quickstart \
      --quality runs/cfg_distillation/quality --diversity runs/cfg_distillation/diversity \
      [--extra NAME=DIR ...] [--gammas 1,2,3,5] [--lambdas 0,0.25,0.5,0.75,1] \
      [--teacher_gamma 3] [--num_prompts 64] [--samples_per_prompt 2] \
      [--out runs/cfg_distillation/front.json] [--plot docs/experiments/cfg_distillation.png]

Cideron et al. 2024 (arXiv 2410.06084). Points, each scored on the same held-out
prompts (first --num_prompts of the pydoc_prompts validation split, each sampled
--samples_per_prompt times at temperature 1, rng from --seed):

  cfg gamma=g      the base model theta_0 sampled with CFG (2 forward rows per token)
  lerp lambda=l    theta_l = (1 - l) theta_quality + l theta_diversity
                   (`merging.interpolation.average`; 1 forward row per token);
                   l = 0 and 1 are the beta = 0 and beta > 0 students
  NAME             --extra students (e.g. other beta)

Metrics: quality = "teacher_logp" (mean per-token log-prob of the samples under
the distillation target, theta_0 with CFG at --teacher_gamma) and "gold_reward"
(rl/gold_reward.py); diversity = "diversity" (mean pairwise 1 - cos of the
samples of one prompt, E = theta_0's mean-pooled final hidden states, as in
training) and "distinct_2" (distinct token bigrams / bigrams, per prompt's
samples pooled). Cost: "forward_rows_per_token" (2 with CFG, 1 without) and
"ms_per_token" (wall time of the jitted sampler per generated token, after a
warm-up call; same machine, same batch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from posttrain_jax import cli
from posttrain_jax.core import partitioning
from posttrain_jax.data.prompts import load_prompts
from posttrain_jax.distillation import cfg as cfg_lib
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.merging.interpolation import average
from posttrain_jax.models import Transformer, params_checkpoint
from posttrain_jax.rl import diversity as diversity_lib
from posttrain_jax.rl.gold_reward import gold_reward

NULL = (0,)  # the decoder start token (sampling.SamplingConfig.null_prompt)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="cfg_front.py", description=__doc__.split("\n")[0])
  p.add_argument("--base", help="theta_0: model or run dir")
  p.add_argument("--quality", help="the beta = 0 student")
  p.add_argument("--diversity", help="the beta > 0 student")
  p.add_argument("--combine", nargs="+", default=None,
                 help="front JSON files of several seeds: plot their mean +- stderr and "
                      "print a markdown table (no sampling)")
  p.add_argument("--extra", action="append", default=[], help="NAME=DIR more students")
  p.add_argument("--gammas", default="1,2,3,5")
  p.add_argument("--lambdas", default="0,0.25,0.5,0.75,1")
  p.add_argument("--teacher_gamma", type=float, default=3.0)
  p.add_argument("--num_prompts", type=int, default=64)
  p.add_argument("--samples_per_prompt", type=int, default=2)
  p.add_argument("--prompt_length", type=int, default=24)
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  p.add_argument("--plot", default=None)
  return p.parse_args(argv)


def distinct_n(tokens: np.ndarray, mask: np.ndarray, group: int, n: int = 2) -> float:
  """Mean over prompts of distinct n-grams / n-grams of its samples' responses."""
  ratios = []
  for start in range(0, tokens.shape[0], group):
    grams = []
    for row in range(start, start + group):
      resp = tokens[row][mask[row]].tolist()
      grams += [tuple(resp[i:i + n]) for i in range(len(resp) - n + 1)]
    if grams:
      ratios.append(len(set(grams)) / len(grams))
  return float(np.mean(ratios)) if ratios else 0.0


def score_fn(model, gamma: float, group: int):
  """jit: (theta_0 params, cfg_batch) -> teacher_logp sum, token count, diversity."""
  def fn(params, batch):
    cond, uncond, hidden = cfg_lib.teacher_forward(model, params, batch, return_hidden=True)
    lp = jax.nn.log_softmax(cfg_lib.guided_logits(cond, uncond, gamma), axis=-1)
    w = batch["decoder_loss_weights"]
    tok = jax.numpy.take_along_axis(lp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    emb = diversity_lib.mean_pooled_embedding(hidden[:w.shape[0]], w)
    d = diversity_lib.pairwise_diversity(emb, group)
    off = group * (group - 1)
    return {"logp_sum": jax.numpy.sum(tok * w), "tokens": jax.numpy.sum(w),
            "diversity": jax.numpy.sum(d, (-1, -2)) / off}   # per prompt
  return jax.jit(fn)


def measure(sampler, params, rows, key, score, base, group) -> dict[str, float]:
  sample = sampler(params, rows, key)
  jax.block_until_ready(sample.tokens)
  t0 = time.perf_counter()
  sample = sampler(params, rows, key)
  jax.block_until_ready(sample.tokens)
  seconds = time.perf_counter() - t0
  s = jax.device_get(score(base, cfg_lib.cfg_batch(sample, NULL)))
  tokens = np.asarray(sample.tokens)
  mask = np.asarray(sample.generated_mask)
  gold = np.asarray(gold_reward(sample.tokens, sample.generated_mask))
  steps = int(np.max(np.asarray(sample.num_generated)))
  return {"teacher_logp": float(s["logp_sum"] / max(float(s["tokens"]), 1.0)),
          "gold_reward": float(gold.mean()),
          "gold_reward_stderr": float(gold.std(ddof=1) / np.sqrt(len(gold))),
          "diversity": float(np.mean(s["diversity"])),
          "diversity_stderr": float(np.std(s["diversity"], ddof=1) / np.sqrt(s["diversity"].size)),
          "distinct_2": distinct_n(tokens, mask, group),
          "response_length": float(mask.sum(1).mean()),
          "ms_per_token": 1e3 * seconds / max(steps, 1)}


def front(args) -> list[dict]:
  try:
    cfg = params_checkpoint.model_config_of(params_checkpoint.locate(args.base))
  except (FileNotFoundError, ValueError) as e:
    raise cli.ConfigError(str(e)) from e
  mesh = partitioning.create_mesh({"data": -1})
  make = lambda g: Sampler(cfg, SamplingConfig(max_new_tokens=args.max_new_tokens,
                                               eos_id=1, guidance=g, null_prompt=NULL), mesh)
  plain = make(None)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params_checkpoint.abstract_params(cfg), plain.param_shardings)
  load = lambda directory: params_checkpoint.restore_params(directory, abstract, cfg)
  base, q, d = load(args.base), load(args.quality), load(args.diversity)
  prompts = load_prompts(task_name="pydoc_prompts", split="validation",
                         prompt_length=args.prompt_length, num_prompts=args.num_prompts)
  g = args.samples_per_prompt
  rows = [p for p in prompts for _ in range(g)]
  key = jax.random.key(args.seed)
  score = score_fn(Transformer(cfg), args.teacher_gamma, g)
  points = []
  for gamma in [float(x) for x in args.gammas.split(",")]:
    m = measure(make(gamma), base, rows, key, score, base, g)
    points.append(dict(m, kind="cfg", gamma=gamma, forward_rows_per_token=2))
    print(json.dumps(points[-1]), flush=True)
  for lam in [float(x) for x in args.lambdas.split(",")]:
    params = jax.device_put(average([jax.device_get(q), jax.device_get(d)],
                                    [1.0 - lam, lam]), plain.param_shardings)
    m = measure(plain, params, rows, key, score, base, g)
    points.append(dict(m, kind="lerp", **{"lambda": lam}, forward_rows_per_token=1))
    print(json.dumps(points[-1]), flush=True)
  for spec in args.extra:
    name, _, directory = spec.rpartition("=")
    m = measure(plain, load(directory), rows, key, score, base, g)
    points.append(dict(m, kind="student", name=name, forward_rows_per_token=1))
    print(json.dumps(points[-1]), flush=True)
  return points


def plot(points: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, quality in zip(axes, ("teacher_logp", "gold_reward")):
    for kind, style, label, key in (("cfg", "o-", "CFG sampling of theta_0 (gamma)", "gamma"),
                                    ("lerp", "s-", "LERP quality->diversity (lambda)",
                                     "lambda")):
      pts = [p for p in points if p["kind"] == kind]
      ax.errorbar([p["diversity"] for p in pts], [p[quality] for p in pts],
                  xerr=[p.get("diversity_seed_stderr", 0.0) for p in pts],
                  yerr=[p.get(quality + "_seed_stderr", 0.0) for p in pts],
                  fmt=style, capsize=2, label=label)
      for p in pts:
        ax.annotate(f"{p[key]:g}", (p["diversity"], p[quality]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ends = {p["lambda"]: p for p in points if p["kind"] == "lerp" and p["lambda"] in (0, 1)}
    students = [p for p in points if p["kind"] == "student"]
    if students and 0 in ends and 1 in ends:  # the beta sweep: beta = 0, middle, max
      sweep = [ends[0]] + students + [ends[1]]
      ax.plot([p["diversity"] for p in sweep], [p[quality] for p in sweep], "^--",
              label="beta sweep (0, " + ", ".join(p["name"] for p in students) + ", max)")
    ax.set_xlabel("diversity: mean pairwise 1 - cos (theta_0 embeddings)")
    ax.set_ylabel({"teacher_logp": "quality: log p under CFG teacher (per token)",
                   "gold_reward": "quality: gold reward"}[quality])
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle("Diversity-rewarded CFG distillation, tiny LM (CPU)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)


def _label(p: dict) -> str:
  return {"cfg": f"cfg gamma={p.get('gamma', 0):g}",
          "lerp": f"lerp lambda={p.get('lambda', 0):g}"}.get(p["kind"], p.get("name", "?"))


def combine(files: list[str]) -> list[dict]:
  """Mean and standard error over seeds of every point (matched by label)."""
  runs = []
  for f in files:
    with open(f) as fh:
      runs.append(json.load(fh))
  out = []
  for p in runs[0]:
    same = [q for run in runs for q in run if _label(q) == _label(p)]
    merged = dict(p, seeds=len(same))
    for key in ("teacher_logp", "gold_reward", "diversity", "distinct_2", "ms_per_token",
                "response_length"):
      vals = np.array([q[key] for q in same])
      merged[key] = float(vals.mean())
      merged[key + "_seed_stderr"] = (float(vals.std(ddof=1) / np.sqrt(len(vals)))
                                      if len(vals) > 1 else 0.0)
    out.append(merged)
  return out


def table(points: list[dict]) -> str:
  rows = ["| point | fwd rows/token | ms/token | teacher log p | gold reward | "
          "diversity (1-cos) | distinct-2 |", "|---|---|---|---|---|---|---|"]
  se = lambda p, k: p.get(k + "_seed_stderr", p.get(k + "_stderr", 0.0))
  for p in points:
    rows.append(f"| {_label(p)} | {p['forward_rows_per_token']} | {p['ms_per_token']:.1f} | "
                f"{p['teacher_logp']:.3f} ± {se(p, 'teacher_logp'):.3f} | "
                f"{p['gold_reward']:.3f} ± {se(p, 'gold_reward'):.3f} | "
                f"{p['diversity']:.4f} ± {se(p, 'diversity'):.4f} | "
                f"{p['distinct_2']:.3f} |")
  return "\n".join(rows)


def main(argv) -> int:
  args = parse_args(argv)
  if args.combine:
    points = combine(args.combine)
    print(table(points))
    if args.out:
      with open(args.out, "w") as f:
        json.dump(points, f, indent=1)
    if args.plot:
      plot(points, args.plot)
    return 0
  if not (args.base and args.quality and args.diversity):
    raise cli.ConfigError("Give --base, --quality and --diversity (or --combine FILES).")
  points = front(args)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(points, f, indent=1)
  if args.plot:
    plot(points, args.plot)
  return 0


if __name__ == "__main__":
  cli.run_main(main)
