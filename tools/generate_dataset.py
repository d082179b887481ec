"""Samples G generations for each of P prompts from a checkpoint into a TFDS dataset.

  python tools/generate_dataset.py --checkpoint DIR --output_dir OUT --name NAME \
      --num_prompts P --generations_per_prompt G [--prompt_task pydoc_prompts \
      --split train --prompt_length 32 --max_new_tokens 64 --temperature 1.0 \
      --batch_size 64 --seed 0 --overwrite]

The offline-distillation data of Tiapkin et al. 2025 (arXiv 2502.02671): fixed
teacher generations, reused every epoch. DIR is a model directory (params_checkpoint.save,
tools/convert_hf.py) or a training run directory (its newest checkpoint, or
--step). Prompts are the first P of the prompt task's split (load_prompts, cut
to --prompt_length tokens); each is repeated G times and sampled with the
KV-cache Sampler on a mesh over all local devices; a response is the generated
tokens up to and including EOS (no EOS if --max_new_tokens ran out). Records
{prompt, response, prompt_index, sample_index} are written as the TFDS dataset
posttrain_generated/NAME under OUT (posttrain_jax/data/generated.py), and the
gin lines that register a training task over it are printed. Same checkpoint,
arguments and seed => the same dataset on the same device set.
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
from posttrain_jax.data import generated
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import params_checkpoint


def parse_args(argv):
  p = argparse.ArgumentParser(prog="generate_dataset.py", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="model dir or training run dir")
  p.add_argument("--step", type=int, default=None, help="run dir step (default: newest)")
  p.add_argument("--model_gin", default=None, help="ModelConfig gin file, if not in DIR")
  p.add_argument("--output_dir", required=True, help="TFDS data_dir to write into")
  p.add_argument("--name", required=True, help="dataset name (letters, digits, _)")
  p.add_argument("--num_prompts", type=int, required=True)
  p.add_argument("--generations_per_prompt", type=int, required=True)
  p.add_argument("--prompt_task", default="pydoc_prompts")
  p.add_argument("--split", default="train")
  p.add_argument("--prompt_length", type=int, default=32)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--greedy", action="store_true")
  p.add_argument("--eos_id", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=64,
                 help="sequences per sampler call (a multiple of the mesh's batch degree)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ici", default="data=-1", help="mesh degrees, e.g. data=2,tensor=4")
  p.add_argument("--with_text", action="store_true",
                 help="also store prompt_text/response_text (prompt task's vocabulary)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  return p.parse_args(argv)


def gin_lines(args) -> str:
  """Gin that trains on the dataset (a prefix-LM task over it)."""
  out = os.path.abspath(args.output_dir)
  return "\n".join([
      f"# Train on posttrain_generated/{args.name} (prompt -> response):",
      "train_data/DatasetConfig.task_name = @teacher_data/generated_task()",
      f"teacher_data/generated_task.task_name = \"{args.name}\"",
      f"teacher_data/generated_task.name = \"{args.name}\"",
      f"teacher_data/generated_task.data_dir = \"{out}\"",
      f"train_data/DatasetConfig.inputs_length = {args.prompt_length}",
      f"train_data/DatasetConfig.sequence_length = {args.prompt_length + args.max_new_tokens}",
  ])


def check_args(args) -> None:
  if args.num_prompts < 1:
    raise cli.ConfigError(f"--num_prompts must be >= 1, got {args.num_prompts}.")
  if args.generations_per_prompt < 1:
    raise cli.ConfigError(
        f"--generations_per_prompt must be >= 1, got {args.generations_per_prompt}.")
  if args.prompt_length < 1 or args.batch_size < 1:
    raise cli.ConfigError("--prompt_length and --batch_size must be >= 1.")
  if generated.exists(data_dir=args.output_dir, name=args.name) and not args.overwrite:
    raise cli.ConfigError(
        f"Dataset {args.name!r} already exists at "
        f"{generated.dataset_dir(args.output_dir, args.name)}; pass --overwrite to replace "
        "it or choose another --name.")


def sample_records(sampler, params, prompts, args, vocab=None) -> list[dict]:
  """G samples of each prompt, in (prompt_index, sample_index) order."""
  g = args.generations_per_prompt
  rows = [(i, j) for i in range(len(prompts)) for j in range(g)]
  rng = jax.random.key(args.seed)
  records, tokens_done, start_time = [], 0, time.time()
  for start in range(0, len(rows), args.batch_size):
    chunk = rows[start:start + args.batch_size]
    batch = [prompts[i] for i, _ in chunk]
    batch += [batch[0]] * (args.batch_size - len(batch))  # one compiled shape
    out = jax.device_get(sampler(params, batch, jax.random.fold_in(rng, start),
                                 prompt_length=args.prompt_length))
    for r, (i, j) in enumerate(chunk):
      response = np.asarray(out.tokens[r])[np.asarray(out.generated_mask[r])].tolist()
      record = dict(prompt=prompts[i], response=response, prompt_index=i, sample_index=j)
      if vocab is not None:
        record["prompt_text"] = vocab.decode(prompts[i])
        record["response_text"] = vocab.decode([t for t in response if t != args.eos_id])
      records.append(record)
      tokens_done += len(response)
    done = (start + len(chunk)) // g
    rate = tokens_done / max(time.time() - start_time, 1e-9)
    print(f"prompts {done}/{len(prompts)}  generations {start + len(chunk)}/{len(rows)}  "
          f"{rate:.0f} tokens/s", flush=True)
  return records


def main(argv) -> int:
  args = parse_args(argv)
  check_args(args)
  try:
    location = params_checkpoint.locate(args.checkpoint, args.step)
    cfg = params_checkpoint.model_config_of(location, args.model_gin)
  except (FileNotFoundError, ValueError) as e:
    raise cli.ConfigError(str(e)) from e
  import seqio
  import tensorflow_datasets as tfds
  from posttrain_jax.data import prompts as prompts_lib  # registers "pydoc_prompts"
  tfds.disable_progress_bar()
  try:
    prompts = prompts_lib.load_prompts(task_name=args.prompt_task, split=args.split,
                                       prompt_length=args.prompt_length,
                                       num_prompts=args.num_prompts)
    vocab = (seqio.get_mixture_or_task(args.prompt_task).output_features["inputs"].vocabulary
             if args.with_text else None)
    config = SamplingConfig(max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, greedy=args.greedy, eos_id=args.eos_id)
    ici = {k: int(v) for k, v in (kv.split("=") for kv in args.ici.split(",") if kv)}
    mesh = partitioning.create_mesh(ici)
    axes = partitioning.batch_sharding(mesh).spec[0]
    degree = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))
                          if a]))
    if args.batch_size % degree:
      raise cli.ConfigError(f"--batch_size {args.batch_size} must be a multiple of the mesh's "
                            f"batch degree {degree} (--ici {args.ici}).")
    sampler = Sampler(cfg, config, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params_checkpoint.abstract_params(cfg), sampler.param_shardings)
    params = params_checkpoint.restore_params(args.checkpoint, abstract, cfg, step=args.step)
    print(f"sampling {args.generations_per_prompt} x {len(prompts)} prompts of "
          f"{args.prompt_task}/{args.split} on {mesh.devices.size} device(s)", flush=True)
    records = sample_records(sampler, params, prompts, args, vocab)
  except ValueError as e:
    raise cli.ConfigError(str(e)) from e
  description = json.dumps({k: v for k, v in vars(args).items() if k != "overwrite"})
  path = generated.write_generated_dataset(records, data_dir=args.output_dir, name=args.name,
                                           description=description,
                                           overwrite=args.overwrite)
  print(f"wrote {len(records)} examples to {path}")
  print(gin_lines(args))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
