"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses

import jax
import optax


def warmup_cosine_schedule(peak_learning_rate: float, warmup_steps: int,
                           decay_steps: int, end_learning_rate_ratio: float = 0.1
                           ) -> optax.Schedule:
  """Linear warmup then cosine decay.

  lr(t) = peak * (t + 1) / warmup for t < warmup (the first step already
  moves), then cosine from peak down to end_ratio * peak at step decay_steps.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate,
      warmup_steps=max(int(warmup_steps), 0),
      decay_steps=max(int(decay_steps), int(warmup_steps) + 1),
      end_value=peak_learning_rate * end_learning_rate_ratio)
  return lambda step: schedule(step + 1)


def decay_mask(params):
  """Weight decay on matrices only: no decay on norm scales (rank-1 leaves)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def adamw(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1,
          clip_grad_norm: float | None = 1.0,
          mu_dtype: str | None = None) -> optax.GradientTransformation:
  """Clip by global norm (if set), then AdamW with decoupled weight decay.

  mu_dtype: storage dtype of the first moment (e.g. "bfloat16", halving it);
  None keeps the parameters' dtype. The second moment keeps the parameters'.
  """
  parts = []
  if clip_grad_norm:
    parts.append(optax.clip_by_global_norm(clip_grad_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
                           weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW + warmup/cosine hyperparameters; decay_steps None means the run length."""

  learning_rate: float = 3e-4
  warmup_steps: int = 100
  decay_steps: int | None = None
  end_learning_rate_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_grad_norm: float | None = 1.0
  mu_dtype: str | None = None

  def build(self, num_steps: int) -> tuple[optax.Schedule, optax.GradientTransformation]:
    schedule = warmup_cosine_schedule(self.learning_rate, self.warmup_steps,
                                      self.decay_steps or num_steps,
                                      self.end_learning_rate_ratio)
    return schedule, adamw(schedule, self.b1, self.b2, self.eps,
                           self.weight_decay, self.clip_grad_norm, self.mu_dtype)
