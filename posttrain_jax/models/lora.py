"""LoRA: low-rank adapters on the decoder's dense projections (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685).

A targeted weight W (shape in_shape + out_shape, contracted over in_shape)
gets A (in_shape + (r,)) and B ((r,) + out_shape), and the layer computes

    y = x W + (alpha / r) * dropout(x) A B

B starts at zero, so an adapted model starts as the base model; A is
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's default). Adapters live in the
parameter tree beside their weight, named "{name}_lora_a" / "{name}_lora_b"
(e.g. layer_0/attn/q_lora_a), with the weight's logical axis names on the
dimensions they share with it and None on the rank axis, so the partitioning
rules shard them like their weight (a scanned model's adapters are stacked on
the same "layers" axis). They are float32 whatever the weight dtype.

The model (`Transformer(config, lora=LoraConfig(...))`) adds the low-rank
term wherever a weight's adapters are present in the params it is applied to,
so the same model applied to the base tree alone is the base model: a
reference or anchor "with the adapters off" needs no second copy of the
weights. Dropout applies when the apply call has a "dropout" rng
(`rngs={"dropout": key}`; training), never otherwise.

Why not qwix (Google's JAX quantization/LoRA library, 0.1.8): it installs
with the pinned jax/flax, but it finds a layer's weight by tracing the dot's
operand back to a parameter, and this model reshapes every weight to 2-D
before its one matmul (layers.token_dense) and uses custom-VJP matmuls on
CPU (row_major_matmul). Eagerly initialised unscanned models got no adapters
on the attention projections (the reshaped weight matches no parameter),
a scanned model with row-major gradients failed with a leaked tracer, and
the tied embedding's output projection was adapted while its lookup was not.
See docs/sft.md.

Targets are regular expressions searched (``re.search``) in each adaptable
weight's path "module/.../name", e.g. "layer_0/attn/q" (unscanned) or
"layers/local_0/attn/q" (scanned); adaptable weights are the projections in
`IN_DIMS` (the embedding, tied to the output, and the norms are not).
"""

from __future__ import annotations

import dataclasses
import math
import re
import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain_jax.models import row_major_matmul

Array = jax.Array

# Adaptable weight name -> how many leading dims the layer contracts.
IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings.

  rank: r >= 1. alpha: the update is scaled by alpha / rank. dropout: rate
  on the adapter's input in [0, 1). targets: regular expressions; a weight is
  adapted when one of them is found in its path (see the module docstring);
  every pattern must match at least one adaptable weight.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$")

  def __post_init__(self):
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be an integer >= 1, got {self.rank!r}. "
                       "Fix: set LoraConfig.rank to e.g. 8.")
    if not self.alpha > 0:
      raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}. Fix: set it to "
                       "e.g. 2 * rank.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
    if not self.targets:
      raise ValueError("LoraConfig.targets is empty; give at least one pattern, e.g. "
                       "('attn/(q|v)$',).")
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"LoraConfig.targets pattern {pattern!r} is not a regular "
                         f"expression ({e}).") from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _key(entry) -> str:
  return str(getattr(entry, "key", entry))


def weight_path(path) -> str:
  """A tree path (tuple of keys) as "module/.../name"."""
  return "/".join(_key(k) for k in path)


def adaptable(params) -> dict[str, tuple]:
  """"path" -> tree path of every adaptable weight of a (base) param tree."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]:
    if _key(path[-1]) in IN_DIMS:
      out[weight_path(path)] = tuple(_key(k) for k in path)
  return out


def targeted(params, lora: LoraConfig) -> dict[str, tuple]:
  """The adaptable weights that lora.targets select; raises ValueError for a
  pattern that selects none (naming the pattern and examples of paths)."""
  weights = adaptable(params)
  for pattern in lora.targets:
    if not any(re.search(pattern, p) for p in weights):
      examples = ", ".join(sorted(weights)[:3])
      raise ValueError(
          f"LoraConfig.targets pattern {pattern!r} matches no adaptable weight. Adaptable "
          f"weights are the projections {', '.join(IN_DIMS)} (paths like {examples}). Fix: "
          "change or remove the pattern.")
  return {p: k for p, k in weights.items()
          if any(re.search(pattern, p) for pattern in lora.targets)}


def _leading(path: tuple) -> int:
  """1 for a scanned model's stacked weights (under "layers"), else 0."""
  return 1 if path[0] == "layers" else 0


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def adapter_shapes(boxed_params, lora: LoraConfig) -> dict[tuple, tuple]:
  """tree path of each adapter -> (shape, logical axis names), from the base
  params (boxed: nn.LogicallyPartitioned leaves, e.g. jax.eval_shape of init)."""
  out = {}
  for path in targeted(boxed_params, lora).values():
    box = _get(boxed_params, path)
    shape = tuple(nn.unbox(box).shape)
    names = tuple(box.names) if isinstance(box, nn.LogicallyPartitioned) else (None,) * len(shape)
    lead, k = _leading(path), IN_DIMS[path[-1]]
    cut = lead + k
    out[path[:-1] + (path[-1] + A_SUFFIX,)] = (shape[:cut] + (lora.rank,),
                                              names[:cut] + (None,))
    out[path[:-1] + (path[-1] + B_SUFFIX,)] = (shape[:lead] + (lora.rank,) + shape[cut:],
                                              names[:lead] + (None,) + names[cut:])
  return out


