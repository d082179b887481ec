"""Train-step throughput benchmark on synthetic tokens, optionally against transformers.

  python tools/bench_train.py --model=tiny --batch_size=8 --seq_len=512
  python tools/bench_train.py --gin_file=gin/models/gemma2_2b.gin \
      --gin.ModelConfig.num_layers=2 --batch_size=4 --seq_len=2048 \
      --ici=fsdp=-1 --remat=full --steps=10 --warmup=2 [--json]
  python tools/bench_train.py --model=tiny --peer=hf [--peer_compile] \
      [--step=train|distill|forward] [--loss_chunk_size=N] \
      [--attention_impl=dot_product_attention --no_attn_soft_cap]

Builds a `Trainer` (AdamW, default OptimizerConfig) on a mesh over all
devices, compiles the step ahead of time (lower + compile, timed as
"compile s"), runs `--warmup` steps, then times `--steps` steps on
pre-sharded random-token batches (numpy; no TensorFlow/seqio) and blocks on
the final state and metrics (with `--repeats=R`, R such windows, the fastest
reported: both engines, for noisy machines). `--step` picks what is timed: `train` (the LM
optimizer step), `distill` (DistillationTrainer: a frozen teacher's forward
plus the student's step on the forward KL; the teacher is the same model
unless `--teacher_model`), `forward` (forward + cross-entropy, no gradient).
`--peer=hf` also runs transformers' Gemma2ForCausalLM (torch; same shape,
same weights via hf_gemma2.params_to_hf, same batches, AdamW) in the same
process, eagerly and with `--peer_compile` also under torch.compile, and adds
the column "ours / this" (our tokens/s over that row's). With a CPU peer the
engines' timed windows alternate (`--interleave`, default auto: window r of
each engine before window r + 1 of any), so that the machine's drift over
minutes slows every engine alike; a GPU peer runs before ours, so that
torch's memory is released before JAX allocates. Prints a markdown table
with one row per engine, or with `--json` each row as one JSON line:

  tokens/s        global tokens (batch x seq) per second
  step ms         wall time per optimizer step
  model TFLOP/s   ModelConfig.flops_per_token(seq_len) x tokens/s / devices
                  (per device; 6N + causal attention, no remat recompute;
                  forward: a third of it; distill: student + teacher/3)
  MFU             model TFLOP/s / peak, peak from --peak_tflops or a table of
                  dense bf16 peaks by device kind; "n/a" when unknown (CPU)
  peak mem        max over devices of memory_stats()["peak_bytes_in_use"], or
                  the process's max RSS ("host RSS") where devices report none
                  (the peer: torch.cuda.max_memory_allocated, or the RSS)

The model comes from `--model=NAME` (tiny, 2b, 9b, 27b or a .gin path), read
by a literal parser of `ModelConfig.FIELD = VALUE` lines that needs no gin, or
from `--gin_file` / `--gin.ModelConfig.FIELD=VALUE` (needs gin-config; with
both, the preset is the first gin file). `--remat`, `--dtype`,
`--param_dtype`, `--scan_layers`, `--attention_impl`, `--dpa_implementation`
and `--no_attn_soft_cap` override the model's settings.
Configuration errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time

_TOOLS = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_TOOLS)
for _path in (_REPO, _TOOLS):  # posttrain_jax; bench_peer_hf (for --peer)
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import flax.linen as nn

from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.trainer import Trainer, TrainState
from posttrain_jax.distillation.trainer import DistillationTrainer
from posttrain_jax.models import ModelConfig, Transformer, presets
from posttrain_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES

from bench_report import peak_tflops_for, table  # tools/bench_report.py
import profile_ops  # tools/profile_ops.py

try:  # gin-config is optional: --model works without it.
  from posttrain_jax import cli
except ImportError:  # pragma: no cover - exercised on machines without gin
  cli = None


if cli is not None:
  ConfigError = cli.ConfigError
else:
  class ConfigError(Exception):
    """A configuration problem, reported as one line without a traceback."""

STEPS = ("train", "distill", "forward")


# ---------------------------------------------------------------------------
# Configuration.

def _split_flags(argv):
  """(gin_files, bindings, search_paths, rest); uses cli.parse_flags if gin exists."""
  if cli is not None:
    flags = cli.parse_flags(argv)
    return flags
  rest = []
  for arg in argv:
    if arg.startswith("--gin"):
      raise ConfigError(f"{arg}: gin-config is not installed; use --model=NAME "
                        "(tiny, 2b, 9b, 27b or a .gin path) and the override flags.")
    rest.append(arg)
  return argparse.Namespace(gin_files=[], bindings=[], search_paths=[], rest=rest)


def model_gin_path(name: str) -> str:
  try:
    return presets.preset_path(name)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def read_model_gin(path: str) -> dict:
  try:
    return presets.read_literal_model_gin(path)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _gin_model_config(flags) -> ModelConfig:
  configurable = cli.register(ModelConfig)
  cli.configure(flags)  # its errors name the closest parameter already
  return cli.call(configurable)


def build_model_config(args, flags) -> tuple[ModelConfig, ModelConfig, str]:
  """Student and teacher ModelConfig and a display name from --model / gin flags / overrides."""
  use_gin = bool(flags.gin_files or flags.bindings)
  name = args.model or ("tiny" if not use_gin else "")
  try:
    if use_gin:
      if args.model:
        flags.gin_files.insert(0, model_gin_path(args.model))
      if not flags.gin_files:
        raise ConfigError("--gin bindings need a model: add --model=NAME or "
                          "--gin_file=gin/models/gemma2_NAME.gin.")
      cfg = _gin_model_config(flags)
      name = "+".join(os.path.splitext(os.path.basename(f))[0].replace("gemma2_", "")
                      for f in flags.gin_files)
      if flags.bindings:
        name += "*"  # modified by bindings
    else:
      cfg = ModelConfig(**read_model_gin(model_gin_path(name)))
      name = os.path.splitext(os.path.basename(name))[0].replace("gemma2_", "")
    cfg = _with_overrides(cfg, args)
    teacher = cfg
    if args.teacher_model:
      teacher = ModelConfig(**read_model_gin(model_gin_path(args.teacher_model)))
      teacher = _with_overrides(teacher, args, ("dtype", "param_dtype"))
  except (ValueError, TypeError) as e:
    text = str(e)
    if cli is not None:
      text = cli.strip_gin_context(text)
    raise ConfigError(text) from e
  return cfg, teacher, name


def _with_overrides(cfg: ModelConfig, args, only=None) -> ModelConfig:
  overrides = {k: v for k, v in (
      ("remat_policy", args.remat), ("dtype", args.dtype),
      ("param_dtype", args.param_dtype), ("scan_layers", args.scan_layers),
      ("attention_impl", args.attention_impl),
      ("dpa_implementation", args.dpa_implementation)) if v is not None}
  if args.no_attn_soft_cap:
    overrides["attn_logits_soft_cap"] = None
  if only is not None:
    overrides = {k: v for k, v in overrides.items() if k in only}
  return dataclasses.replace(cfg, **overrides) if overrides else cfg


def parse_parallelism(text: str, flag: str) -> dict[str, int]:
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    axis, eq, degree = part.partition("=")
    if not eq or axis.strip() not in partitioning.MESH_AXES:
      raise ConfigError(f"--{flag}: expected NAME=INT pairs, e.g. 'fsdp=8', with NAME "
                        f"in {', '.join(partitioning.MESH_AXES)}; got {part!r}.")
    try:
      out[axis.strip()] = int(degree)
    except ValueError:
      raise ConfigError(f"--{flag}: degree of {axis} must be an integer, got "
                        f"{degree!r}.") from None
  return out


def _bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_args(rest):
  p = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.split("\n")[0])
  p.add_argument("--model", default=None,
                 help="preset (tiny, 2b, 9b, 27b) or a model .gin path; default tiny")
  p.add_argument("--batch_size", type=int, default=8, help="global batch (sequences)")
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
  p.add_argument("--repeats", type=int, default=1,
                 help="time this many windows of --steps steps; report the fastest")
  p.add_argument("--num_microbatches", type=int, default=1)
  p.add_argument("--ici", default="data=-1,fsdp=1,tensor=1",
                 help="ICI degrees, e.g. 'fsdp=-1,tensor=2' (one axis may be -1)")
  p.add_argument("--dcn", default="", help="DCN degrees, e.g. 'replica=2'")
  p.add_argument("--remat", choices=REMAT_POLICIES, default=None,
                 help="override ModelConfig.remat_policy")
  p.add_argument("--dtype", default=None, help="override compute dtype, e.g. bfloat16")
  p.add_argument("--param_dtype", default=None, help="override parameter dtype")
  p.add_argument("--scan_layers", type=_bool, default=None,
                 help="override ModelConfig.scan_layers (true/false)")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak TFLOP/s per device for MFU (default: by device kind)")
  p.add_argument("--step", choices=STEPS, default="train", help="what to time")
  p.add_argument("--teacher_model", default=None,
                 help="--step=distill: teacher preset or .gin (default: the student's)")
  p.add_argument("--loss_chunk_size", type=int, default=None,
                 help="chunked loss: logits for this many positions at a time")
  p.add_argument("--attention_impl", choices=ATTENTION_IMPLS, default=None,
                 help="override ModelConfig.attention_impl")
  p.add_argument("--dpa_implementation", choices=("xla", "cudnn"), default=None,
                 help="override ModelConfig.dpa_implementation")
  p.add_argument("--no_attn_soft_cap", action="store_true",
                 help="set attn_logits_soft_cap=None (changes the model; needed by "
                      "--attention_impl=dot_product_attention)")
  p.add_argument("--peer", choices=("hf",), default=None,
                 help="also time transformers' Gemma2 (torch) in this run")
  p.add_argument("--peer_compile", action="store_true",
                 help="add a peer row under torch.compile")
  p.add_argument("--peer_no_eager", action="store_true",
                 help="skip the eager peer row (with --peer_compile)")
  p.add_argument("--peer_attn", default="eager",
                 help="transformers attn_implementation (eager, sdpa, flex_attention)")
  p.add_argument("--peer_device", default=None, help="torch device (default cuda if any)")
  p.add_argument("--interleave", choices=("auto", "true", "false"), default="auto",
                 help="alternate the engines' timed windows (window r of each before "
                      "window r + 1 of any) instead of running them one after another; "
                      "auto: when the peer runs on the CPU (a GPU peer runs first so "
                      "that its memory is freed before JAX allocates)")
  p.add_argument("--peer_threads", type=int, default=None,
                 help="torch.set_num_threads for the peer (default: torch's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="after timing, trace --steps more of our steps into DIR and print "
                      "where the time goes (tools/profile_ops.py; on CPU set XLA_FLAGS="
                      "--xla_cpu_enable_xprof_traceme=true)")
  p.add_argument("--json", action="store_true", help="print the row as one JSON line")
  p.add_argument("--jsonl", default=None, help="also append the rows to this JSON-lines file")
  args = p.parse_args(rest)
  for name in ("batch_size", "seq_len", "steps", "repeats", "num_microbatches"):
    if getattr(args, name) <= 0:
      raise ConfigError(f"--{name} must be positive, got {getattr(args, name)}.")
  if args.warmup < 0:
    raise ConfigError(f"--warmup must be >= 0, got {args.warmup}.")
  if args.loss_chunk_size is not None and args.loss_chunk_size <= 0:
    raise ConfigError(f"--loss_chunk_size must be positive, got {args.loss_chunk_size}.")
  if args.loss_chunk_size is not None and args.step == "forward":
    raise ConfigError("--loss_chunk_size applies to --step=train or distill, not forward.")
  if args.teacher_model and args.step != "distill":
    raise ConfigError("--teacher_model needs --step=distill.")
  if args.peer_no_eager and not args.peer_compile:
    raise ConfigError("--peer_no_eager leaves no peer row; add --peer_compile.")
  return args


# ---------------------------------------------------------------------------
# Measurement.

def synthetic_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab: int):
  tokens = rng.integers(0, vocab, size=(rows, seq_len + 1), dtype=np.int32)
  return {
      "decoder_input_tokens": tokens[:, :-1],
      "decoder_target_tokens": tokens[:, 1:],
      "decoder_loss_weights": np.ones((rows, seq_len), np.float32),
  }


def peak_memory() -> tuple[int | None, str]:
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except  # not supported
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "device"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024), "host RSS"


def host_params(cfg: ModelConfig, seed: int):
  """Random parameters initialised on the host CPU (shared with the peer)."""
  model = Transformer(cfg)
  init = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, 1), jnp.int32))["params"]))
  with jax.default_device(jax.devices("cpu")[0]):
    return jax.device_get(init(jax.random.key(seed)))


def step_flops_per_token(args, cfg: ModelConfig, teacher: ModelConfig) -> float:
  train = cfg.flops_per_token(args.seq_len)
  if args.step == "forward":
    return train / 3
  if args.step == "distill":
    return train + teacher.flops_per_token(args.seq_len) / 3
  return train


def _compiled_step(args, trainer, abstract_batch):
  """(run, compile s, optimized HLO text) with run(state, batch, aux) ->
  (state, metrics)."""
  # pylint: disable=protected-access  # the jitted steps the trainers run
  t0 = time.perf_counter()
  with trainer._context():
    if args.step == "train":
      lowered = trainer._train.lower(trainer.abstract_state, abstract_batch)
    elif args.step == "distill":
      lowered = trainer._distill.lower(trainer.abstract_state, abstract_batch,
                                       trainer.abstract_teacher_params)
    else:
      lowered = trainer._eval.lower(trainer.abstract_state.params, abstract_batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  if args.step == "train":
    run = lambda state, batch, aux: compiled(state, batch)
  elif args.step == "distill":
    run = compiled
  else:
    def run(state, batch, aux):
      del aux
      sums = compiled(state.params, batch)
      return state, {"loss": sums["cross_entropy"] / sums["weight"]}
  return run, compile_s, compiled.as_text()


def run_windows(engines: list, interleave: bool) -> list[dict]:
  """Rows of the engines' window generators (bench_peer_hf.peer_windows,
  our_windows): one after another, or with interleave round-robin, so that
  window r of every engine runs before window r + 1 of any: a machine whose
  speed drifts over minutes then slows all engines alike."""
  rows = [None] * len(engines)
  order = [[i] for i in range(len(engines))] if not interleave else [range(len(engines))]
  for group in order:
    live = list(group)
    while live:
      for i in list(live):
        try:
          next(engines[i])
        except StopIteration as done:
          rows[i] = done.value
          live.remove(i)
  return rows


def our_windows(args, cfg: ModelConfig, teacher: ModelConfig, mesh, batches_np,
                host=None):
  """Generator like bench_peer_hf.peer_windows for our step: builds, compiles
  and warms up, yields before each of the --repeats timed windows and after
  the last, returns the row. `host` = {"params", "teacher"} host weights (else
  random init)."""
  schedule, tx = OptimizerConfig().build(args.warmup + args.steps)
  if args.step == "distill":
    trainer = DistillationTrainer(cfg, teacher, tx, schedule, mesh,
                                  chunk_size=args.loss_chunk_size,
                                  num_microbatches=args.num_microbatches)
  else:
    trainer = Trainer(Transformer(cfg), tx, schedule, mesh,
                      num_microbatches=args.num_microbatches,
                      loss_chunk_size=args.loss_chunk_size)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
  abstract_batch = {
      k: jax.ShapeDtypeStruct((args.batch_size, args.seq_len), dtype,
                              sharding=trainer.batch_sharding)
      for k, dtype in (("decoder_input_tokens", jnp.int32),
                       ("decoder_target_tokens", jnp.int32),
                       ("decoder_loss_weights", jnp.float32))}
  run, compile_s, hlo = _compiled_step(args, trainer, abstract_batch)

  aux = None
  if host is None:
    state = trainer.init_state(jax.random.key(args.seed))
    if args.step == "distill":
      aux = trainer.init_teacher(jax.random.key(args.seed + 1))
  else:
    init = lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))
    with trainer._context():  # pylint: disable=protected-access
      state = jax.jit(init, out_shardings=trainer.state_shardings)(
          jax.device_put(host["params"], trainer.param_shardings))
    if args.step == "distill":
      aux = jax.device_put(host["teacher"], trainer.teacher_shardings)
  batches = [trainer.shard_batch(b) for b in batches_np]
  jax.block_until_ready((state, aux, batches))

  metrics = None
  for i in range(args.warmup):
    state, metrics = run(state, batches[i % 2], aux)
  jax.block_until_ready((state, metrics))
  elapsed = math.inf
  for _ in range(args.repeats):  # best of --repeats windows of --steps steps
    yield
    t0 = time.perf_counter()
    for i in range(args.steps):
      state, metrics = run(state, batches[i % 2], aux)
    jax.block_until_ready((state, metrics))
    elapsed = min(elapsed, time.perf_counter() - t0)
  yield
  if args.profile:
    with profile_ops.traced(args.profile):
      for i in range(args.steps):
        state, metrics = run(state, batches[i % 2], aux)
      jax.block_until_ready((state, metrics))
    print(f"Profile of {args.steps} steps ({args.profile}), per step:\n"
          f"{profile_ops.table(profile_ops.summarize(args.profile, hlo), per=args.steps)}\n",
          flush=True)
  mem, mem_source = peak_memory()
  engine = f"posttrain_jax ({cfg.attention_impl}"
  engine += f"/{cfg.dpa_implementation})" if cfg.dpa_implementation else ")"
  if args.loss_chunk_size:
    engine += f" loss chunk {args.loss_chunk_size}"
  devices = jax.devices()
  return {
      "engine": engine,
      "backend": jax.default_backend(),
      "devices": len(devices),
      "device_kind": devices[0].device_kind,
      "mesh": {k: v for k, v in mesh.shape.items() if v > 1} or {"data": 1},
      "params": num_params,
      "remat": cfg.remat_policy,
      "scan_layers": cfg.scan_layers,
      "attention_impl": cfg.attention_impl,
      "dpa_implementation": cfg.dpa_implementation,
      "loss_chunk_size": args.loss_chunk_size,
      "num_microbatches": args.num_microbatches,
      "steps": args.steps,
      "repeats": args.repeats,
      "warmup": args.warmup,
      "elapsed_s": elapsed,
      "step_ms": elapsed / args.steps * 1e3,
      "peak_memory_bytes": mem,
      "peak_memory_source": mem_source,
      "compile_s": compile_s,
      "loss": float(metrics["loss"]),
  }


def benchmark(args, cfg: ModelConfig, teacher: ModelConfig, model_name: str) -> list[dict]:
  """Rows: ours first, then the peer's (which run before ours)."""
  mesh = partitioning.create_mesh(parse_parallelism(args.ici, "ici"),
                                  parse_parallelism(args.dcn, "dcn"))
  dp = math.prod(mesh.shape[a] for a in ("replica", "data", "fsdp"))
  if args.batch_size % (dp * args.num_microbatches):
    raise ConfigError(
        f"--batch_size {args.batch_size} must be divisible by the data-parallel "
        f"degree ({dp}) x --num_microbatches ({args.num_microbatches}).")
  if args.batch_size % jax.process_count():
    raise ConfigError(f"--batch_size {args.batch_size} must be divisible by the "
                      f"{jax.process_count()} processes.")
  if args.peer and jax.process_count() > 1:
    raise ConfigError("--peer runs on one host; drop it for multi-host runs.")
  rng = np.random.default_rng(args.seed + jax.process_index())
  rows_per_process = args.batch_size // jax.process_count()
  batches = [synthetic_batch(rng, rows_per_process, args.seq_len, cfg.vocab_size)
             for _ in range(2)]

  host, peers, interleave = None, [], False
  if args.peer:
    try:
      import bench_peer_hf  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ConfigError(f"--peer=hf needs torch and transformers ({e}).") from e
    host = {"params": host_params(cfg, args.seed)}
    if args.step == "distill":
      host["teacher"] = host_params(teacher, args.seed + 1)
    modes = ([] if args.peer_no_eager else [False]) + ([True] if args.peer_compile else [])
    peer_device = args.peer_device or bench_peer_hf.default_device()
    interleave = (peer_device == "cpu") if args.interleave == "auto" else args.interleave == "true"

    def guarded(windows, compile_):  # a failing peer (e.g. torch OOM) leaves the others
      try:
        return (yield from windows)
      except RuntimeError as e:
        print(f"bench_train.py: peer ({'compiled' if compile_ else 'eager'}) failed: "
              f"{str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)
        bench_peer_hf.release_memory()
        return None

    engines = [guarded(bench_peer_hf.peer_windows(
        args.step, cfg, host["params"], batches, steps=args.steps,
        repeats=args.repeats,
        warmup=max(args.warmup, 1), optimizer=OptimizerConfig(), compile=compile_,
        attn=args.peer_attn, device=args.peer_device, threads=args.peer_threads,
        teacher_cfg=teacher, teacher_params=host.get("teacher")), compile_)
               for compile_ in modes]
    engines.append(our_windows(args, cfg, teacher, mesh, batches, host))
    *peers, ours = run_windows(engines, interleave)
    peers = [row for row in peers if row is not None]
  else:
    ours = run_windows([our_windows(args, cfg, teacher, mesh, batches, host)], False)[0]

  flops = step_flops_per_token(args, cfg, teacher)
  kind = ours["device_kind"]
  peak = args.peak_tflops if args.peak_tflops else peak_tflops_for(kind)
  rows = []
  for row in [ours] + peers:
    tokens_per_s = args.batch_size * args.seq_len * args.steps / row.pop("elapsed_s")
    tflops = flops * tokens_per_s / row["devices"] / 1e12
    row_peak = peak if row is ours else (
        args.peak_tflops or peak_tflops_for(row["device_kind"]))
    rows.append({
        "step": args.step, "model": model_name, "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype, "batch_size": args.batch_size,
        "seq_len": args.seq_len, **row, "tokens_per_s": tokens_per_s,
        "flops_per_token": flops, "model_tflops_per_device": tflops,
        "peak_tflops": row_peak,
        "mfu_percent": 100.0 * tflops / row_peak if row_peak else None})
  for row in rows[1:]:
    row["ours_speedup"] = rows[0]["tokens_per_s"] / row["tokens_per_s"]
    row["interleaved"] = rows[0]["interleaved"] = interleave
  for row in rows:
    row.update(jax_version=jax.__version__,
               tensorflow_imported=sys.modules.get("tensorflow") is not None,
               seqio_imported=sys.modules.get("seqio") is not None)
  return rows


def main(argv) -> int:
  flags = _split_flags(argv)
  args = parse_args(flags.rest)
  if (flags.gin_files or flags.bindings) and cli is None:
    raise ConfigError("gin-config is not installed; use --model=NAME.")
  cfg, teacher, name = build_model_config(args, flags)
  try:
    rows = benchmark(args, cfg, teacher, name)
  except ValueError as e:
    if "Invalid ModelConfig" in str(e) or "parallelism" in str(e):
      raise ConfigError(str(e)) from e
    raise
  print("\n".join(json.dumps(r) for r in rows) if args.json else table(rows), flush=True)
  if args.jsonl:
    with open(args.jsonl, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  return 0


def _run_main(argv=None):
  if cli is not None:
    return cli.run_main(main, argv)
  try:
    code = main(sys.argv[1:] if argv is None else argv)
  except ConfigError as e:
    print(f"bench_train.py: error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)


if __name__ == "__main__":
  _run_main()
