"""Conditioned Language Policies (CLP): one policy steerable by a reward weighting w.

Wang et al. 2024, "Conditional Language Policy: A General Framework for
Steerable Multi-Objective Finetuning", arXiv 2407.15762. With rewards r_1..r_m
and a weighting w on the simplex Delta^m, one policy pi_theta(.|x, w) is trained on

    max_theta  E_{w ~ Q} E_x [ E_{y ~ pi_theta(.|x, w)} [w . r(x, y)]
                               - alpha KL(pi_theta(.|x, w) || pi_ref(.|x)) ]

(`rl/clp_training.py` has the REINFORCE step). The KL-regularised optimum for a
fixed w is the geometric mixture of the single-reward optima (`optimal_policy`):

    pi*_w(y|x)  propto  pi_ref(y|x) exp(w . r(x, y) / alpha)  =  prod_i pi*_i(y|x)^{w_i}

This module holds the conditioning, as pure functions and one model wrapper:

  prompt conditioning   w serialised into the prompt (`weight_prefix`);
  full-CLP              every parameter is sum_i w_i theta_i over m copies;
  attn-CLP              the same for the attention weights only (others shared);
  logit-CLP             logits_w = sum_i w_i logits_i of m full copies.

Parameter trees: a mixed leaf carries a leading copy axis [m, ...] (`stack_copies`),
a shared leaf is as in the plain model; `mix(params, w)` gives plain params for
one w. `ConditionedPolicy.apply` mixes per row (per-row weights [b, m]), so a
batch may hold many weightings: for full/attn it vmaps the model over rows with
per-row mixed parameters (memory: rows x mixed parameters; the tiny models here
afford it), for logit mixing it vmaps over the m copies and mixes the logits.

What the paper fixes: linear scalarisation, one steerable model,
REINFORCE, the variants full-CLP / attn-CLP / logit-CLP. Reconstructions ([M]),
each a setting of `CLPConfig` (gin): Q = Dirichlet(dirichlet_alpha = 1); which
parameters attn-CLP mixes (`mixed_params`, default every leaf under an "attn"
module); the prompt serialisation (`prompt_template`, `weight_decimals`); that
the copies start equal to the SFT model; that w is drawn once per prompt and
shared by its samples (the leave-one-out baseline compares samples of one w).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models.attention import CacheInfo
from posttrain_jax.models.gemma2 import init_cache

Array = jax.Array
MIXINGS = ("none", "full", "attn", "logit")
DEFAULT_MIXED_PARAMS = {"full": r".*", "attn": r"(^|.*/)attn/.*", "logit": r".*",
                        "none": r"$^"}
SIMPLEX_ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class CLPConfig:
  """How the policy is conditioned on w (module docstring; [M] = reconstruction).

  num_rewards: m, the length of w.
  mixing: "none" (prompt conditioning alone), "full", "attn" or "logit".
  mixed_params: [M] regex on "/"-joined parameter paths selecting the mixed
    leaves of full/attn (None: every leaf for full, leaves under "attn" for attn).
  prompt_conditioning: also serialise w into the prompt (prompt-CLP when mixing
    is "none").
  prompt_template / weight_decimals: [M] the serialisation, template.format(
    "0.3 0.7"); with prompt conditioning w is rounded to this grid on the simplex.
  dirichlet_alpha: [M] Q = Dirichlet(alpha, ..., alpha) (1: uniform on the simplex).
  """
  num_rewards: int = 2
  mixing: str = "full"
  mixed_params: str | None = None
  prompt_conditioning: bool = False
  prompt_template: str = "weights {}: "
  weight_decimals: int = 1
  dirichlet_alpha: float = 1.0

  def __post_init__(self):
    if self.num_rewards < 1:
      raise ValueError(f"num_rewards must be >= 1, got {self.num_rewards}.")
    if self.mixing not in MIXINGS:
      raise ValueError(f"Unknown CLP mixing {self.mixing!r}; choose one of {list(MIXINGS)}.")
    if self.mixing == "none" and not self.prompt_conditioning:
      raise ValueError("mixing='none' without prompt_conditioning does not condition on w; "
                       "set prompt_conditioning=True or pick full/attn/logit mixing.")
    if self.mixing == "logit" and self.mixed_params is not None:
      raise ValueError("mixed_params applies to full/attn mixing; logit mixing keeps m "
                       "whole copies. Unset mixed_params.")
    if self.dirichlet_alpha <= 0:
      raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}.")
    if not 0 <= self.weight_decimals <= 4:
      raise ValueError(f"weight_decimals must be in 0..4, got {self.weight_decimals}.")
    if "{}" not in self.prompt_template:
      raise ValueError(f"prompt_template {self.prompt_template!r} needs a '{{}}' where the "
                       "weights go.")
    re.compile(self.pattern)

  @property
  def pattern(self) -> str:
    return self.mixed_params or DEFAULT_MIXED_PARAMS[self.mixing]

  @property
  def num_copies(self) -> int:
    return 1 if self.mixing == "none" else self.num_rewards


# ---------------------------------------------------------------- weightings w


def check_weights(weights, num_rewards: int) -> np.ndarray:
  """w [m] or [b, m] as float32 numpy, or one ValueError: wrong length, a negative
  or non-finite entry, or rows that do not sum to 1 (w must lie on the simplex)."""
  w = np.asarray(weights, np.float64)
  if w.ndim not in (1, 2) or w.shape[-1] != num_rewards:
    raise ValueError(f"Reward weights must have {num_rewards} entries per row (one per "
                     f"reward), got shape {w.shape}.")
  if not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"Reward weights must be finite and >= 0 (w on the simplex), got {w}.")
  sums = w.sum(-1)
  if not np.allclose(sums, 1.0, atol=SIMPLEX_ATOL):
    raise ValueError(f"Reward weights must sum to 1 (w on the simplex), got sums {sums}; "
                     "normalise them, e.g. --weights 0.3,0.7.")
  return w.astype(np.float32)


def parse_weights(text: str, num_rewards: int) -> np.ndarray:
  """'0.3,0.7' -> checked w [m]."""
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"Reward weights {text!r}: expected comma-separated numbers such as "
                     "0.3,0.7.") from None
  return check_weights(values, num_rewards)


def sample_weights(rng: np.random.Generator, num: int, num_rewards: int,
                   alpha: float = 1.0) -> np.ndarray:
  """[num, m] draws of Q = Dirichlet(alpha) ([M]: alpha = 1 is uniform on the simplex)."""
  if alpha <= 0:
    raise ValueError(f"dirichlet_alpha must be > 0, got {alpha}.")
  return rng.dirichlet(np.full(num_rewards, alpha), size=num).astype(np.float32)


def round_to_simplex(weights, decimals: int) -> np.ndarray:
  """Each row of w rounded to multiples of 10^-decimals, still summing to 1
  (largest remainder: floor, then +1 unit to the largest fractional parts)."""
  w = np.atleast_2d(np.asarray(weights, np.float64))
  units = 10 ** decimals
  scaled = w * units
  floor = np.floor(scaled + 1e-9)
  missing = (units - floor.sum(-1)).round().astype(int)
  order = np.argsort(-(scaled - floor), axis=-1, kind="stable")
  for r, k in enumerate(missing):
    floor[r, order[r, :k]] += 1
  out = (floor / units).astype(np.float32)
  return out if np.ndim(weights) == 2 else out[0]


def serialise_weights(w: Sequence[float], config: CLPConfig) -> str:
  """The text prompt conditioning prepends, e.g. 'weights 0.3 0.7: '."""
  return config.prompt_template.format(
      " ".join(f"{x:.{config.weight_decimals}f}" for x in w))


def weight_prefix(w: Sequence[float], config: CLPConfig,
                  encode: Callable[[str], list[int]]) -> list[int]:
  """Token ids of `serialise_weights(w)` (encode: e.g. SentencePiece's encode)."""
  return list(encode(serialise_weights(w, config)))


def scalarise(rewards: Array, weights: Array) -> Array:
  """w . r per row: rewards [b, m], weights [b, m] -> [b]."""
  return jnp.sum(rewards.astype(jnp.float32) * weights.astype(jnp.float32), axis=-1)


# ------------------------------------------------------- the KL-regularised optimum


def optimal_policy(logp_ref: Array, rewards: Array, weights: Array, alpha: float) -> Array:
  """log pi*_w = log softmax(log pi_ref + (w . r) / alpha) over an enumerated space.

  logp_ref [K], rewards [K, m], weights [m]: the maximiser of
  E_pi[w . r] - alpha KL(pi || pi_ref) (Gibbs variational principle)."""
  return jax.nn.log_softmax(logp_ref + scalarise(rewards, weights[None]) / alpha)


def exact_objective(logp: Array, logp_ref: Array, rewards: Array, weights: Array,
                    alpha: float) -> Array:
  """J(pi; w) = sum_y pi(y) (w . r(y)) - alpha KL(pi || pi_ref), exactly (K outcomes)."""
  p = jnp.exp(logp)
  return jnp.sum(p * scalarise(rewards, weights[None])) - alpha * jnp.sum(p * (logp - logp_ref))


def mix_logits(logits: Array, weights: Array) -> Array:
  """logit-CLP: sum_i w_i logits_i; logits [m, b, ...], weights [b, m] -> [b, ...]."""
  w = weights.astype(jnp.float32).T.reshape(weights.shape[::-1] + (1,) * (logits.ndim - 2))
  return jnp.sum(w * logits.astype(jnp.float32), axis=0)


# ------------------------------------------------------------ parameter copies


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def mixed_mask(params, config: CLPConfig):
  """Tree of bools: which leaves of the plain model's params have m copies."""
  rx = re.compile(config.pattern)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: config.mixing != "none" and rx.fullmatch(_path(p)) is not None, params)