def init_adapters(rng: Array, boxed_params, lora: LoraConfig) -> dict:
  """Adapters (boxed with their logical axis names): A uniform, B zero."""
  shapes = adapter_shapes(boxed_params, lora)
  keys = jax.random.split(rng, max(len(shapes), 1))
  tree: dict = {}
  for key, (path, (shape, names)) in zip(keys, sorted(shapes.items())):
    lead = _leading(path)
    if path[-1].endswith(A_SUFFIX):
      bound = 1.0 / math.sqrt(math.prod(shape[lead:-1]))
      value = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    else:
      value = jnp.zeros(shape, jnp.float32)
    _set(tree, path, nn.LogicallyPartitioned(value, names))
  return tree


def is_adapter(path) -> bool:
  name = _key(path[-1])
  return name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)


def split(params) -> tuple[dict, dict]:
  """(base, adapters) of a tree holding both (nested dicts)."""
  base, adapters = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    _set(adapters if is_adapter(path) else base, tuple(_key(k) for k in path), leaf)
  return base, adapters


def combine(base, adapters) -> dict:
  """The base tree with the adapters beside their weights (no array is copied)."""
  out = jax.tree.map(lambda x: x, base)  # new dicts, same leaves
  for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    _set(out, tuple(_key(k) for k in path), leaf)
  return out


def merge(base, adapters, lora: LoraConfig) -> dict:
  """Base params with W + (alpha / r) A B for every adapted weight (same tree,
  shapes and dtypes as base): the adapter model as a plain model."""
  out = jax.tree.map(lambda x: x, base)
  for path, a in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    keys = tuple(_key(k) for k in path)
    if not keys[-1].endswith(A_SUFFIX):
      continue
    name = keys[-1][:-len(A_SUFFIX)]
    w_path = keys[:-1] + (name,)
    w, b = _get(base, w_path), _get(adapters, keys[:-1] + (name + B_SUFFIX,))
    lead = _leading(w_path)
    a2 = a.reshape(a.shape[:lead] + (-1, lora.rank)).astype(jnp.float32)
    b2 = b.reshape(b.shape[:lead] + (lora.rank, -1)).astype(jnp.float32)
    update = (lora.scale * jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST))
    _set(out, w_path, (w.astype(jnp.float32) + update.reshape(w.shape)).astype(w.dtype))
  return out


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def delta(module: nn.Module, name: str, x: Array, in_dims: int, lora: LoraConfig | None,
          dtype, row_major_grads: bool = False) -> Array | None:
  """(alpha / r) dropout(x) A B for weight `name` of `module`, or None when
  the module has no adapters for it (lora unset or the adapters not in the
  applied params). x: [..., in_shape]; returns [..., out_shape]."""
  if lora is None or not module.has_variable("params", name + A_SUFFIX):
    return None
  a = module.get_variable("params", name + A_SUFFIX).astype(dtype)
  b = module.get_variable("params", name + B_SUFFIX).astype(dtype)
  if lora.dropout and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
  matmul = row_major_matmul.dense if row_major_grads else jnp.dot
  lead = x.shape[:x.ndim - in_dims]
  h = matmul(x.reshape(-1, math.prod(a.shape[:-1])), a.reshape(-1, lora.rank))
  y = matmul(h, b.reshape(lora.rank, -1)) * jnp.asarray(lora.scale, dtype)
  return y.reshape(lead + b.shape[1:])


def apply_delta(y: Array, d: Array | None) -> Array:
  return y if d is None else y + d.astype(y.dtype)
