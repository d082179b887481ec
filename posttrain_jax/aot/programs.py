"""The programs each job runs, built from its trainers with abstract inputs.

`for_job(name, args, mesh)` takes a job's arguments (what gin binds for
`train`, `distill`, `train_reward_model`, `train_policy`, `train_dpo`, with
the function's defaults) and returns its per-step programs as `plan.Program`s:
the trainers are constructed exactly as the jobs construct them (same
classes, same shardings), and every input is a jax.ShapeDtypeStruct with its
NamedSharding on the mesh, so nothing is allocated and no step runs.

  train               the LM/SFT train step (Trainer); with `diloco`, Streaming
                      DiLoCo's programs instead (diloco_programs)
  distill             the distillation step (student step + frozen teacher
                      forward); online sources add their sampler; with
                      `diloco`, DiLoCo's programs around the distillation step
  train_reward_model  the Bradley-Terry fine-tuning step of the reward model
  train_policy        the sampler (prefill + decode) and the policy step
  train_dpo           the DPO step (reference on the fly, or precomputed)

FLOPs are analytic (ModelConfig.flops_per_token: 6N + attention per trained
token; a forward is a third of it): the sampler counts a forward over
prompt + generated tokens, the distillation step a student train step plus a
teacher forward, DPO the policy's train step plus the reference forward on
the same rows, the policy step its epochs of training plus the SFT model's
forward (its anchor and algorithm extras are not counted).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain_jax.aot.plan import Program
from posttrain_jax.core import partitioning
from posttrain_jax.core.trainer import Trainer, _MeshRules
from posttrain_jax.diloco import loop as diloco_loop
from posttrain_jax.diloco import trainer as diloco_trainer
from posttrain_jax.distillation.trainer import DistillationTrainer
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import ModelConfig, Transformer, params_checkpoint
from posttrain_jax.rl import reward_model as rm
from posttrain_jax.rl.dpo_training import REF_KEYS, DPOTrainer
from posttrain_jax.rl.policy_training import PolicyTrainer
from posttrain_jax.rl.reward_training import RewardTrainer

JOBS = ("train", "distill", "train_reward_model", "train_policy", "train_dpo")
LM_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
           "decoder_segment_ids", "decoder_positions")


def _struct(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def lm_batch(batch_size: int, seq_len: int, sharding) -> dict:
  """An abstract packed LM batch (the pipeline's five features)."""
  return {k: _struct((batch_size, seq_len),
                     jnp.float32 if k == "decoder_loss_weights" else jnp.int32, sharding)
          for k in LM_KEYS}


def pair_batch(pairs: int, seq_len: int, sharding, ref: bool = False) -> dict:
  """An abstract preference-pair batch (rl.reward_training.shard_pairs' layout)."""
  out = {f"{side}_{k}": _struct((pairs, seq_len), jnp.int32, sharding)
         for side in ("chosen", "rejected")
         for k in ("tokens", "positions", "segment_ids", "response_mask")}
  column = _struct((pairs, 1), jnp.float32, sharding)
  out["pair_weights"] = column
  if ref:
    out.update({k: column for k in REF_KEYS})
  return out


def _key():
  return jax.eval_shape(lambda: jax.random.key(0))


def _lower(jitted, mesh, rules, *args):
  with _MeshRules(mesh, rules):
    return jitted.lower(*args)


def train_flops(cfg: ModelConfig, rows: int, seq_len: int) -> float:
  return cfg.flops_per_token(seq_len) * rows * seq_len


def forward_flops(cfg: ModelConfig, rows: int, seq_len: int) -> float:
  return train_flops(cfg, rows, seq_len) / 3


# ---------------------------------------------------------------- the LM step

def lm_programs(trainer: Trainer, cfg: ModelConfig, batch_size: int, seq_len: int,
                name: str = "LM train step") -> list[Program]:
  # pylint: disable=protected-access  # the trainer's own jitted step
  batch = lm_batch(batch_size, seq_len, trainer.batch_sharding)
  return [Program(name, functools.partial(
      _lower, trainer._train, trainer.mesh, trainer.rules, trainer.abstract_state, batch),
                  train_flops(cfg, batch_size, seq_len), batch_size * seq_len)]


# --------------------------------------------------------- Streaming DiLoCo

def diloco_programs(trainer: diloco_trainer.DiLoCoTrainer, batch: dict, flops: float,
                    tokens: int, aux=None, label: str = "LM") -> list[Program]:
  """The distinct programs of one sync window: the inner step, each fused
  (exchange + inner step) program, each outer (apply, or exchange + apply)
  program, in the order the schedule first runs them."""
  algo, state = trainer.algo, trainer.abstract_state
  m = trainer.config.num_replicas
  mask = jax.ShapeDtypeStruct((m,), jnp.float32)
  extra = () if aux is None else (aux,)
  rules = trainer.inner_rules
  seen, out = set(), []
  window = trainer.config.sync_every * max(1, len(trainer.fragments)) + 2
  for step in range(window):
    pending, after = algo.programs(step)
    if pending and ("fused", pending) not in seen:
      seen.add(("fused", pending))
      out.append(Program(
          f"DiLoCo {label} inner step + sync of fragment(s) {list(pending)}",
          functools.partial(_lower, algo.compiled_fused(pending), trainer.mesh, rules,
                            state, batch, mask, *extra),
          flops, tokens, role="sync", sync=tuple(pending)))
    elif not pending and ("inner",) not in seen:
      seen.add(("inner",))
      out.append(Program(
          f"DiLoCo {label} inner step",
          functools.partial(_lower, algo.compiled_inner(), trainer.mesh, rules,
                            state.step, state.replicas, batch, *extra),
          flops, tokens, role="inner"))
    if (after.sync or after.apply) and ("outer", after) not in seen:
      seen.add(("outer", after))
      what = (f"sync of {list(after.sync)} + " if after.sync else "") + (
          f"outer update of {list(after.apply)}")
      out.append(Program(
          f"DiLoCo {what}",
          functools.partial(_lower, algo.compiled_outer(after), trainer.mesh, rules,
                            state, mask),
          role="sync" if after.sync else "apply", sync=tuple(after.sync)))
  order = {"inner": 0, "sync": 1, "apply": 2}
  return sorted(out, key=lambda p: order[p.role])


# ------------------------------------------------------------------ the jobs

def _train(args: Mapping[str, Any], mesh) -> tuple[list[Program], Any]:
  cfg, data = args["model_config"], args["train_data"]
  schedule, tx = args["optimizer"].build(args["num_steps"])
  b, t = data.batch_size, data.sequence_length
  if args.get("diloco") is not None:
    loop = diloco_loop.DiLoCoLoop(Transformer(cfg), tx, schedule, mesh, args["diloco"],
                                  batch_size=b, num_microbatches=args["num_microbatches"],
                                  z_loss=args["z_loss"])
    batch = lm_batch(b, t, loop.trainer.batch_sharding)
    return diloco_programs(loop.trainer, batch, train_flops(cfg, b, t), b * t), loop.trainer
  trainer = Trainer(Transformer(cfg), tx, schedule, mesh,
                    num_microbatches=args["num_microbatches"], z_loss=args["z_loss"],
                    loss_chunk_size=args.get("loss_chunk_size"))
  return lm_programs(trainer, cfg, b, t), trainer


def teacher_config(args: Mapping[str, Any]) -> ModelConfig:
  """distill's frozen teacher: distill.teacher_config, else the checkpoint's model.gin."""
  cfg = args.get("teacher_config")
  if cfg is None:
    try:
      cfg = params_checkpoint.model_config_of(
          params_checkpoint.locate(args["teacher_checkpoint"]))
    except (FileNotFoundError, ValueError, OSError) as e:
      raise ValueError(
          f"The teacher's architecture: set distill.teacher_config (e.g. "
          f"--gin_file=models/... under a teacher/ scope) or give a teacher_checkpoint "
          f"with a model.gin ({e}).") from e
  dtype = args.get("teacher_dtype")
  return dataclasses.replace(cfg, dtype=dtype) if dtype else cfg


def _sampler_program(cfg: ModelConfig, mesh, prompts, max_new_tokens: int, name: str,
                     temperature: float = 1.0) -> Program:
  # pylint: disable=protected-access  # the sampler's own jitted generate
  sampler = Sampler(cfg, SamplingConfig(max_new_tokens=max_new_tokens,
                                        temperature=temperature), mesh)
  params = abstract_params(sampler.model, sampler.param_shardings)
  batch = partitioning.batch_sharding(mesh)
  rows, p = prompts.batch_size, prompts.prompt_length
  lengths = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch.spec[0]))
  tokens = _struct((rows, p), jnp.int32, batch)
  total = p + max_new_tokens
  return Program(name, functools.partial(
      _lower, sampler._generate, mesh, sampler.rules, params, tokens,
      _struct((rows,), jnp.int32, lengths), _key()),
                 forward_flops(cfg, rows, total), rows * total)


