"""Sequence-level KL estimators for the proxy and golden metrics.

Tiapkin et al. 2025 ("On Teacher Hacking in Language Model Distillation",
arXiv 2502.02671) track two sequence-level divergences on held-out
prompts x:

    proxy  = D(pi_T, pi_S),   golden = D(pi*, pi_S),
    KL(P || Q) = E_{x} E_{y~P(.|x)} [log P(y|x) - log Q(y|x)],

with log P(y|x) = sum_t log p(y_t | x, y<t). Teacher hacking is the proxy
falling while the golden rises. The paper does not spell out its estimator
[M: reconstruction]; two unbiased ones are offered, both on sequences y
sampled from P (the teacher for the proxy, the oracle for the golden) at
temperature 1 without top-k/top-p (otherwise the samples are not from P):

  Monte Carlo      KL_hat = mean_i sum_t m_it [log p(y_it|.) - log q(y_it|.)]
  per-token exact  KL_hat = mean_i sum_t m_it KL(p(.|x, y_i,<t) || q(.|x, y_i,<t))

The second uses the chain rule KL(P||Q) = E_{y~P} sum_t KL(p(.|y<t) || q(.|y<t))
and sums the full-vocabulary KL along each sampled prefix (lower variance: the
last token's sampling noise is integrated out; exact when the expectation over
prefixes is taken exactly, see `exact_sequence_kl`).

Layout: tokens [batch, T] as in `sampling.SampleOutput` (prompt, then generated
tokens); logits [batch, T, vocab] from scoring the same tokens, so logits at
position i - 1 predict token i; mask [batch, T] marks the scored (generated)
tokens, e.g. `SampleOutput.generated_mask`. Position 0 is never scored.

Results hold sums over sequences plus the count ("sum", "sum_sq", "count") so
batches can be accumulated before dividing, and convenience "kl" (mean) and
"stderr" (standard error of the mean).
"""

from __future__ import annotations

from collections.abc import Callable
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.distillation import losses as distillation_losses

Array = jax.Array


