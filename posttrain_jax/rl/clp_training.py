"""CLP training: the partitioned REINFORCE step of a policy conditioned on w.

Wang et al. 2024, arXiv 2407.15762 (`rl/clp.py` has the conditioning). Each step:

  1. prompts x, one weighting w ~ Q per prompt (shared by its G samples, [M]),
     w serialised into the prompt with prompt conditioning;
  2. responses y ~ pi_theta(.|x, w) (`CLPSampler`: `sampling.generate` on
     `ConditionedPolicy`), rewards r(x, y) in R^m (one per reward), w . r;
  3. one jitted, partitioned program (`clp_step`): log pi_theta(y|x, w), log
     pi_ref(y|x) of the SFT model on the prompt WITHOUT the serialised w
     (`ref_segment_ids` mask the prefix out, `ref_positions` restart at the
     prompt), the KL-regularised reward and the leave-one-out REINFORCE update
     (`reinforce.Reinforce`, `policy_gradient`):

        R = w . r - alpha (log pi_theta(y|x, w) - log pi_ref(y|x))
        A = R - mean of the other samples' R of the same prompt (and the same w)
        loss = -(1/B) sum A log pi_theta(y|x, w)

     so the expected update ascends E_w J(theta; w) with
     J = E[w . r] - alpha KL(pi_theta(.|x, w) || pi_ref(.|x)) (alpha = beta here).

The state is `policy_optimization.PolicyState` with the CLP parameter tree (mixed
leaves [m, ...]) and no anchor copy: the KL reference is the SFT model.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain_jax.core import partitioning
from posttrain_jax.core.trainer import optimizer_step
from posttrain_jax.distillation.sequence_kl import expected_token_kl, mc_sequence_kl
from posttrain_jax.inference.sampling import SamplingConfig, generate, left_pad
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.rl import clp as clp_lib
from posttrain_jax.rl.gold_reward import VOCAB_PATH
from posttrain_jax.rl import policy_gradient as pg
from posttrain_jax.rl.policy_optimization import PolicyState, Rollout, finite_mean
from posttrain_jax.rl.reinforce import Reinforce

Array = jax.Array
CLP_JSON = "clp.json"  # a train_clp run directory's rewards and CLPConfig
BATCH_KEYS = ("tokens", "positions", "segment_ids", "ref_positions", "ref_segment_ids",
              "mask")


def policy_forward(policy, params, batch) -> Array:
  """Logits of pi_theta(.|x, w) [b, T, V] on batch tokens with batch["weights"]."""
  return policy.apply({"params": {"policy": params, "weights": batch["weights"]}},
                      batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])


def ref_forward(model, sft_params, batch) -> Array:
  """Logits of pi_ref(.|x): the SFT model on the prompt without the serialised w."""
  return model.apply({"params": sft_params}, batch["tokens"], positions=batch["ref_positions"],
                     segment_ids=batch["ref_segment_ids"])


def clp_step(state: PolicyState, sft_params, batch, *, policy, ref_model, tx, schedule,
             beta: float, baseline: str, samples_per_prompt: int, num_microbatches: int = 1):
  """One CLP REINFORCE step (module docstring). batch: BATCH_KEYS [b, T], weights
  [b, m] and rewards [b, m] of responses sampled from pi_theta(.|x, w).

  Metrics: reward (w . r), reward_i (each reward's mean), kl_sft (Monte Carlo),
  shaped_reward, entropy, response_length, loss, grad_norm, learning_rate, tokens.
  """
  algorithm = Reinforce(baseline)
  mask = batch["mask"]
  logits = policy_forward(policy, state.params, batch)
  tok_lp = jax.lax.stop_gradient(pg.token_logprobs(logits, batch["tokens"], mask))
  entropy = pg.token_entropy_sums(logits, mask)
  tok_lp_ref = jax.lax.stop_gradient(pg.token_logprobs(
      ref_forward(ref_model, sft_params, batch), batch["tokens"], mask))
  # a row with any non-finite reward is left out (policy_optimization's "drop_rows")
  finite = jnp.all(jnp.isfinite(batch["rewards"].astype(jnp.float32)), axis=-1)
  valid = finite.astype(jnp.float32)
  scalar = jnp.where(finite, clp_lib.scalarise(
      jnp.where(finite[:, None], batch["rewards"], 0.0), batch["weights"]), 0.0)
  rollout = Rollout(scalar, mask, tok_lp, tok_lp_ref, valid)
  adv, seq_weights, algo_metrics = algorithm.advantages(rollout, beta, samples_per_prompt)
  seq_weights = seq_weights * valid
  adv = jnp.where(seq_weights > 0, adv, 0.0)
  loss_batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "mask",
                                      "weights")}
  loss_batch.update(advantages=jax.lax.stop_gradient(adv), seq_weights=seq_weights)

  def loss_fn(params, b, aux=None):
    del aux
    logp = pg.token_logprobs(policy_forward(policy, params, b), b["tokens"], b["mask"])
    return algorithm.loss_sums(logp, b, beta)

  train_state, metrics = optimizer_step(state.train_state(), loss_batch, loss_fn=loss_fn,
                                        tx=tx, schedule=schedule,
                                        num_microbatches=num_microbatches)
  apply = jnp.any(finite)  # no row left: the step is not applied
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
  train_state = train_state.replace(params=keep(train_state.params, state.params),
                                    opt_state=keep(train_state.opt_state, state.opt_state))
  metrics["nonfinite"] = jnp.maximum(metrics["nonfinite"], 1.0 - apply.astype(jnp.float32))
  metrics["nonfinite_rewards"] = jnp.sum(1.0 - valid)
  metrics.update(algo_metrics)
  metrics.update({
      "reward": finite_mean(jnp.where(finite, scalar, jnp.nan)),
      "kl_sft": mc_sequence_kl(tok_lp, tok_lp_ref, mask)["kl"],
      "entropy": entropy[0] / jnp.maximum(entropy[1], 1.0),
      "response_length": jnp.mean(jnp.sum(mask.astype(jnp.float32), -1)),
      "tokens": entropy[1],
  })
  for i in range(batch["rewards"].shape[-1]):
    metrics[f"reward_{i}"] = finite_mean(batch["rewards"][:, i])
  return PolicyState(train_state.step, train_state.params, train_state.opt_state,
                     None), metrics


def eval_metrics(policy, ref_model, params, sft_params, batch) -> dict[str, Array]:
  """reward_i means, kl_sft (MC), kl_sft_token_sum (exact per-token KL summed along
  the responses), entropy and response_length of responses sampled at batch w."""
  logits = policy_forward(policy, params, batch)
  ref_logits = ref_forward(ref_model, sft_params, batch)
  tokens, mask = batch["tokens"], batch["mask"]
  entropy = pg.token_entropy_sums(logits, mask)
  out = {"kl_sft": mc_sequence_kl(pg.token_logprobs(logits, tokens, mask),
                                  pg.token_logprobs(ref_logits, tokens, mask), mask)["kl"],
         "kl_sft_token_sum": expected_token_kl(logits, ref_logits, mask)["kl"],
         "entropy": entropy[0] / jnp.maximum(entropy[1], 1.0),
         "response_length": jnp.mean(jnp.sum(mask.astype(jnp.float32), -1))}
  for i in range(batch["rewards"].shape[-1]):
    out[f"reward_{i}"] = finite_mean(batch["rewards"][:, i])
  return out


def clp_shardings(policy: clp_lib.ConditionedPolicy, plain_abstract, plain_shardings):
  """(abstract CLP tree, its shardings): the copy axis of mixed leaves is replicated."""
  mask = clp_lib.mixed_mask(plain_abstract, policy.clp)
  m = policy.clp.num_copies
  abstract = jax.tree.map(lambda x, mixed: jax.ShapeDtypeStruct(
      ((m,) if mixed else ()) + x.shape, x.dtype), plain_abstract, mask)
  shardings = jax.tree.map(lambda s, mixed: jax.sharding.NamedSharding(
      s.mesh, jax.sharding.PartitionSpec(None, *s.spec)) if mixed else s,
      plain_shardings, mask)
  return abstract, shardings


class CLPTrainer:
  """Jitted, partitioned `clp_step`, sampling and eval of one CLP policy."""

  def __init__(self, model_config: ModelConfig, clp_config: clp_lib.CLPConfig, tx, schedule,
               mesh, *, beta: float, samples_per_prompt: int, baseline: str = "leave_one_out",
               num_microbatches: int = 1, rules=partitioning.DEFAULT_RULES):
    pg.check_baseline(baseline, samples_per_prompt)
    self.clp, self.mesh, self.rules, self.tx = clp_config, mesh, rules, tx
    self.policy = clp_lib.ConditionedPolicy(model_config, clp_config)
    self.ref_model = Transformer(model_config)
    plain, self.param_shardings = partitioning.params_and_shardings(
        lambda: self.ref_model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
        mesh, rules)
    abstract, self.clp_shardings = clp_shardings(self.policy, plain, self.param_shardings)
    replicated = partitioning.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, self.clp_shardings,
                                          transform_non_params=lambda _: replicated)
    self.state_shardings = PolicyState(replicated, self.clp_shardings, opt_shardings, None)
    with_sharding = lambda t, s: jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s)
    self.abstract_params = with_sharding(plain, self.param_shardings)
    self.abstract_clp_params = with_sharding(abstract, self.clp_shardings)
    self.abstract_state = with_sharding(
        PolicyState(jax.ShapeDtypeStruct((), jnp.int32), abstract, abstract_opt, None),
        self.state_shardings)
    batch_sh = partitioning.batch_sharding(mesh, rules)
    self.row_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(batch_sh.spec[0]))
    self._batch_shardings = {k: batch_sh for k in BATCH_KEYS}
    self._batch_shardings.update(weights=self.row_sharding, rewards=self.row_sharding)
    self.step_fn = functools.partial(
        clp_step, policy=self.policy, ref_model=self.ref_model, tx=tx, schedule=schedule,
        beta=beta, baseline=baseline, samples_per_prompt=samples_per_prompt,
        num_microbatches=num_microbatches)
    self._step = jax.jit(self.step_fn, in_shardings=(
        self.state_shardings, self.param_shardings, self._batch_shardings),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval = jax.jit(functools.partial(eval_metrics, self.policy, self.ref_model),
                         in_shardings=(self.clp_shardings, self.param_shardings,
                                       self._batch_shardings), out_shardings=replicated)
    self._fresh = jax.jit(
        lambda p: PolicyState(jnp.zeros((), jnp.int32), self.policy.init_params(p),
                              tx.init(self.policy.init_params(p)), None),
        in_shardings=(self.param_shardings,), out_shardings=self.state_shardings)

  def _put(self, batch):
    return {k: jax.device_put(v, self._batch_shardings[k]) for k, v in batch.items()}

  def init_state(self, sft_params) -> PolicyState:
    """Step 0: every copy = the SFT params, fresh optimizer."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._fresh(sft_params)

  def step(self, state: PolicyState, sft_params, batch) -> tuple[PolicyState, dict]:
    clp_lib.check_weights(jax.device_get(batch["weights"]), self.clp.num_rewards)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._step(state, sft_params, self._put(batch))

  def eval_metrics(self, params, sft_params, batch) -> dict[str, Array]:
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._eval(params, sft_params, self._put(batch))


class CLPSampler:
  """`sampling.generate` of a ConditionedPolicy: per-row weights [b, m]."""

  def __init__(self, policy: clp_lib.ConditionedPolicy, config: SamplingConfig, mesh,
               clp_param_shardings, rules=partitioning.DEFAULT_RULES):
    self.policy, self.config, self.mesh, self.rules = policy, config, mesh, rules
    batch = partitioning.batch_sharding(mesh, rules)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch.spec[0]))
    self._generate = jax.jit(
        functools.partial(generate, policy, config=config),
        in_shardings=({"policy": clp_param_shardings, "weights": rows}, batch, rows, None))

  def __call__(self, params, weights, prompts, rng, prompt_length: int | None = None):
    weights = clp_lib.check_weights(weights, self.policy.clp.num_rewards)
    tokens, lengths = left_pad(prompts, self.policy.config.vocab_size, self.config.pad_id,
                               prompt_length)
    if weights.shape != (len(prompts), self.policy.clp.num_rewards):
      raise ValueError(f"One weighting per prompt: got weights {weights.shape} for "
                       f"{len(prompts)} prompts.")
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._generate({"policy": params, "weights": np.asarray(weights)}, tokens,
                            lengths, rng)


