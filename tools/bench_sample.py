"""Sampling throughput: our KV-cache sampler vs transformers' `generate`, same weights.

  python tools/bench_sample.py [--model tiny|2b|9b|27b|PATH.gin] [--batch 8]
      [--prompt_len 64] [--new_tokens 64] [--repeats 3] [--dtype float32]
      [--no_hf] [--json]

Both engines get the same random weights (ours exported with
posttrain_jax.interop.hf_gemma2.params_to_hf), the same left-padded prompts and greedy
decoding of exactly --new_tokens tokens (no EOS stop); the table shows new
tokens/s, ms per decode step, the ratio, and the fraction of generated tokens
on which the two engines agree (a same-function check). Imports no TensorFlow
and no gin (runs on the GPU image); transformers/torch only for the peer row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_TOOLS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TOOLS)
for _path in (_REPO, _TOOLS):  # posttrain_jax; profile_ops
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.core import host_allocator, partitioning
from posttrain_jax.inference.sampling import Sampler, SamplingConfig, left_pad
from posttrain_jax.models import Transformer, presets

import profile_ops  # tools/profile_ops.py


def parse_args(argv):
  p = argparse.ArgumentParser(prog="bench_sample.py")
  p.add_argument("--model", default="tiny")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
  p.add_argument("--param_dtype", default=None)
  p.add_argument("--ici", default="data=-1")
  p.add_argument("--no_hf", action="store_true", help="skip the transformers row")
  p.add_argument("--hf_device", default=None, help="torch device (default cuda if any)")
  p.add_argument("--json", action="store_true")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="after timing, trace one more of our calls into DIR and print where "
                      "the time goes per decode step (tools/profile_ops.py; on CPU set "
                      "XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true)")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance gamma (2 forward rows per token; no HF row)")
  return p.parse_args(argv)


def random_params(cfg, seed=0):
  model = Transformer(cfg)
  init = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, 1), jnp.int32))["params"]))
  params = init(jax.random.key(seed))
  # norms get random scales too, so every weight matters
  return jax.tree.map(lambda p: p if p.ndim > 1 else 0.1 * jax.random.normal(
      jax.random.key(1), p.shape, p.dtype), params)


def prompts_for(cfg, batch, prompt_len, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, batch)
  lengths[0] = prompt_len
  return [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]


def time_ours(cfg, params, prompts, new_tokens, repeats, ici, guidance=None, profile=None):
  mesh = partitioning.create_mesh(ici)
  sampler = Sampler(cfg, SamplingConfig(max_new_tokens=new_tokens, greedy=True,
                                        eos_id=None, guidance=guidance), mesh)
  params = jax.device_put(params, sampler.param_shardings)
  t0 = time.perf_counter()
  out = jax.block_until_ready(sampler(params, prompts, jax.random.key(0)))
  compile_s = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, prompts, jax.random.key(r)))
    times.append(time.perf_counter() - t0)
  tokens = np.asarray(out.tokens[:, -new_tokens:])
  if profile:
    with profile_ops.traced(profile):
      jax.block_until_ready(sampler(params, prompts, jax.random.key(0)))
    with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sampler.rules):
      hlo = sampler._generate.lower(  # pylint: disable=protected-access
          params, *left_pad(prompts, cfg.vocab_size), jax.random.key(0)).compile().as_text()
    print(f"Profile of one call ({profile}), per decode step (prefill included):\n"
          f"{profile_ops.table(profile_ops.summarize(profile, hlo), per=new_tokens)}\n",
          flush=True)
  return min(times), compile_s, tokens


def time_hf(cfg, params, prompts, new_tokens, repeats, device, dtype):
  import torch
  import transformers
  from posttrain_jax.interop import hf_gemma2
  hf_config = hf_gemma2.hf_config_from_model(cfg)
  hf_config.pop("dtype", None)
  config = transformers.Gemma2Config(**{**hf_config, "attn_implementation": "eager",
                                        "pad_token_id": 0, "eos_token_id": None,
                                        "bos_token_id": None})
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  model = transformers.Gemma2ForCausalLM(config).to(torch_dtype)
  state = {k: torch.from_numpy(np.array(v, np.float32)).to(torch_dtype)
           for k, v in hf_gemma2.params_to_hf(jax.device_get(params), cfg).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
  if missing or unexpected:
    raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  model.to(device).eval()
  length = max(len(p) for p in prompts)
  ids = torch.zeros((len(prompts), length), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, length - len(p):] = torch.tensor(p)
    mask[i, length - len(p):] = 1
  ids, mask = ids.to(device), mask.to(device)
  kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0)

  def run():
    with torch.inference_mode():
      out = model.generate(ids, **kwargs)
    if device.startswith("cuda"):
      torch.cuda.synchronize()
    return out
  run()  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
  return min(times), out[:, -new_tokens:].cpu().numpy()


def main(argv=None) -> int:
  host_allocator.configure()  # before the first JAX computation
  args = parse_args(sys.argv[1:] if argv is None else argv)
  overrides = {k: v for k, v in (("dtype", args.dtype), ("param_dtype", args.param_dtype))
               if v}
  try:
    cfg = presets.load_preset(args.model, **overrides)
  except ValueError as e:
    print(f"bench_sample.py: error: {e}", file=sys.stderr)
    return 2
  ici = {k: int(v) for k, v in (kv.split("=") for kv in args.ici.split(",") if kv)}
  params = random_params(cfg)
  prompts = prompts_for(cfg, args.batch, args.prompt_len)
  new = args.batch * args.new_tokens
  ours_s, compile_s, ours_tokens = time_ours(cfg, params, prompts, args.new_tokens,
                                             args.repeats, ici, args.guidance, args.profile)
  rows = [{"engine": "posttrain_jax", "backend": jax.default_backend(),
           "device": jax.devices()[0].device_kind, "model": args.model,
           "batch": args.batch, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "seconds": ours_s,
           "new_tokens_per_s": new / ours_s, "ms_per_step": 1e3 * ours_s / args.new_tokens,
           "compile_s": compile_s}]
  if args.guidance is not None:
    rows[0].update(guidance=args.guidance, forward_rows_per_token=2)
  if not args.no_hf and args.guidance is None:
    import torch
    device = args.hf_device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_s, hf_tokens = time_hf(cfg, params, prompts, args.new_tokens, args.repeats,
                              device, cfg.dtype)
    rows.append({"engine": f"transformers {__import__('transformers').__version__}",
                 "backend": "torch", "device": device, "model": args.model,
                 "batch": args.batch, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "seconds": hf_s,
                 "new_tokens_per_s": new / hf_s, "ms_per_step": 1e3 * hf_s / args.new_tokens,
                 "compile_s": 0.0})
    rows[0]["speedup_vs_transformers"] = hf_s / ours_s
    rows[0]["agreement"] = float(np.mean(ours_tokens == hf_tokens))
  if args.json:
    for row in rows:
      print(json.dumps(row))
    return 0
  header = ["engine", "device", "model", "batch x prompt + new", "new tok/s", "ms/step",
            "compile s", "ratio", "greedy agreement"]
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for row in rows:
    ratio = row.get("speedup_vs_transformers")
    agree = row.get("agreement")
    print("| " + " | ".join([
        row["engine"], f"{row['backend']}:{row['device']}", row["model"],
        f"{row['batch']} x {row['prompt_len']} + {row['new_tokens']}",
        f"{row['new_tokens_per_s']:,.0f}", f"{row['ms_per_step']:.2f}",
        f"{row['compile_s']:.1f}", f"{ratio:.1f}x" if ratio else "1.0x" if len(rows) > 1 else "",
        f"{agree:.1%}" if agree is not None else ""]) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
