"""Sequence-level KL estimators against exact enumeration (Tiapkin et al. 2025,
arXiv 2502.02671: the Monte Carlo estimator of proxy and golden KL; V = 3, L = 3)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.distillation import sequence_kl as skl

V, L, BOS = 3, 3, 0


def _toy_logits(table, tokens):
  """Autoregressive toy model over V tokens, length L: a logits table per prefix.

  tokens [N, 1 + L] with BOS first; logits[:, i] (distribution of token i + 1)
  depend on tokens[:, 1:i + 1] only.
  """
  n, t = tokens.shape
  powers = V ** jnp.arange(t - 1)
  codes = jnp.stack([jnp.sum(tokens[:, 1:i + 1] * powers[:i], axis=-1)
                     for i in range(t)], axis=1)
  return table[jnp.arange(t)[None, :], codes]


class ToyModel:
  """tokens -> logits of one random table (seeded)."""

  def __init__(self, seed, scale=1.5):
    self.table = jnp.asarray(
        scale * np.random.default_rng(seed).standard_normal((L + 1, V ** L, V)), jnp.float32)

  def __call__(self, tokens):
    return _toy_logits_jit(self.table, tokens)


_toy_logits_jit = jax.jit(_toy_logits)


@functools.partial(jax.jit, static_argnums=2)
def _sample_table(table, key, n):
  tokens = jnp.full((n, 1 + L), BOS, jnp.int32)
  for i in range(1, L + 1):
    key, sub = jax.random.split(key)
    logits = _toy_logits(table, tokens)[:, i - 1]
    tokens = tokens.at[:, i].set(jax.random.categorical(sub, logits))
  return tokens


def _sample(logits_fn, key, n):
  return _sample_table(logits_fn.table, key, n)


@jax.jit
def _metrics_jit(p_table, q_table, tokens):
  mask = jnp.ones(tokens.shape).at[:, 0].set(0.0)
  return skl.sequence_kl_metrics(tokens, mask, _toy_logits(p_table, tokens),
                                 _toy_logits(q_table, tokens))


def _metrics(p_fn, q_fn, key, n):
  tokens = _sample(p_fn, key, n)
  return _metrics_jit(p_fn.table, q_fn.table, tokens)


def test_enumeration():
  seqs = skl.enumerate_sequences(V, L, bos=BOS)
  assert seqs.shape == (V ** L, 1 + L)
  assert len({tuple(s) for s in seqs}) == V ** L and np.all(seqs[:, 0] == BOS)


def test_toy_model_normalised_and_causal():
  p = ToyModel(0)
  seqs = jnp.asarray(skl.enumerate_sequences(V, L, bos=BOS))
  logp = jnp.sum(skl.next_token_logprobs(p(seqs), seqs), axis=-1)
  np.testing.assert_allclose(jnp.sum(jnp.exp(logp)), 1.0, rtol=1e-5)
  # logits[:, i] do not depend on tokens after position i
  logits = p(seqs)
  for i in range(L):
    changed = seqs.at[:, i + 1:].set((seqs[:, i + 1:] + 1) % V)
    np.testing.assert_array_equal(p(changed)[:, i], logits[:, i])


def test_exact_per_token_equals_exact_sequence_kl():
  p, q = ToyModel(0), ToyModel(1)
  exact = skl.exact_sequence_kl(p, q, V, L, bos=BOS)
  assert exact > 0.1
  np.testing.assert_allclose(skl.exact_expected_token_kl(p, q, V, L, bos=BOS), exact,
                             rtol=1e-5)
  np.testing.assert_allclose(skl.exact_sequence_kl(p, p, V, L, bos=BOS), 0.0, atol=1e-6)


def test_monte_carlo_matches_exact_enumeration():
  p, q = ToyModel(0), ToyModel(1)
  exact = skl.exact_sequence_kl(p, q, V, L, bos=BOS)
  m = _metrics(p, q, jax.random.PRNGKey(42), 100_000)
  for name in ("mc", "per_token"):
    est, se = float(m[name]["kl"]), float(m[name]["stderr"])
    assert se < 0.02 * exact, (name, se, exact)
    assert abs(est - exact) < 4 * se, (name, est, exact, se)
  # summing the full-vocabulary KL along the prefix integrates out token noise
  assert float(m["per_token"]["stderr"]) < float(m["mc"]["stderr"])
  # accumulable sums
  np.testing.assert_allclose(m["mc"]["sum"] / m["mc"]["count"], m["mc"]["kl"], rtol=1e-6)


def test_masks_left_padded_prompt_layout():
  """Prompt/padding positions do not count; only generated positions do."""
  p, q = ToyModel(0), ToyModel(1)
  tokens = _sample(p, jax.random.PRNGKey(0), 8)

  @jax.jit
  def run(tokens):
    mask = jnp.ones(tokens.shape).at[:, 0].set(0.0)
    full = skl.sequence_kl_metrics(tokens, mask, p(tokens), q(tokens))
    # pad two junk positions on the left (as the sampler's left padding), masked
    pad_tokens = jnp.concatenate([jnp.zeros((8, 2), jnp.int32), tokens], axis=1)
    pad_mask = jnp.concatenate([jnp.zeros((8, 2)), mask], axis=1)
    junk = jnp.ones((8, 2, V))
    lp = jnp.concatenate([junk, p(tokens)], axis=1)
    lq = jnp.concatenate([-junk, q(tokens)], axis=1)
    padded = skl.sequence_kl_metrics(pad_tokens, pad_mask, lp, lq)
    same = skl.sequence_kl_metrics(tokens, mask, p(tokens), p(tokens))
    return full, padded, same

  full, padded, same = run(tokens)
  for name in ("mc", "per_token"):
    np.testing.assert_allclose(padded[name]["per_sequence"], full[name]["per_sequence"],
                               rtol=1e-5, atol=1e-6)
  # with P == Q both estimators are 0
  assert float(same["mc"]["kl"]) == 0.0
  np.testing.assert_allclose(same["per_token"]["kl"], 0.0, atol=1e-6)


def test_sample_output_layout_with_the_sampler():
  """Rescored logits line up with the sampler's tokens and its model_logprobs."""
  from posttrain_jax.core import partitioning  # pylint: disable=g-import-not-at-top
  from posttrain_jax.inference.sampling import Sampler, SamplingConfig
  from posttrain_jax.models import ModelConfig, Transformer

  cfg = ModelConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8, mlp_dim=32, sliding_window_size=4)
  model = Transformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  rng = np.random.default_rng(0)
  # random weights without compiling init (std 0.5 matrices, 0.1 norm scales)
  params_p, params_q = (jax.tree.map(
      lambda x: jnp.asarray((0.5 if x.ndim > 1 else 0.1) * rng.standard_normal(x.shape),
                            x.dtype), nn.meta.unbox(shapes["params"])) for _ in range(2))
  mesh = partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1])
  sampler = Sampler(cfg, SamplingConfig(max_new_tokens=6, eos_id=None), mesh,
                    max_cache_length=16)
  out = sampler(params_p, [[5, 6, 7], [9], [3, 4]], jax.random.key(0))

  @jax.jit
  def score(params, tokens, positions, segments):
    return model.apply({"params": params}, tokens, positions=positions, segment_ids=segments)

  segments = (out.prompt_mask | out.generated_mask).astype(jnp.int32)
  logits_p = score(params_p, out.tokens, out.positions, segments)
  logits_q = score(params_q, out.tokens, out.positions, segments)
  lp = skl.next_token_logprobs(logits_p, out.tokens)
  np.testing.assert_allclose(jnp.where(out.generated_mask, lp, 0.0), out.model_logprobs,
                             atol=2e-4)
  m = skl.sample_kl_metrics(out, logits_p, logits_q)
  # the sampler's own log-probs give the same MC estimate
  mc = skl.mc_sequence_kl(out.model_logprobs, skl.next_token_logprobs(logits_q, out.tokens),
                          out.generated_mask)
  np.testing.assert_allclose(mc["per_sequence"], m["mc"]["per_sequence"], rtol=1e-4, atol=1e-3)
  assert np.all(np.asarray(m["per_token"]["per_sequence"]) > 0)