def stack_copies(params, config: CLPConfig):
  """The CLP tree of plain params: m identical copies [m, ...] of each mixed leaf."""
  m = config.num_copies
  return jax.tree.map(lambda x, mixed: jnp.broadcast_to(x, (m,) + x.shape) if mixed else x,
                      params, mixed_mask(params, config))


def stack_models(models: Sequence, config: CLPConfig):
  """The CLP tree whose copy i of each mixed leaf is models[i]'s (shared leaves from
  models[0]): full-CLP of m separate models is their rewarded soup for each w."""
  if len(models) != config.num_copies:
    raise ValueError(f"stack_models needs {config.num_copies} models, got {len(models)}.")
  mask = mixed_mask(models[0], config)
  return jax.tree.map(lambda mixed, *xs: jnp.stack(xs) if mixed else xs[0], mask, *models)


def copy_mask(clp_params, config: CLPConfig):
  """mixed_mask of a CLP tree (leaves with the copy axis)."""
  return mixed_mask(clp_params, config)


def mix(clp_params, weights, config: CLPConfig):
  """Plain params sum_i w_i theta_i for one w [m] (full/attn); shared leaves as they are."""
  w = jnp.asarray(weights, jnp.float32)
  return jax.tree.map(
      lambda x, mixed: jnp.tensordot(w, x.astype(jnp.float32), 1).astype(x.dtype)
      if mixed else x, clp_params, copy_mask(clp_params, config))


