"""Batched autoregressive sampling with a KV cache, compiled as one program.

Prompts are left-padded to a common length P so every sequence's last prompt
token sits in cache slot P - 1 and new token i goes to slot P + i for the whole
batch. RoPE positions count real tokens only and padded slots are masked, so
results do not depend on the padding. Prefill runs the prompt block through the
model once; decoding is a `lax.while_loop` (one token per iteration, stopping
early once every sequence has emitted EOS).

Each generated token carries two log-probabilities: under the sampling
distribution (temperature, top-k, top-p applied; 0 for greedy) and under the
untempered model (log_softmax of the logits), as the trainers need both.

Classifier-free guidance (`SamplingConfig.guidance = gamma`; Cideron et al.
2024, arXiv 2410.06084, after Ho & Salimans 2022): the condition is the prompt
and the unconditional branch is the same model with the prompt replaced by
`null_prompt`. Both branches run as one batched forward of 2B rows (prompts,
then null prompts), each with its own KV cache rows, and each token is drawn
from the guided logits

    l_gamma = gamma * l(.|y<t, c) + (1 - gamma) * l(.|y<t, null)

(`guided_logits`); the chosen token is fed to both branches. gamma = 1 is plain
sampling (token for token: 1 * l_c + 0 * l_u == l_c). The default null prompt
(0,) is the decoder's start token of the t5x layout our LMs are trained in
(inputs = targets shifted right with 0 first: segment id 1, position 0), so
l(.|y<t, null) is the model's own distribution at a document start, the
unconditional branch a plain LM already learned; a prefix-LM trained on
(prompt, response) pairs needs condition dropout for it instead. With guidance,
model_logprobs are those of softmax(l_gamma) (the guided model). guidance=None
(the default) runs the plain program unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.core import partitioning
from posttrain_jax.core.argmax import argmax
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models.attention import CacheInfo
from posttrain_jax.models.gemma2 import init_cache

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens. greedy overrides temperature/top_k/top_p."""

  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  greedy: bool = False
  eos_id: int | None = 1
  pad_id: int = 0
  guidance: float | None = None           # CFG gamma; None: no unconditional branch
  null_prompt: tuple[int, ...] = (0,)     # the dropped condition (see module docstring)

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (or use greedy), got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.guidance is not None and not np.isfinite(self.guidance):
      raise ValueError(f"guidance (CFG gamma) must be a finite number or None, got "
                       f"{self.guidance}.")
    if self.guidance is not None and not self.null_prompt:
      raise ValueError("guidance needs a non-empty null_prompt (the token ids that stand "
                       "for the dropped condition), e.g. null_prompt=(0,).")


def guided_logits(cond: jax.Array, uncond: jax.Array, gamma: float) -> jax.Array:
  """Classifier-free guidance (Cideron et al. 2024, arXiv 2410.06084, Sec. 2):

      l_gamma = gamma * l(.|y<t, c) + (1 - gamma) * l(.|y<t, null)

  in float32; gamma = 1 returns cond exactly (for finite uncond)."""
  cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
  return gamma * cond + (1.0 - gamma) * uncond


