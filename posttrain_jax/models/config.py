"""Architecture hyperparameters of a Gemma-2-like decoder.

The published shapes (Gemma 2 paper, Table 1, and the released configs) live in
`gin/models/gemma2_{2b,9b,27b}.gin`; this dataclass carries plain values only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ATTENTION_TYPES = ("local", "global")
QUERY_SCALINGS = ("head_dim", "embed_over_heads")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
ATTENTION_IMPLS = ("xla", "dot_product_attention", "splash")
DPA_IMPLEMENTATIONS = (None, "xla", "cudnn")
GRADIENT_LAYOUTS = ("auto", "row_major", "xla")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of the decoder.

  Attributes:
    vocab_size: rows of the (tied) embedding table.
    embed_dim: d_model.
    num_layers: number of decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when smaller).
    head_dim: per-head width; free, need not equal embed_dim / num_heads.
    mlp_dim: width of each GeGLU branch (HF `intermediate_size`).
    attention_pattern: attention type of layer i is pattern[i % len(pattern)];
      Gemma 2 alternates ("local", "global") starting with a local layer.
    sliding_window_size: keys with query_index - key_index >= window are masked
      in local layers.
    query_scaling: "head_dim" scales queries by head_dim**-0.5 (2B, 9B);
      "embed_over_heads" by (embed_dim / num_heads)**-0.5 (27B).
    query_pre_attn_scalar: explicit override of the value under the square
      root (HF `query_pre_attn_scalar`); None derives it from query_scaling.
    attn_logits_soft_cap: c in c * tanh(score / c); None disables.
    final_logit_soft_cap: the same for output logits; None disables.
    rope_base: RoPE max wavelength.
    rms_norm_eps: epsilon of every RMSNorm.
    dtype: compute (activation) dtype name.
    param_dtype: parameter storage dtype name.
    scan_layers: scan over groups of len(attention_pattern) layers.
    remat_policy: one of REMAT_POLICIES.
    attention_impl: "xla" (the reference einsum + soft-cap + mask path) or
      "dot_product_attention" (`jax.nn.dot_product_attention`, sliding window
      through its local_window_size, packing through a segment mask). The
      latter has no logit soft-cap, so it needs attn_logits_soft_cap = None.
      "splash": the TPU splash attention kernel (models/splash_attention.py;
      soft-cap, window and segments inside the kernel; the Pallas interpreter
      off TPU, for tests). Decoding with a KV cache always uses the reference
      path.
    dpa_implementation: `implementation` of jax.nn.dot_product_attention:
      None (jax chooses; XLA in jax 0.10), "xla", or "cudnn" (NVIDIA GPUs,
      bf16/fp16 flash attention). Only with attention_impl =
      "dot_product_attention".
    splash_block_size: query/key tile of attention_impl="splash", a multiple
      of 128 (clipped to the sequence length, which must be a multiple of it).
    causal_block_size: reference path without a KV cache: global (causal)
      layers cut the queries into blocks of this many positions and score
      block n against keys [0, (n + 1) * block) only (the causal lower
      triangle in blocks; (nb + 1) / (2 nb) of the score work for nb blocks),
      same result. None computes and masks the full [t, t] scores. The blocks
      are unrolled in the program, so keep length / block small (<= ~16).
    gradient_layout: how the backward pass forms its matmuls. "row_major":
      weight gradients and the blocked attention kernels' key/value gradients
      as row-major products with one operand transposed first
      (models/row_major_matmul.py, models/softcap_attention.py; the soft-cap
      attention core also skips the softmax's row maximum); XLA:CPU runs
      these 1.6-2.9x faster than the transposed-operand dots autodiff
      writes. "xla": autodiff's own products. "auto" (default): "row_major"
      on the CPU backend, "xla" on TPU and GPU.
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  attention_pattern: tuple[str, ...] = ("local", "global")
  sliding_window_size: int | None = 4096
  query_scaling: str = "head_dim"
  query_pre_attn_scalar: float | None = None
  attn_logits_soft_cap: float | None = 50.0
  final_logit_soft_cap: float | None = 30.0
  rope_base: float = 10_000.0
  rms_norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_impl: str = "xla"
  dpa_implementation: str | None = None
  splash_block_size: int = 512
  causal_block_size: int | None = None
  gradient_layout: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
    problems = []
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "mlp_dim"):
      if int(getattr(self, name)) <= 0:
        problems.append(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
      problems.append(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    bad = [t for t in self.attention_pattern if t not in ATTENTION_TYPES]
    if bad or not self.attention_pattern:
      problems.append(f"attention_pattern entries must be in {ATTENTION_TYPES}, "
                      f"got {self.attention_pattern}")
    if "local" in self.attention_pattern and not (
        self.sliding_window_size and self.sliding_window_size > 0):
      problems.append("local layers need a positive sliding_window_size")
    if self.query_scaling not in QUERY_SCALINGS:
      problems.append(f"query_scaling must be one of {QUERY_SCALINGS}, got "
                      f"{self.query_scaling!r}")
    if self.remat_policy not in REMAT_POLICIES:
      problems.append(f"remat_policy must be one of {REMAT_POLICIES}, got "
                      f"{self.remat_policy!r}")
    if self.causal_block_size is not None and self.causal_block_size <= 0:
      problems.append(f"causal_block_size must be a positive int or None, got "
                      f"{self.causal_block_size}")
    if self.splash_block_size <= 0 or self.splash_block_size % 128:
      problems.append("splash_block_size must be a positive multiple of 128 (the "
                      f"TPU lane width), got {self.splash_block_size}")
    if self.attention_impl not in ATTENTION_IMPLS:
      problems.append(f"attention_impl must be one of {ATTENTION_IMPLS}, got "
                      f"{self.attention_impl!r}")
    if self.gradient_layout not in GRADIENT_LAYOUTS:
      problems.append(f"gradient_layout must be one of {GRADIENT_LAYOUTS}, got "
                      f"{self.gradient_layout!r}")
    if self.dpa_implementation not in DPA_IMPLEMENTATIONS:
      problems.append(f"dpa_implementation must be one of {DPA_IMPLEMENTATIONS}, "
                      f"got {self.dpa_implementation!r}")
    elif self.dpa_implementation is not None and self.attention_impl != (
        "dot_product_attention"):
      problems.append(f"dpa_implementation={self.dpa_implementation!r} needs "
                      "attention_impl='dot_product_attention'; set it or unset "
                      "dpa_implementation")
    if self.attention_impl == "dot_product_attention" and (
        self.attn_logits_soft_cap is not None):
      problems.append(
          "attention_impl='dot_product_attention' cannot apply attn_logits_soft_cap "
          f"({self.attn_logits_soft_cap}): jax.nn.dot_product_attention has no "
          "logit soft-cap; set attn_logits_soft_cap=None (changes the model) or "
          "attention_impl='xla'")
    if self.scan_layers and self.num_layers % len(self.attention_pattern):
      problems.append(
          f"scan_layers needs num_layers ({self.num_layers}) divisible by "
          f"len(attention_pattern) ({len(self.attention_pattern)})")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        problems.append(f"{name} {getattr(self, name)!r} is not a dtype name")
    if problems:
      raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

  @property
  def query_scale(self) -> float:
    """Multiplier applied to queries before the dot product."""
    if self.query_pre_attn_scalar is not None:
      return float(self.query_pre_attn_scalar) ** -0.5
    if self.query_scaling == "head_dim":
      return self.head_dim ** -0.5
    return (self.embed_dim / self.num_heads) ** -0.5

  @property
  def row_major_gradients(self) -> bool:
    """gradient_layout resolved: "auto" means row-major on the CPU backend
    (read when the model is traced)."""
    if self.gradient_layout == "auto":
      return jax.default_backend() == "cpu"
    return self.gradient_layout == "row_major"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def attention_type(self, layer: int) -> str:
    return self.attention_pattern[layer % len(self.attention_pattern)]

  def embedding_params(self) -> int:
    return self.vocab_size * self.embed_dim

  def non_embedding_params(self) -> int:
    """Closed-form count: attention + 3 * d * ff + 4 norms per layer, final norm."""
    d = self.embed_dim
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * self.mlp_dim + 4 * d
    return self.num_layers * per_layer + d

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6N plus causal attention.

    N counts the non-embedding parameters and the tied output projection. Per
    layer, the score and value matmuls cost 4 * heads * head_dim * span FLOPs
    forward (x3 for forward + backward), where span is the number of keys a
    query attends to averaged over positions: min(i + 1, window) for query i.
    """
    n = self.non_embedding_params() + self.embedding_params()
    attn = 0.0
    for layer in range(self.num_layers):
      window = seq_len
      if self.attention_type(layer) == "local":
        window = min(seq_len, self.sliding_window_size)
      # sum_{i<T} min(i + 1, w) = w (w + 1) / 2 + (T - w) w
      span = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
      attn += 12 * self.num_heads * self.head_dim * span
    return 6 * n + attn
