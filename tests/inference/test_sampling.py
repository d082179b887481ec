"""KV-cache sampling: equals full recomputation, padding-invariant, exact log-probs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.inference.sampling import Sampler, SamplingConfig, sampling_log_probs
from posttrain_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, sliding_window_size=3)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
ONE = jax.devices()[:1]


@functools.lru_cache(maxsize=None)
def params_for(cfg):
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  # larger weights than the init so the toy model's argmax is not constant
  return jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p, params)


_SAMPLERS = {}


def sampler(cfg=CFG, devices=ONE, ici=None, **kw):
  """Cached per configuration: each Sampler compiles its own decode loop."""
  kw.setdefault("max_new_tokens", 8)
  key = (cfg, devices is None, tuple(sorted((ici or {}).items())), tuple(sorted(kw.items())))
  if key not in _SAMPLERS:
    mesh = partitioning.create_mesh(ici or {"data": 1}, devices=devices)
    _SAMPLERS[key] = Sampler(cfg, SamplingConfig(**kw), mesh, max_cache_length=64)
  return _SAMPLERS[key]


def full_forward(cfg, params, out):
  """Logits of the whole left-padded output, recomputed without a cache."""
  segments = (out.prompt_mask | out.generated_mask).astype(jnp.int32)
  return Transformer(cfg).apply({"params": params}, out.tokens, positions=out.positions,
                                segment_ids=segments)


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_equals_argmax_of_full_recomputation(scan):
  cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": scan})
  params = params_for(cfg)
  out = sampler(cfg, greedy=True, eos_id=None)(params, PROMPTS, jax.random.key(0))
  # Full recomputation without a cache: every sequence right-padded to one
  # length (causal attention: the padding after position t cannot change its
  # logits), one compiled forward for all 8 decode steps.
  forward = jax.jit(lambda tokens: Transformer(cfg).apply({"params": params}, tokens))
  seqs = [list(p) for p in PROMPTS]
  width = max(map(len, PROMPTS)) + 8
  for _ in range(8):  # 1-8 new tokens: past the window of 3
    logits = forward(jnp.asarray([q + [0] * (width - len(q)) for q in seqs]))
    for row, q in enumerate(seqs):
      q.append(int(jnp.argmax(logits[row, len(q) - 1])))
  for row, prompt in enumerate(PROMPTS):
    assert np.asarray(out.tokens[row, -8:]).tolist() == seqs[row][len(prompt):]
  assert len({tuple(np.asarray(r[-8:]).tolist()) for r in out.tokens}) > 1


def test_log_probs_equal_the_full_forward_pass():
  params = params_for(CFG)
  config = dict(temperature=0.7, top_k=20, top_p=0.9, eos_id=None)
  out = sampler(**config)(params, PROMPTS, jax.random.key(3))
  logits = full_forward(CFG, params, out)
  # the token at position t is predicted by the logits at t - 1
  pred = logits[:, :-1]
  tokens = out.tokens[:, 1:]
  mask = out.generated_mask[:, 1:]
  model_lp = jnp.take_along_axis(jax.nn.log_softmax(pred), tokens[..., None], -1)[..., 0]
  sample_lp = jnp.take_along_axis(sampling_log_probs(pred, SamplingConfig(**config)),
                                  tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.where(mask, model_lp, 0), out.model_logprobs[:, 1:],
                             atol=2e-5)
  np.testing.assert_allclose(np.where(mask, sample_lp, 0), out.sampling_logprobs[:, 1:],
                             atol=2e-5)
  assert np.all(np.asarray(out.sampling_logprobs) <= 1e-6)


def test_prefill_by_the_training_kernels_equals_the_full_forward_pass():
  """Prefill (CacheInfo.fresh) runs the blocked local and causal kernels over
  left-padded prompts longer than 2 windows and 1 causal block; the log-probs
  of every generated token still equal a full forward pass."""
  cfg = ModelConfig(**{**CFG.__dict__, "causal_block_size": 4})
  params = params_for(cfg)
  prompts = [list(range(3, 15)), [40, 41, 42, 43, 44, 45, 46], [50]]
  out = sampler(cfg, temperature=1.0, eos_id=None)(params, prompts, jax.random.key(2))
  pred, tokens = full_forward(cfg, params, out)[:, :-1], out.tokens[:, 1:]
  model_lp = jnp.take_along_axis(jax.nn.log_softmax(pred), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.where(out.generated_mask[:, 1:], model_lp, 0),
                             out.model_logprobs[:, 1:], atol=2e-5)


def test_padding_does_not_change_results():
  params = params_for(CFG)
  s = sampler(temperature=1.0, eos_id=None)
  a = s(params, PROMPTS, jax.random.key(7))
  b = s(params, PROMPTS, jax.random.key(7), prompt_length=9)
  np.testing.assert_array_equal(a.tokens[:, -8:], b.tokens[:, -8:])
  np.testing.assert_allclose(a.model_logprobs[:, -8:], b.model_logprobs[:, -8:], atol=1e-5)
  np.testing.assert_array_equal(a.generated_mask[:, -8:], b.generated_mask[:, -8:])


def test_top_k_one_equals_greedy():
  params = params_for(CFG)
  greedy = sampler(greedy=True, eos_id=None)(params, PROMPTS, jax.random.key(0))
  top1 = sampler(top_k=1, temperature=0.8, eos_id=None)(params, PROMPTS, jax.random.key(5))
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  np.testing.assert_allclose(greedy.model_logprobs, top1.model_logprobs, atol=1e-6)


def test_stop_at_eos_per_sequence():
  params = params_for(CFG)
  free = sampler(greedy=True, eos_id=None)(params, PROMPTS, jax.random.key(0))
  eos = int(free.tokens[1, -8 + 2])  # row 1 emits this as its third new token
  out = sampler(greedy=True, eos_id=eos, pad_id=0)(params, PROMPTS, jax.random.key(0))
  gen = np.asarray(out.tokens[:, -8:])
  for row in range(len(PROMPTS)):
    free_row = np.asarray(free.tokens[row, -8:]).tolist()
    stop = free_row.index(eos) + 1 if eos in free_row else 8
    assert int(out.num_generated[row]) == stop
    assert gen[row, :stop].tolist() == free_row[:stop]
    assert (gen[row, stop:] == 0).all()
    assert np.asarray(out.generated_mask[row, -8:]).tolist() == [True] * stop + [False] * (8 - stop)
  assert int(out.num_generated[1]) <= 3


def test_sampling_is_deterministic_per_key():
  params = params_for(CFG)
  s = sampler(temperature=1.5, eos_id=None)
  a, b = s(params, PROMPTS, jax.random.key(1)), s(params, PROMPTS, jax.random.key(1))
  c = s(params, PROMPTS, jax.random.key(2))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_sharded_sampler_matches_single_device():
  params = params_for(CFG)
  prompts = PROMPTS + [[1, 2], [3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13], [14, 15]]
  a = sampler(greedy=True, eos_id=None)(params, prompts, jax.random.key(0))
  b = sampler(greedy=True, eos_id=None, devices=None,
              ici={"data": 2, "fsdp": 2, "tensor": 2})(params, prompts, jax.random.key(0))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.model_logprobs, b.model_logprobs, atol=1e-5)


def test_nucleus_and_top_k_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  lp = sampling_log_probs(logits, SamplingConfig(top_p=0.7))
  np.testing.assert_allclose(jnp.exp(lp), [[0.5 / 0.8, 0.3 / 0.8, 0, 0]], atol=1e-6)
  lp = sampling_log_probs(logits, SamplingConfig(top_p=0.5))
  np.testing.assert_allclose(jnp.exp(lp), [[1, 0, 0, 0]], atol=1e-6)
  lp = sampling_log_probs(logits, SamplingConfig(top_k=3, temperature=1.0))
  np.testing.assert_allclose(jnp.exp(lp), [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]], atol=1e-6)
  lp = sampling_log_probs(logits, SamplingConfig(temperature=2.0))
  expected = np.sqrt([0.5, 0.3, 0.15, 0.05])
  np.testing.assert_allclose(jnp.exp(lp)[0], expected / expected.sum(), atol=1e-6)


def test_bad_prompts_are_rejected():
  params = params_for(CFG)
  s = sampler(greedy=True)
  with pytest.raises(ValueError, match="Prompt 1 is empty"):
    s(params, [[1, 2], []], jax.random.key(0))
  with pytest.raises(ValueError, match=r"token id 64, outside \[0, vocab_size=64\)"):
    s(params, [[1, 64]], jax.random.key(0))
  with pytest.raises(ValueError, match="exceeds the cache length 64"):
    s(params, [list(range(1, 60))], jax.random.key(0))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    SamplingConfig(temperature=0.0)