def abstract_params(model, shardings):
  """Abstract params of `model` placed by `shardings`."""
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(abstract), shardings)


def _distill(args: Mapping[str, Any], mesh) -> tuple[list[Program], Any]:
  student, teacher = args["student_config"], teacher_config(args)
  schedule, tx = args["optimizer"].build(args["num_steps"])
  trainer = DistillationTrainer(
      student, teacher, tx, schedule, mesh, kind=args["loss"],
      temperature=args["temperature"], beta=args["beta"], chunk_size=args["chunk_size"],
      num_microbatches=args["num_microbatches"])
  sources = {k: w for k, w in (args.get("sources") or {"offline": 1.0}).items() if w > 0}
  prompts, offline = args.get("prompts"), args.get("offline_data")
  programs = []
  if offline is not None and "offline" in sources:
    b, t = offline.batch_size, offline.sequence_length
  elif prompts is not None:
    b, t = prompts.batch_size, prompts.prompt_length + args["max_new_tokens"]
  else:
    raise ValueError("distill needs offline_data or prompts to size its batches.")
  for name in sorted(sources):
    if name != "offline" and prompts is not None:
      cfg = teacher if name == "online_teacher" else student
      programs.append(_sampler_program(cfg, mesh, prompts, args["max_new_tokens"],
                                       f"sampler ({name}: prefill + decode)",
                                       args["sampling_temperature"]))
  flops = train_flops(student, b, t) + forward_flops(teacher, b, t)
  if args.get("diloco") is not None:
    loop = diloco_loop.distillation(
        trainer, args["diloco"], batch_size=b, kind=args["loss"],
        temperature=args["temperature"], beta=args["beta"], chunk_size=args["chunk_size"],
        num_microbatches=args["num_microbatches"])
    batch = lm_batch(b, t, loop.trainer.batch_sharding)
    return programs + diloco_programs(loop.trainer, batch, flops, b * t,
                                      aux=trainer.abstract_teacher_params,
                                      label="distillation"), loop.trainer
  # pylint: disable=protected-access  # the trainer's own jitted step
  batch = lm_batch(b, t, trainer.batch_sharding)
  programs.append(Program("distillation step (student step + frozen teacher forward)",
                          functools.partial(_lower, trainer._distill, mesh, trainer.rules,
                                            trainer.abstract_state, batch,
                                            trainer.abstract_teacher_params),
                          flops, b * t))
  return programs, trainer