def conditioned_prompts(prompts, weights, clp_config: clp_lib.CLPConfig, encode=None):
  """(prompts with the serialised w prepended when prompt conditioning is on, prefix
  lengths [b]); weights [b, m] (rounded to the serialisation grid by the caller)."""
  if not clp_config.prompt_conditioning:
    return [list(p) for p in prompts], np.zeros(len(prompts), np.int32)
  if encode is None:
    raise ValueError("Prompt conditioning needs a tokenizer (encode) to serialise w.")
  prefixes = [clp_lib.weight_prefix(w, clp_config, encode) for w in np.asarray(weights)]
  return ([pre + list(p) for pre, p in zip(prefixes, prompts)],
          np.array([len(pre) for pre in prefixes], np.int32))


def sample_batch(sample, weights, rewards, prefix_lengths) -> dict[str, Array]:
  """The clp_step batch of a SampleOutput: the reference sees the prompt without the
  first prefix_lengths[b] prompt tokens (segment 0, positions restarting at 0)."""
  segments = np.asarray(sample.prompt_mask | sample.generated_mask).astype(np.int32)
  positions = np.asarray(sample.positions)
  prefix = np.asarray(prefix_lengths, np.int32)[:, None]
  first = np.argmax(np.asarray(sample.prompt_mask), axis=1)[:, None]  # first prompt slot
  cols = np.arange(segments.shape[1])[None, :]
  in_prefix = (cols >= first) & (cols < first + prefix)
  return {"tokens": sample.tokens, "positions": positions, "segment_ids": segments,
          "ref_segment_ids": np.where(in_prefix, 0, segments).astype(np.int32),
          "ref_positions": np.maximum(positions - prefix, 0).astype(np.int32),
          "mask": np.asarray(sample.generated_mask, np.float32),
          "weights": np.asarray(weights, np.float32),
          "rewards": np.asarray(rewards, np.float32)}


def sentencepiece_encoder(vocab_path: str = VOCAB_PATH):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"SentencePiece model not found: {vocab_path}")
  return spm.SentencePieceProcessor(model_file=vocab_path).encode


def write_clp_json(run_dir: str, rewards: Sequence[str], config: clp_lib.CLPConfig,
                   vocab_path: str) -> None:
  with open(os.path.join(run_dir, CLP_JSON), "w") as f:
    json.dump({"rewards": list(rewards), "clp": dataclasses.asdict(config),
               "vocab_path": vocab_path}, f, indent=1)


def read_clp_json(run_dir: str) -> tuple[list[str], clp_lib.CLPConfig, str]:
  """(rewards, CLPConfig, vocab path) of a train_clp run directory."""
  path = os.path.join(run_dir, CLP_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {run_dir} is not a train_clp run directory.")
  with open(path) as f:
    record = json.load(f)
  return record["rewards"], clp_lib.CLPConfig(**record["clp"]), record["vocab_path"]
