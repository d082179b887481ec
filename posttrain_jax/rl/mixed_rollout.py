"""Rollouts whose rows come from several models (policy and anchor).

Algorithms that learn from samples of the anchor as well as of the policy (BOND,
J-BOND: `bond.py`) declare `row_sources(samples_per_prompt)`, the source of each
position in a prompt's group of consecutive rows ("policy" or "anchor");
`sample` draws each source's rows with its params and puts them back in the
group order, so the batch reaches `policy_optimization.policy_step` unchanged.
`reset_anchor` is the hard anchor update theta_anchor <- theta (iterative BOND).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = ("policy", "anchor")


def row_sources(algorithm, samples_per_prompt: int) -> tuple[str, ...] | None:
  """The algorithm's per-position sources, None when every row is the policy's."""
  fn = getattr(algorithm, "row_sources", None)
  if fn is None:
    return None
  sources = tuple(fn(samples_per_prompt))
  bad = [s for s in sources if s not in SOURCES]
  if len(sources) != samples_per_prompt or bad:
    raise ValueError(f"{algorithm.name}.row_sources gave {sources}; it must name one of "
                     f"{SOURCES} for each of the {samples_per_prompt} samples per prompt.")
  return sources


def sample(sampler, params_by_source, prompt_list, rng, prompt_length: int,
           sources: tuple[str, ...]):
  """SampleOutput of prompt_list (groups of len(sources) consecutive rows); row
  i drawn from params_by_source[sources[i % G]] with rng fold_in(rng, source)."""
  g = len(sources)
  index = {s: [i for i in range(len(prompt_list)) if sources[i % g] == s] for s in SOURCES}
  parts, order = [], []
  for n, source in enumerate(SOURCES):
    rows = index[source]
    if rows:
      parts.append(sampler(params_by_source[source], [prompt_list[i] for i in rows],
                           jax.random.fold_in(rng, n), prompt_length=prompt_length))
      order += rows
  inverse = np.argsort(np.asarray(order))
  fields = {f.name: jnp.take(jnp.concatenate([getattr(p, f.name) for p in parts]),
                             inverse, axis=0)
            for f in dataclasses.fields(parts[0])}
  return type(parts[0])(**fields)


def reset_anchor(state):
  """PolicyState with anchor_params = a copy of params (hard anchor update)."""
  if state.anchor_params is None:
    raise ValueError("A hard anchor reset needs anchor = 'ema' (a stored anchor).")
  return state.replace(anchor_params=jax.tree.map(jnp.copy, state.params))
