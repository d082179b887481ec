"""The diversity reward and its REINFORCE-with-baseline estimator.

Cideron et al. 2024, "Diversity-Rewarded CFG Distillation" (arXiv 2410.06084,
Sec. 3): for two samples of one prompt,

    D(y1, y2) = 1 - cos(E(y1), E(y2)),      D(theta) = E_c E_{y1,y2 ~ pi_theta(.|c)} D(y1, y2)

with E an embedding model. The paper's E is a contrastively trained music
embedding [M]; here E is pluggable and the default (our choice, not the
paper's) is `mean_pooled_embedding`: the mean of a frozen model's final-normed
hidden states over the generated tokens (the CFG distillation trainer uses the
frozen initial model theta_0, whose forward it already runs as the teacher).

Gradient. With G i.i.d. samples per prompt the U-statistic over ordered pairs is
unbiased, and its score-function gradient is

    grad D = 1/(G(G-1)) sum_{i != j} D_ij (grad log p_i + grad log p_j)
           = (1/G) sum_i 2 r_i grad log p_i,       r_i = 1/(G-1) sum_{j != i} D_ij

so the per-sample reward is r_i and the advantage A_i = 2 (r_i - b_i). A
baseline b_i keeps the estimator unbiased only if it does not depend on y_i
(then E[b_i grad log p_i] = 0). r_i's usual leave-one-out mean does (every r_k
contains D_ki), so the baselines offered are:

  "leave_one_out"  b_i = mean of D_jk over the pairs of the group without i (G >= 3)
  "batch"          b_i = mean of the other groups' mean D (>= 2 prompts; any G >= 2)
  "none"           b_i = 0

The surrogate is `policy_gradient.reinforce_loss_sums(log p, A)`: minimising
it ascends D (tests/rl/test_diversity.py checks unbiasedness by exact
enumeration on a toy categorical).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
BASELINES = ("leave_one_out", "batch", "none")


def cosine_similarity(a: Array, b: Array, eps: float = 1e-8) -> Array:
  """cos(a, b) over the last axis (fp32); 0-vectors give 0."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  norm = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(norm, eps)


def diversity(a: Array, b: Array) -> Array:
  """D = 1 - cos(E(y1), E(y2)) of two embeddings (batched over leading axes)."""
  return 1.0 - cosine_similarity(a, b)


def mean_pooled_embedding(hidden: Array, mask: Array) -> Array:
  """E(y): the mean of hidden states [b, T, d] over the positions where mask [b, T]
  is set (the generated tokens) -> [b, d]."""
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def pairwise_diversity(embeddings: Array, samples_per_prompt: int) -> Array:
  """[b, d] embeddings, groups of G consecutive rows -> D_ij [b / G, G, G]."""
  g = samples_per_prompt
  e = embeddings.reshape(-1, g, embeddings.shape[-1])
  return diversity(e[:, :, None, :], e[:, None, :, :])


def check_baseline(kind: str, samples_per_prompt: int, num_prompts: int | None = None) -> None:
  if kind not in BASELINES:
    raise ValueError(f"Unknown diversity baseline {kind!r}; choose from {BASELINES}.")
  if samples_per_prompt < 2:
    raise ValueError(f"The diversity reward compares samples of one prompt: "
                     f"samples_per_prompt must be >= 2, got {samples_per_prompt}.")
  if kind == "leave_one_out" and samples_per_prompt < 3:
    raise ValueError("The leave-one-out diversity baseline averages the pairs without "
                     f"sample i, so it needs samples_per_prompt >= 3 (got "
                     f"{samples_per_prompt}); use baseline='batch' or 'none'.")
  if kind == "batch" and num_prompts is not None and num_prompts < 2:
    raise ValueError("The 'batch' diversity baseline uses the other prompts' groups: it "
                     "needs >= 2 prompts per batch; use 'none' or more prompts.")


def diversity_advantages(embeddings: Array, samples_per_prompt: int,
                         baseline: str = "batch") -> tuple[Array, dict[str, Array]]:
  """A_i = 2 (r_i - b_i) [b] (module docstring) and metrics: "diversity" (mean
  pairwise D over the batch) and "diversity_baseline"."""
  g = samples_per_prompt
  check_baseline(baseline, g, embeddings.shape[0] // g)
  d = pairwise_diversity(embeddings, g)                       # [P, G, G], zero diagonal
  d = d * (1.0 - jnp.eye(g))
  row = jnp.sum(d, axis=-1)                                   # [P, G]
  r = row / (g - 1)
  group_total = jnp.sum(d, axis=(-1, -2))                     # ordered pairs
  group_mean = group_total / (g * (g - 1))                    # [P]
  if baseline == "leave_one_out":
    # ordered pairs without i: total - 2 * row_i, over (G-1)(G-2) of them
    b = (group_total[:, None] - 2.0 * row) / ((g - 1) * (g - 2))
  elif baseline == "batch":
    p = group_mean.shape[0]
    b = jnp.broadcast_to(((jnp.sum(group_mean) - group_mean) / (p - 1))[:, None], r.shape)
  else:
    b = jnp.zeros_like(r)
  adv = 2.0 * (r - b)
  return jax.lax.stop_gradient(adv.reshape(-1)), {
      "diversity": jnp.mean(group_mean), "diversity_baseline": jnp.mean(b)}