def mix_rows(clp_params, weights: Array, config: CLPConfig):
  """Per-row mixing: mixed leaves [b, ...] = sum_i w[b, i] theta_i; shared leaves as
  they are (the vmap axes of `ConditionedPolicy`)."""
  w = weights.astype(jnp.float32)
  return jax.tree.map(
      lambda x, mixed: jnp.tensordot(w, x.astype(jnp.float32), 1).astype(x.dtype)
      if mixed else x, clp_params, copy_mask(clp_params, config))


# ------------------------------------------------------------------ the policy


class ConditionedPolicy:
  """A Transformer conditioned on w, with the flax `apply` interface the trainers
  and `sampling.generate` call: variables = {"params": {"policy": CLP tree,
  "weights": [b, m]}}.

  mixing "none": the plain model (w is in the prompt). full/attn: row b runs the
  model with sum_i w[b, i] theta_i (vmap over rows). logit: the m copies run on
  every row (vmap over copies, a KV cache per copy) and their logits are mixed.
  """

  def __init__(self, model_config: ModelConfig, config: CLPConfig):
    self.config, self.clp = model_config, config
    self.model = Transformer(model_config)

  def init_params(self, plain_params):
    return stack_copies(plain_params, self.clp)

  def init_cache(self, rows: int, length: int):
    cache = init_cache(self.config, rows, length)
    if self.clp.mixing != "logit":
      return cache
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.clp.num_copies,) + a.shape),
                        cache)

  def apply(self, variables, tokens: Array, positions: Array | None = None,
            segment_ids: Array | None = None, cache=None, cache_info: CacheInfo | None = None,
            last_logits_only: bool = False):
    params, weights = variables["params"]["policy"], variables["params"]["weights"]
    weights = jax.lax.stop_gradient(weights)
    kwargs = dict(cache_info=cache_info, last_logits_only=last_logits_only)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                   tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if self.clp.mixing == "none":
      return self.model.apply({"params": params}, tokens, positions=positions,
                              segment_ids=segment_ids, cache=cache, **kwargs)
    if self.clp.mixing == "logit":
      def copy(p, c):
        return self.model.apply({"params": p}, tokens, positions=positions,
                                segment_ids=segment_ids, cache=c, **kwargs)
      if cache is None:
        return mix_logits(jax.vmap(lambda p: copy(p, None))(params), weights)
      logits, new_cache = jax.vmap(copy)(params, cache)
      return mix_logits(logits, weights), new_cache
    return self._apply_rows(params, weights, tokens, positions, segment_ids, cache,
                            cache_info, last_logits_only)

  def _apply_rows(self, params, weights, tokens, positions, segment_ids, cache, cache_info,
                  last_logits_only):
    mask = copy_mask(params, self.clp)
    rows = mix_rows(params, weights, self.clp)
    axes = jax.tree.map(lambda mixed: 0 if mixed else None, mask)
    cache_axis = 1 if self.config.scan_layers else 0
    expand = lambda t: jax.tree.map(lambda a: jnp.expand_dims(a, cache_axis), t)
    squeeze = lambda t: jax.tree.map(lambda a: jnp.squeeze(a, cache_axis), t)

    def one(p, tok, pos, seg, c, cache_segments):
      info = None if c is None else cache_info.replace(segment_ids=cache_segments[None])
      out = self.model.apply({"params": p}, tok[None], positions=pos[None],
                             segment_ids=seg[None], cache=None if c is None else expand(c),
                             cache_info=info, last_logits_only=last_logits_only)
      if c is None:
        return out[0]
      return out[0][0], squeeze(out[1])

    if cache is None:
      return jax.vmap(lambda p, t, q, s: one(p, t, q, s, None, None),
                      in_axes=(axes, 0, 0, 0))(rows, tokens, positions, segment_ids)
    return jax.vmap(one, in_axes=(axes, 0, 0, 0, cache_axis, 0))(
        rows, tokens, positions, segment_ids, cache, cache_info.segment_ids)
