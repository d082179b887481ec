"""Scanned <-> unscanned parameter layouts of the Gemma 2 decoder.

Unscanned (`scan_layers=False`): one subtree per layer, `layer_{i}/...`.
Scanned (`scan_layers=True`): `layers/{type}_{j}/...` for each position j of
`attention_pattern`, every leaf stacked on a leading axis over the groups:
layer i is group i // len(pattern), position i % len(pattern).

The functions are generic over leaves: numpy or jax arrays, or anything the
given `stack` / `take` functions handle (e.g. ShapeDtypeStructs with shardings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from posttrain_jax.models.config import ModelConfig

Params = dict[str, Any]


def is_scanned(params: Params) -> bool:
  """Whether a parameter tree is in the scanned layout."""
  return "layers" in params


def scanned_name(cfg: ModelConfig, position: int) -> str:
  """Name of pattern position `position`'s subtree under `layers/`."""
  return f"{cfg.attention_pattern[position]}_{position}"


def _check_divisible(cfg: ModelConfig) -> int:
  period = len(cfg.attention_pattern)
  if cfg.num_layers % period:
    raise ValueError(f"The scanned layout needs num_layers ({cfg.num_layers}) "
                     f"divisible by len(attention_pattern) ({period}).")
  return cfg.num_layers // period


def _map(fn: Callable, *trees):
  if isinstance(trees[0], dict):
    return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


def scan_params(params: Params, cfg: ModelConfig,
                stack: Callable[[list], Any] = np.stack) -> Params:
  """Unscanned -> scanned; `stack` joins the groups' leaves (default np.stack)."""
  if is_scanned(params):
    return params
  groups = _check_divisible(cfg)
  period = len(cfg.attention_pattern)
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = {
      scanned_name(cfg, j): _map(
          lambda *leaves: stack(list(leaves)),
          *(params[f"layer_{g * period + j}"] for g in range(groups)))
      for j in range(period)}
  return out


def unscan_params(params: Params, cfg: ModelConfig,
                  take: Callable[[Any, int], Any] = lambda x, i: x[i]) -> Params:
  """Scanned -> unscanned; `take(leaf, g)` selects group g (default x[g])."""
  if not is_scanned(params):
    return params
  groups = _check_divisible(cfg)
  period = len(cfg.attention_pattern)
  out = {k: v for k, v in params.items() if k != "layers"}
  for g in range(groups):
    for j in range(period):
      sub = params["layers"][scanned_name(cfg, j)]
      out[f"layer_{g * period + j}"] = _map(lambda x, g=g: take(x, g), sub)
  return out


def to_layout(params: Params, cfg: ModelConfig, scanned: bool, *,
              stack: Callable[[list], Any] = np.stack,
              take: Callable[[Any, int], Any] = lambda x, i: x[i]) -> Params:
  """Converts `params` to the scanned (True) or unscanned (False) layout."""
  return scan_params(params, cfg, stack) if scanned else unscan_params(params, cfg, take)
