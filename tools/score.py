"""Scores preference pairs or samples with a reward model.

  python tools/score.py --reward_model DIR --input FILE.jsonl [--gold] \
      [--output SCORES.jsonl] [--batch_size 32] [--sequence_length L]

FILE lines are either pairs {"prompt", "chosen", "rejected"} (token ids, as
written by tools/label_preferences.py) or samples {"prompt_tokens", "tokens"}
(tools/sample.py) / {"prompt", "response"}. For pairs it prints the pairwise
accuracy against the file's labels and the mean margin r(chosen) -
r(rejected); with --gold also the accuracy against the gold reward's
preference (posttrain_jax/rl/gold_reward.py, recomputed from the tokens) and, when
the file marks flipped labels, the accuracy on clean and on flipped pairs. For
samples it prints the mean score (and the mean gold reward with --gold).
--output writes each line back with its scores. Rows longer than L keep their
last L tokens (default L: the longest row). Imports no TensorFlow.
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
from posttrain_jax.data.preferences import pairs_to_batch
from posttrain_jax.rl.gold_reward import gold_reward
from posttrain_jax.rl.reward_model import is_reward_model, load_reward_fn


def parse_args(argv):
  p = argparse.ArgumentParser(prog="score.py", description=__doc__.split("\n")[0])
  p.add_argument("--reward_model", required=True, help="reward model directory")
  p.add_argument("--input", required=True)
  p.add_argument("--output", default=None)
  p.add_argument("--gold", action="store_true", help="also compute the gold reward")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--sequence_length", type=int, default=None)
  return p.parse_args(argv)


def read_records(path: str) -> tuple[str, list[dict]]:
  """('pairs' | 'samples', records) with "prompt" and "chosen"/"rejected" or "response"."""
  if not os.path.isfile(path):
    raise cli.ConfigError(f"--input {path}: file not found.")
  records, kinds = [], set()
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError as e:
        raise cli.ConfigError(f"{path}:{n}: not a JSON line ({e.msg}).") from e
      if {"chosen", "rejected"} <= set(r):
        kinds.add("pairs")
        r.setdefault("prompt", [])
      elif "tokens" in r or "response" in r:
        kinds.add("samples")
        r = dict(r, prompt=r.get("prompt_tokens", r.get("prompt", [])),
                 response=r.get("tokens", r.get("response")))
      else:
        raise cli.ConfigError(f"{path}:{n}: expected a pair (\"chosen\", \"rejected\") or "
                              "a sample (\"tokens\" or \"response\") of token ids.")
      records.append(r)
  if not records:
    raise cli.ConfigError(f"{path}: no records.")
  if len(kinds) > 1:
    raise cli.ConfigError(f"{path} mixes pairs and samples; score them separately.")
  return kinds.pop(), records


def score_rows(fn, records, sides, length: int, batch_size: int):
  """{side: (scores [n], gold [n])} for rows prompt + record[side]."""
  out = {s: ([], []) for s in sides}
  gold = jax.jit(gold_reward)
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    for side in sides:
      rows = [{"prompt": r["prompt"], "chosen": r[side], "rejected": r[side]} for r in chunk]
      rows += [rows[0]] * (batch_size - len(rows))  # one compiled shape
      b = pairs_to_batch(rows, length)
      tokens = jnp.asarray(b["chosen_tokens"])
      scores = fn(tokens, jnp.asarray(b["chosen_positions"]),
                  jnp.asarray(b["chosen_segment_ids"]))
      g = gold(tokens, jnp.asarray(b["chosen_response_mask"]))
      out[side][0].extend(np.asarray(scores)[:len(chunk)].tolist())
      out[side][1].extend(np.asarray(g)[:len(chunk)].tolist())
  return {s: (np.array(v[0]), np.array(v[1])) for s, v in out.items()}


def main(argv) -> int:
  args = parse_args(argv)
  if not is_reward_model(args.reward_model):
    exported = os.path.join(args.reward_model, "reward_model")
    hint = (f" It is a reward-model training run: pass --reward_model {exported}"
            if is_reward_model(exported) else "")
    raise cli.ConfigError(f"--reward_model {args.reward_model} is not a reward model "
                          f"directory (no reward_model.json).{hint}")
  kind, records = read_records(args.input)
  sides = ("chosen", "rejected") if kind == "pairs" else ("response",)
  length = args.sequence_length or max(len(r["prompt"]) + len(r[s])
                                       for r in records for s in sides)
  try:
    fn = load_reward_fn(args.reward_model)
    for r in records:
      for s in sides:
        bad = [t for t in list(r["prompt"]) + list(r[s]) if not 0 <= t < fn.config.vocab_size]
        if bad:
          raise ValueError(f"token id {bad[0]} is outside the reward model's vocabulary "
                           f"[0, {fn.config.vocab_size}).")
    batch = -(-args.batch_size // jax.device_count()) * jax.device_count()
    scored = score_rows(fn, records, sides, length, batch)
  except (ValueError, FileNotFoundError) as e:
    raise cli.ConfigError(str(e)) from e
  if kind == "pairs":
    (rc, gc), (rr, gr) = scored["chosen"], scored["rejected"]
    margin = rc - rr
    print(f"{len(records)} pairs | pairwise accuracy {np.mean(margin > 0):.4f} | "
          f"mean margin {np.mean(margin):.4f}")
    if args.gold:
      decided = gc != gr
      agree = (margin > 0) == (gc > gr)
      print(f"gold: accuracy vs gold preference {np.mean(agree[decided]):.4f} "
            f"({int(decided.sum())} pairs with a gold preference) | mean gold reward "
            f"chosen {np.mean(gc):.4f}, rejected {np.mean(gr):.4f}")
      if any("flipped" in r for r in records):
        flipped = np.array([bool(r.get("flipped", False)) for r in records])
        for name, sel in (("clean", ~flipped), ("flipped", flipped)):
          if sel.any():
            print(f"  {name} labels: {int(sel.sum())} pairs, accuracy vs labels "
                  f"{np.mean(margin[sel] > 0):.4f}")
  else:
    scores, gold = scored["response"]
    line = f"{len(records)} samples | mean score {np.mean(scores):.4f}"
    if args.gold:
      line += f" | mean gold reward {np.mean(gold):.4f}"
    print(line)
  if args.output:
    with open(args.output, "w") as f:
      for i, r in enumerate(records):
        row = dict(r)
        for s in sides:
          row[f"score_{s}" if kind == "pairs" else "score"] = float(scored[s][0][i])
          if args.gold:
            row[f"gold_{s}" if kind == "pairs" else "gold"] = float(scored[s][1][i])
        f.write(json.dumps(row) + "\n")
  return 0


if __name__ == "__main__":
  cli.run_main(main)
