"""Greedy soup (Wortsman et al., 2022, "Model soups: averaging weights of
multiple fine-tuned models improves accuracy without increasing inference
time", arXiv 2203.05482, Recipe 1):

  sort the candidates by their own held-out metric, best first;
  soup = {best};  for each next candidate c:
    if metric(average(soup + {c})) >= metric(average(soup)): soup += {c}
  return average(soup).

The metric is any held-out score where higher is better (e.g. a reward
model's preference accuracy on held-out pairs); with `strict=True` a candidate
joins only if it strictly improves it. `average` is WARM's uniform weight
average. The function is pure given a deterministic metric; `make_soup` lets a
caller build each candidate soup its own way (e.g. leaf by leaf from orbax).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

from posttrain_jax.merging.interpolation import average


@dataclasses.dataclass
class SoupResult:
  params: Any                  # the greedy soup
  members: list[int]           # indices (into the candidates) in the soup, in order added
  individual: list[float]      # metric of every candidate alone
  history: list[tuple[int, float, bool]]  # (candidate, metric of soup + it, kept)
  metric: float                # metric of the returned soup


def greedy_soup(candidates: Sequence[Any], metric: Callable[[Any], float], *,
                strict: bool = False,
                make_soup: Callable[[list[int]], Any] | None = None) -> SoupResult:
  """Greedy soup of `candidates` (parameter trees) under a held-out `metric`.

  Args:
    candidates: M fine-tuned parameter trees of one architecture (or, with
      `make_soup`, any M handles, e.g. directories).
    metric: params -> held-out score, higher is better.
    strict: add a candidate only if the score strictly improves (the paper: >=).
    make_soup: member indices -> averaged params; default `average` of the trees.
  """
  if not candidates:
    raise ValueError("Nothing to merge: give at least one candidate model.")
  soup_of = make_soup or (lambda idx: average([candidates[i] for i in idx]))
  individual = [float(metric(soup_of([i]))) for i in range(len(candidates))]
  order = sorted(range(len(candidates)), key=lambda i: -individual[i])
  members, best = [order[0]], individual[order[0]]
  params = soup_of(members)
  history = [(order[0], best, True)]
  for i in order[1:]:
    trial = soup_of(members + [i])
    score = float(metric(trial))
    kept = score > best if strict else score >= best
    history.append((i, score, kept))
    if kept:
      members, best, params = members + [i], score, trial
  return SoupResult(params, members, individual, history, best)