def _reward(args: Mapping[str, Any], mesh) -> tuple[list[Program], Any]:
  cfg, data = args["model_config"], args["train_data"]
  opt = args["optimizer"]
  schedule, tx = opt.build(args["num_steps"])
  trainer = RewardTrainer(rm.RewardModel(cfg, args["head_dropout"]), tx, tx, schedule,
                          mesh, num_microbatches=args["num_microbatches"])
  b, t = data.batch_size, data.sequence_length
  sharding = partitioning.batch_sharding(mesh)
  # pylint: disable=protected-access  # the trainer's own jitted step
  return [Program("reward model step (Bradley-Terry, full fine-tuning)",
                  functools.partial(_lower, trainer._finetune, mesh, trainer.rules,
                                    trainer.abstract_state, pair_batch(b, t, sharding), _key()),
                  train_flops(cfg, 2 * b, t), 2 * b * t)], trainer


def _policy(args: Mapping[str, Any], mesh) -> tuple[list[Program], Any]:
  cfg, prompts = args["model_config"], args["prompts"]
  if prompts is None:
    raise ValueError("train_policy needs `prompts` (a PromptConfig) to size its batches.")
  schedule, tx = args["optimizer"].build(args["num_steps"])
  k = args["samples_per_prompt"]
  trainer = PolicyTrainer(cfg, tx, schedule, mesh, beta=args["beta"], anchor=args["anchor"],
                          ema_rate=args["ema_rate"], samples_per_prompt=k,
                          algorithm=args.get("algorithm"), num_epochs=args["num_epochs"],
                          num_minibatches=args["num_minibatches"],
                          num_microbatches=args["num_microbatches"])
  rows = prompts.batch_size * k
  t = prompts.prompt_length + args["max_new_tokens"]
  sampled = dataclasses.replace(prompts, batch_size=rows)
  sampler = _sampler_program(cfg, mesh, sampled, args["max_new_tokens"],
                             f"sampler (policy: {prompts.batch_size} prompts x {k}, "
                             "prefill + decode)", args["temperature"])
  # pylint: disable=protected-access  # the trainer's own jitted step and shardings
  shardings = trainer._batch_shardings
  batch = {key: _struct((rows, t), jnp.int32, s) for key, s in shardings.items()
           if key != "rewards"}
  batch["rewards"] = _struct((rows,), jnp.float32, shardings["rewards"])
  flops = (train_flops(cfg, rows, t) * args["num_epochs"] + forward_flops(cfg, rows, t))
  step = Program("policy step (KL-regularised policy gradient)",
                 functools.partial(_lower, trainer._step, mesh, trainer.rules,
                                   trainer.abstract_state, trainer.abstract_params, batch),
                 flops, rows * t)
  return [sampler, step], trainer


