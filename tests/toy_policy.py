"""A toy policy whose every response can be enumerated (shared by the exact-
gradient tests of the policy-optimization algorithms).

The policy is a table of next-token logits per position (no dependence on the
prefix), so pi(y) = prod_t softmax(w_{t-1})[y_t] over V^L responses. At w = 0
the policy is uniform, so a batch that holds every response exactly once is an
exact expectation under pi.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

V, L = 3, 3          # vocabulary, response length
T = L + 1            # one prompt token, then the response


class TablePolicy(nn.Module):
  """logits[b, t] = w[t] for every row: pi(y_t | y_<t) = softmax(w[t - 1])."""

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None):
    del positions, segment_ids
    w = self.param("w", nn.initializers.zeros, (T, V))
    return jnp.broadcast_to(w[None], (tokens.shape[0], T, V))


RESPONSES = np.array(list(itertools.product(range(V), repeat=L)), np.int32)  # [V^L, L]
N = len(RESPONSES)


def batch(rewards, order=None):
  """Every response once (rows permuted by `order`), one prompt token each."""
  responses = RESPONSES if order is None else RESPONSES[order]
  tokens = np.concatenate([np.zeros((N, 1), np.int32), responses], axis=1)
  mask = np.concatenate([np.zeros((N, 1)), np.ones((N, L))], axis=1).astype(np.float32)
  return {"tokens": jnp.asarray(tokens), "positions": jnp.tile(jnp.arange(T), (N, 1)),
          "segment_ids": jnp.ones((N, T), jnp.int32), "mask": jnp.asarray(mask),
          "rewards": jnp.asarray(rewards, jnp.float32)}


def token_log_pi(w, responses=RESPONSES):
  """[n, L] log pi_w(y_t) of each response token, by enumeration (no project code)."""
  logp = jax.nn.log_softmax(w[:L], axis=-1)               # row t-1 predicts y_t
  return logp[jnp.arange(L)[None], responses]


def log_pi(w, responses=RESPONSES):
  """[n] log pi_w(y) of every response."""
  return jnp.sum(token_log_pi(w, responses), axis=-1)
