"""Classifier-free guidance in the sampler (Cideron et al. 2024, arXiv 2410.06084)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.inference.sampling import (
    Sampler, SamplingConfig, generate, guided_logits, null_prompts)
from posttrain_jax.models import Transformer
from test_sampling import CFG, PROMPTS, params_for

MESH = partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1])
NULL = (1,)


@functools.lru_cache(maxsize=None)
def _sample(**kw):
  kw.setdefault("max_new_tokens", 6)
  return Sampler(CFG, SamplingConfig(**kw), MESH, max_cache_length=64)(
      params_for(CFG), PROMPTS, jax.random.key(3))


def test_gamma_one_equals_plain_sampling_token_for_token():
  plain = _sample(eos_id=None)
  guided = _sample(eos_id=None, guidance=1.0, null_prompt=NULL)
  np.testing.assert_array_equal(plain.tokens, guided.tokens)
  np.testing.assert_array_equal(plain.positions, guided.positions)
  np.testing.assert_allclose(plain.model_logprobs, guided.model_logprobs, atol=1e-5)


_forward = jax.jit(lambda p, x: Transformer(CFG).apply({"params": p}, x))


def _last_logits(params, seq, length=16):
  """Logits after seq, from one fixed-shape forward (causal: right padding is unseen)."""
  return _forward(params, jnp.asarray([seq + [0] * (length - len(seq))]))[0, len(seq) - 1]


def _guided_reference(params, prompt, gamma, n):
  """Greedy CFG decoding by full recomputation of both branches (no cache)."""
  seq, out = list(prompt), []
  for _ in range(n):
    cond = _last_logits(params, seq)
    uncond = _last_logits(params, list(NULL) + out)
    tok = int(jnp.argmax(gamma * cond + (1 - gamma) * uncond))
    seq.append(tok)
    out.append(tok)
  return out


def test_guided_greedy_equals_recomputed_cfg_and_differs_from_plain():
  params = params_for(CFG)
  gamma = 3.0
  out = _sample(greedy=True, eos_id=None, guidance=gamma, null_prompt=NULL)
  plain = _sample(greedy=True, eos_id=None)
  for row in (0, 1):  # new tokens 1-4 of two prompts (padded and not)
    assert np.asarray(out.tokens[row, -6:-2]).tolist() == _guided_reference(
        params, PROMPTS[row], gamma, 4)
  assert not np.array_equal(out.tokens, plain.tokens)  # guidance changes something


def test_guided_model_logprobs_are_log_softmax_of_guided_logits():
  params = params_for(CFG)
  gamma = 3.0
  out = _sample(greedy=True, eos_id=None, guidance=gamma, null_prompt=NULL)
  model = Transformer(CFG)
  prompt = PROMPTS[1]
  gen = np.asarray(out.tokens[1, -6:]).tolist()
  cond = model.apply({"params": params}, jnp.asarray([prompt + gen]))[0]
  uncond = model.apply({"params": params}, jnp.asarray([list(NULL) + gen]))[0]
  lp = jax.nn.log_softmax(guided_logits(cond[len(prompt) - 1:-1], uncond[:-1], gamma))
  want = np.take_along_axis(np.asarray(lp), np.asarray(gen)[:, None], -1)[:, 0]
  np.testing.assert_allclose(out.model_logprobs[1, -6:], want, atol=1e-4)


def test_guided_logits_equation():
  c, u = jnp.array([1.0, 2.0, -3.0]), jnp.array([0.5, -1.0, 4.0])
  np.testing.assert_allclose(guided_logits(c, u, 3.0), 3 * c - 2 * u)
  np.testing.assert_array_equal(guided_logits(c, u, 1.0), c)
  np.testing.assert_array_equal(guided_logits(c, u, 0.0), u)


def test_bad_settings_rejected():
  with pytest.raises(ValueError, match="null_prompt"):
    SamplingConfig(guidance=3.0, null_prompt=())
  with pytest.raises(ValueError, match="finite"):
    SamplingConfig(guidance=float("nan"))
  with pytest.raises(ValueError, match="null_prompt has 3 tokens"):
    null_prompts((1, 1, 1), batch=2, prompt_len=2)
  with pytest.raises(ValueError, match="null_prompt has 3 tokens"):
    generate(Transformer(CFG), params_for(CFG), jnp.ones((1, 2), jnp.int32),
             jnp.array([2]), jax.random.key(0),
             SamplingConfig(max_new_tokens=2, guidance=2.0, null_prompt=(1, 1, 1)))