def null_prompts(null_prompt: Sequence[int], batch: int, prompt_len: int,
                 pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """The unconditional branch's prompts: `null_prompt` left-padded to prompt_len,
  [batch, prompt_len], and their lengths [batch]."""
  n = len(null_prompt)
  if not 0 < n <= prompt_len:
    raise ValueError(f"null_prompt has {n} tokens; it needs 1 to prompt length "
                     f"{prompt_len}. Shorten null_prompt or lengthen the prompts.")
  row = jnp.concatenate([jnp.full((prompt_len - n,), pad_id, jnp.int32),
                         jnp.asarray(null_prompt, jnp.int32)])
  return (jnp.broadcast_to(row, (batch, prompt_len)),
          jnp.full((batch,), n, jnp.int32))


@flax.struct.dataclass
class SampleOutput:
  """[batch, P + max_new_tokens] arrays in the left-padded layout.

  tokens: prompt (left-padded with pad_id) then generated tokens (pad_id after a
    sequence stops). generated_mask / prompt_mask: which positions are which.
  positions: RoPE positions (0 at each sequence's first real token), usable with
    segment_ids = prompt_mask | generated_mask to score the sequences again.
  sampling_logprobs / model_logprobs: 0 outside generated positions.
  num_generated: [batch] generated tokens per sequence, EOS included.
  """

  tokens: jax.Array
  prompt_mask: jax.Array
  generated_mask: jax.Array
  positions: jax.Array
  sampling_logprobs: jax.Array
  model_logprobs: jax.Array
  num_generated: jax.Array


def sampling_log_probs(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """log p of the sampling distribution: softmax(logits / T) restricted to the top-k
  tokens and to the smallest set whose probability reaches top_p (nucleus), renormalised."""
  logits = logits.astype(jnp.float32) / config.temperature
  if config.top_k is not None and config.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if config.top_p is not None and config.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep a token if the mass strictly before it is below top_p (always >= 1 token)
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff_index = jnp.sum(before < config.top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def _pick(logits, rng, config: SamplingConfig):
  model_lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if config.greedy:
    token = argmax(logits)
    sample_lp = jnp.zeros(token.shape, jnp.float32)
  else:
    lp = sampling_log_probs(logits, config)
    token = jax.random.categorical(rng, lp, axis=-1)
    sample_lp = jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
  model_lp = jnp.take_along_axis(model_lp, token[:, None], axis=-1)[:, 0]
  return token.astype(jnp.int32), sample_lp, model_lp


def generate(model: Transformer, params, prompts: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, config: SamplingConfig) -> SampleOutput:
  """Samples max_new_tokens after left-padded prompts [batch, P]; jit-able.

  With config.guidance, the model runs on 2 * batch rows (prompts, then null
  prompts) and tokens come from the guided logits (module docstring)."""
  batch, prompt_len = prompts.shape
  guided = config.guidance is not None
  if guided:
    nulls, null_lengths = null_prompts(config.null_prompt, batch, prompt_len, config.pad_id)
    prompts = jnp.concatenate([prompts, nulls], axis=0)
    prompt_lengths = jnp.concatenate([prompt_lengths, null_lengths], axis=0)
    combine = lambda l: guided_logits(l[:batch], l[batch:], config.guidance)
    both = lambda t: jnp.concatenate([t, t], axis=0)
  else:
    combine = both = lambda x: x
  rows = prompts.shape[0]
  total = prompt_len + config.max_new_tokens
  slots = jnp.arange(total, dtype=jnp.int32)
  pad = (prompt_len - prompt_lengths)[:, None]                # [B, 1]
  cache_segments = (slots[None, :] >= pad).astype(jnp.int32)  # 0 on left padding
  positions = jnp.maximum(slots[None, :] - pad, 0)            # [B, total]
  # a model object may bring its own cache layout (rl/clp.ConditionedPolicy: one per copy)
  cache = (model.init_cache(rows, total) if hasattr(model, "init_cache")
           else init_cache(model.config, rows, total))

  logits, cache = model.apply(
      {"params": params}, prompts, positions=positions[:, :prompt_len],
      segment_ids=cache_segments[:, :prompt_len], cache=cache,
      cache_info=CacheInfo(jnp.int32(0), cache_segments, fresh=True),
      last_logits_only=True)
  n = config.max_new_tokens
  init = dict(step=jnp.int32(0), cache=cache, logits=logits[:, -1],
              tokens=jnp.full((batch, n), config.pad_id, jnp.int32),
              sample_lp=jnp.zeros((batch, n), jnp.float32),
              model_lp=jnp.zeros((batch, n), jnp.float32),
              done=jnp.zeros((batch,), bool), num=jnp.zeros((batch,), jnp.int32))

  def cond(s):
    return (s["step"] < n) & ~jnp.all(s["done"])

  def body(s):
    i = s["step"]
    token, sample_lp, model_lp = _pick(combine(s["logits"]), jax.random.fold_in(rng, i),
                                       config)
    live = ~s["done"]
    token = jnp.where(live, token, config.pad_id)
    s = dict(s,
             tokens=s["tokens"].at[:, i].set(token),
             sample_lp=s["sample_lp"].at[:, i].set(jnp.where(live, sample_lp, 0.0)),
             model_lp=s["model_lp"].at[:, i].set(jnp.where(live, model_lp, 0.0)),
             num=s["num"] + live.astype(jnp.int32))
    if config.eos_id is not None:
      s["done"] = s["done"] | (live & (token == config.eos_id))
    slot = prompt_len + i
    logits, cache = model.apply(
        {"params": params}, both(token)[:, None],
        positions=jax.lax.dynamic_slice_in_dim(positions, slot, 1, axis=1),
        segment_ids=jnp.ones((rows, 1), jnp.int32), cache=s["cache"],
        cache_info=CacheInfo(slot, cache_segments))
    return dict(s, step=i + 1, cache=cache, logits=logits[:, 0])

  s = jax.lax.while_loop(cond, body, init)
  generated = jnp.arange(n)[None, :] < s["num"][:, None]
  pad, positions, prompts = pad[:batch], positions[:batch], prompts[:batch]
  prompt_mask = (slots[None, :prompt_len] >= pad)
  zeros = jnp.zeros((batch, prompt_len))
  return SampleOutput(
      tokens=jnp.concatenate([prompts, s["tokens"]], axis=1),
      prompt_mask=jnp.concatenate([prompt_mask, jnp.zeros_like(generated)], axis=1),
      generated_mask=jnp.concatenate([jnp.zeros_like(prompt_mask), generated], axis=1),
      positions=positions,
      sampling_logprobs=jnp.concatenate([zeros, s["sample_lp"]], axis=1),
      model_logprobs=jnp.concatenate([zeros, s["model_lp"]], axis=1),
      num_generated=s["num"])


def left_pad(prompts: Sequence[Sequence[int]], vocab_size: int, pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Validates token-id prompts and left-pads them to `length` (default: longest)."""
  if not prompts:
    raise ValueError("No prompts given.")
  lengths = np.array([len(p) for p in prompts], np.int32)
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"Prompt {i} is empty; every prompt needs at least one token.")
    arr = np.asarray(p)
    if arr.min() < 0 or arr.max() >= vocab_size:
      bad = int(arr.max() if arr.max() >= vocab_size else arr.min())
      raise ValueError(f"Prompt {i} contains token id {bad}, outside [0, vocab_size="
                       f"{vocab_size}).")
  length = int(lengths.max()) if length is None else length
  if lengths.max() > length:
    raise ValueError(f"Prompt {int(lengths.argmax())} has {int(lengths.max())} tokens, "
                     f"longer than the prompt length {length}.")
  out = np.full((len(prompts), length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    out[i, length - len(p):] = p
  return out, lengths


class Sampler:
  """Jitted, sharded `generate` for one model and sampling config.

  Params are sharded like the trainer's (logical axis rules); prompts and
  outputs are sharded over the batch axes. `max_cache_length` bounds prompt
  length + max_new_tokens.
  """

  def __init__(self, model_config: ModelConfig, config: SamplingConfig,
               mesh: jax.sharding.Mesh, rules=partitioning.DEFAULT_RULES,
               max_cache_length: int | None = None):
    self.model = Transformer(model_config)
    self.config, self.mesh, self.rules = config, mesh, rules
    self.max_cache_length = max_cache_length
    _, self.param_shardings = partitioning.params_and_shardings(
        lambda: self.model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
        mesh, rules)
    batch = partitioning.batch_sharding(mesh, rules)
    lengths = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch.spec[0]))
    self._prompt_shardings = (batch, lengths)
    self._generate = jax.jit(
        functools.partial(generate, self.model, config=config),
        in_shardings=(self.param_shardings, batch, lengths, None))

  def __call__(self, params, prompts: Sequence[Sequence[int]], rng: jax.Array,
               prompt_length: int | None = None) -> SampleOutput:
    """Samples continuations of token-id prompts (lists of ints)."""
    tokens, lengths = left_pad(prompts, self.model.config.vocab_size,
                               self.config.pad_id, prompt_length)
    total = tokens.shape[1] + self.config.max_new_tokens
    if self.max_cache_length is not None and total > self.max_cache_length:
      raise ValueError(
          f"Prompt length {tokens.shape[1]} + max_new_tokens {self.config.max_new_tokens}"
          f" = {total} exceeds the cache length {self.max_cache_length}; shorten the "
          "prompt or raise max_cache_length.")
    if jax.process_count() > 1:  # the same host prompts on every process: global arrays
      tokens, lengths = (jax.make_array_from_callback(x.shape, sharding, lambda i, x=x: x[i])
                         for x, sharding in zip((tokens, lengths), self._prompt_shardings))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._generate(params, tokens, lengths, rng)