def next_token_logprobs(logits: Array, tokens: Array) -> Array:
  """[b, T] log p(tokens[:, i] | tokens[:, :i]) from logits[:, i - 1]; 0 at i = 0."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(lp, [(0, 0), (1, 0)])


def _summarise(per_seq: Array) -> dict[str, Array]:
  n = per_seq.shape[0]
  s = jnp.sum(per_seq)
  s2 = jnp.sum(jnp.square(per_seq))
  mean = s / n
  var = jnp.maximum(s2 / n - jnp.square(mean), 0.0) * n / max(n - 1, 1)
  return {"kl": mean, "stderr": jnp.sqrt(var / n), "sum": s, "sum_sq": s2,
          "count": jnp.asarray(n, jnp.float32), "per_sequence": per_seq}


def mc_sequence_kl(logp_p: Array, logp_q: Array, mask: Array) -> dict[str, Array]:
  """Monte Carlo KL(P || Q) from sequences sampled from P.

  per_sequence_i = sum_t m_it (log p(y_it) - log q(y_it)); kl = its mean.

  Args:
    logp_p, logp_q: [b, T] per-token log-probabilities of the sampled tokens
      under P and Q (e.g. `next_token_logprobs`, or P's
      `SampleOutput.model_logprobs` when sampled at temperature 1).
    mask: [b, T] tokens to count.
  """
  mask = mask.astype(jnp.float32)
  per_seq = jnp.sum(mask * (logp_p.astype(jnp.float32) - logp_q.astype(jnp.float32)),
                    axis=-1)
  return _summarise(per_seq)


def expected_token_kl(logits_p: Array, logits_q: Array, mask: Array) -> dict[str, Array]:
  """Per-token exact KL summed along sampled prefixes (sequences sampled from P).

  per_sequence_i = sum_{t >= 1} m_it KL(p(.|y_i,<t) || q(.|y_i,<t)), with the
  distributions at position t given by logits[:, t - 1].
  """
  kl = distillation_losses.token_divergence(logits_q[:, :-1], logits_p[:, :-1],
                                            kind="forward_kl")["loss"]
  per_seq = jnp.sum(mask[:, 1:].astype(jnp.float32) * kl, axis=-1)
  return _summarise(per_seq)


def sequence_kl_metrics(tokens: Array, mask: Array, logits_p: Array,
                        logits_q: Array) -> dict[str, dict[str, Array]]:
  """Both estimators of KL(P || Q) on sequences sampled from P.

  For the proxy metric P is the teacher, for the golden metric the oracle, and
  Q the student; `tokens`/`mask` are the sampled sequences and their generated
  positions, `logits_*` the models' logits on `tokens`.
  """
  mc = mc_sequence_kl(next_token_logprobs(logits_p, tokens),
                      next_token_logprobs(logits_q, tokens), mask)
  return {"mc": mc, "per_token": expected_token_kl(logits_p, logits_q, mask)}


def sample_kl_metrics(sample, logits_p: Array, logits_q: Array) -> dict[str, dict[str, Array]]:
  """`sequence_kl_metrics` on a `sampling.SampleOutput` drawn from P.

  logits_*: each model's logits on sample.tokens, computed with
  positions=sample.positions and segment_ids = prompt_mask | generated_mask
  (left padding is then ignored). Only generated tokens are scored.
  """
  return sequence_kl_metrics(sample.tokens, sample.generated_mask, logits_p, logits_q)


# ---------------------------------------------------------------------------
# Exact enumeration (tiny vocabularies and lengths, for tests).

def enumerate_sequences(vocab_size: int, length: int, bos: int | None = None) -> np.ndarray:
  """All vocab_size**length sequences [N, length] (prefixed by bos if given)."""
  seqs = np.array(list(itertools.product(range(vocab_size), repeat=length)), np.int32)
  seqs = seqs.reshape(-1, length)
  if bos is not None:
    seqs = np.concatenate([np.full((len(seqs), 1), bos, np.int32), seqs], axis=1)
  return seqs


def exact_sequence_kl(logits_fn_p: Callable[[Array], Array],
                      logits_fn_q: Callable[[Array], Array],
                      vocab_size: int, length: int, bos: int = 0) -> float:
  """KL(P || Q) = sum_y P(y) (log P(y) - log Q(y)) over every y in V^length.

  logits_fn_*: tokens [N, 1 + length] (bos first) -> logits [N, 1 + length, V]
  with causal semantics (logits[:, i] depend on tokens[:, :i + 1] only).
  """
  seqs = jnp.asarray(enumerate_sequences(vocab_size, length, bos=bos))
  mask = jnp.ones(seqs.shape).at[:, 0].set(0.0)
  lp = jnp.sum(mask * next_token_logprobs(logits_fn_p(seqs), seqs), axis=-1)
  lq = jnp.sum(mask * next_token_logprobs(logits_fn_q(seqs), seqs), axis=-1)
  lp64 = np.asarray(lp, np.float64)
  return float(np.sum(np.exp(lp64) * (lp64 - np.asarray(lq, np.float64))))


def exact_expected_token_kl(logits_fn_p: Callable[[Array], Array],
                            logits_fn_q: Callable[[Array], Array],
                            vocab_size: int, length: int, bos: int = 0) -> float:
  """E_{y~P}[per-token exact KL] with the expectation over y taken exactly.

  Equals `exact_sequence_kl` by the chain rule (checked in the tests).
  """
  seqs = jnp.asarray(enumerate_sequences(vocab_size, length, bos=bos))
  mask = jnp.ones(seqs.shape).at[:, 0].set(0.0)
  logits_p = logits_fn_p(seqs)
  lp = np.asarray(jnp.sum(mask * next_token_logprobs(logits_p, seqs), axis=-1), np.float64)
  per_seq = np.asarray(expected_token_kl(logits_p, logits_fn_q(seqs), mask)["per_sequence"],
                       np.float64)
  return float(np.sum(np.exp(lp) * per_seq))