def _dpo(args: Mapping[str, Any], mesh) -> tuple[list[Program], Any]:
  cfg, data = args["model_config"], args["train_data"]
  schedule, tx = args["optimizer"].build(args["num_steps"])
  reference = args["reference"]
  trainer = DPOTrainer(cfg, tx, schedule, mesh, beta=args["beta"],
                       loss_type=args["loss_type"], label_smoothing=args["label_smoothing"],
                       ipo_tau=args["ipo_tau"], reference=reference,
                       num_microbatches=args["num_microbatches"])
  b, t = data.batch_size, data.sequence_length
  on_the_fly = reference == "on_the_fly"
  batch = pair_batch(b, t, trainer.batch_sharding, ref=not on_the_fly)
  ref = trainer.abstract_params if on_the_fly else None
  flops = train_flops(cfg, 2 * b, t) + (forward_flops(cfg, 2 * b, t) if on_the_fly else 0)
  # pylint: disable=protected-access  # the trainer's own jitted step
  return [Program(f"DPO step (reference {reference})",
                  functools.partial(_lower, trainer._step, mesh, trainer.rules,
                                    trainer.abstract_state, batch, ref),
                  flops, 2 * b * t)], trainer


_BUILDERS = {"train": _train, "distill": _distill, "train_reward_model": _reward,
             "train_policy": _policy, "train_dpo": _dpo}


def for_job(job: str, args: Mapping[str, Any], mesh) -> tuple[list[Program], Any]:
  """(programs, the trainer that built them) of `job` with arguments `args`."""
  if job not in _BUILDERS:
    raise ValueError(f"Compile-only plans cover the jobs {', '.join(JOBS)}; "
                     f"job.name is {job!r}.")
  return _BUILDERS[job](args, mesh)
