"""CFG distillation: a classifier-free-guided frozen teacher and the on-policy loss.

Cideron et al. 2024, "Diversity-Rewarded CFG Distillation" (arXiv 2410.06084,
Eq. 2). The teacher is the frozen initial model theta_0 with classifier-free
guidance: the condition c is the prompt, the unconditional branch is the same
model with the prompt replaced by a null prompt (`SamplingConfig.null_prompt`),

    l_gamma(.|y<t, c) = gamma * l_theta0(.|y<t, c) + (1 - gamma) * l_theta0(.|y<t, null)

(`sampling.guided_logits`). The student pi_theta (initialised at theta_0) is
trained on its own samples y ~ pi_theta(.|c) (the distillation trainer's
online-student source; no gradient through sampling) to minimise the per-token
reverse KL summed over the generated positions:

    L_distil(theta) = E_c E_{y~pi_theta(.|c)} sum_{t=1..L} KL(pi_theta(.|y<t, c) || pi^gamma_theta0(.|y<t, c))

Sums are normalised per sequence (the sum over t, then the mean over
sequences), as in the equation. The gradient is the usual on-policy
distillation one (GKD, Agarwal et al. 2024): the exact gradient of the per-token
KL at the sampled prefixes, without the score-function term of the sampling
distribution. At theta = theta_0 and gamma = 1 the KL is 0 with zero gradient.

Batches: `cfg_batch` turns a `sampling.SampleOutput` into the LM layout of
`sources.sample_to_batch` plus the unconditional view ("null_*": the same
generated tokens after the null prompt, column-aligned), so one teacher forward
over the 2b rows gives both branches.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from posttrain_jax.core.trainer import Batch
from posttrain_jax.distillation import losses as distillation_losses
from posttrain_jax.distillation.sources import sample_to_batch
from posttrain_jax.inference.sampling import guided_logits

NULL_KEYS = ("null_input_tokens", "null_segment_ids", "null_positions")
__all__ = ["NULL_KEYS", "cfg_batch", "null_view", "teacher_forward", "guided_teacher_logits",
           "reverse_kl_sums", "cfg_distillation_objective", "guided_logits"]


def null_view(tokens: jax.Array, prompt_mask: jax.Array, generated_mask: jax.Array,
              null_prompt: Sequence[int], pad_id: int = 0):
  """The unconditional view of sampled sequences [b, P + N] (left-padded layout):
  the prompt replaced by `null_prompt` right-aligned at slot P - 1, the generated
  tokens unchanged in their columns. Returns (tokens, segment_ids, positions)."""
  b, total = tokens.shape
  n = len(null_prompt)
  cols = jnp.arange(total)
  first_gen = _prompt_length(prompt_mask)
  null_cols = (cols >= first_gen - n) & (cols < first_gen)
  null_tok = jnp.asarray(null_prompt, jnp.int32)[jnp.clip(cols - (first_gen - n), 0, n - 1)]
  out = jnp.where(null_cols[None, :], null_tok[None, :],
                  jnp.where(generated_mask, tokens, pad_id)).astype(jnp.int32)
  segments = (null_cols[None, :] | generated_mask).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0).astype(jnp.int32)
  return out, jnp.broadcast_to(segments, (b, total)), positions


def _prompt_length(prompt_mask: jax.Array) -> jax.Array:
  """P: one past the last prompt column (left padding puts every prompt's end there)."""
  cols = jnp.arange(prompt_mask.shape[1])
  return jnp.max(jnp.where(jnp.any(prompt_mask, axis=0), cols + 1, 0))


def cfg_batch(sample, null_prompt: Sequence[int], pad_id: int = 0) -> Batch:
  """`sample_to_batch(sample)` plus the unconditional view's inputs [b, P + N - 1]:
  null_input_tokens, null_segment_ids, null_positions (targets and loss weights
  are shared: column t predicts the same generated token in both views)."""
  if not null_prompt:
    raise ValueError("cfg_batch needs a non-empty null_prompt, e.g. (1,).")
  batch = sample_to_batch(sample)
  tokens, segments, positions = null_view(sample.tokens, sample.prompt_mask,
                                          sample.generated_mask, null_prompt, pad_id)
  batch.update(null_input_tokens=tokens[:, :-1], null_segment_ids=segments[:, :-1],
               null_positions=positions[:, :-1])
  return batch


def teacher_forward(teacher, teacher_params, batch: Batch, return_hidden: bool = False):
  """One forward of the frozen teacher over the 2b rows [conditional; unconditional]
  (stop-gradient). Returns (cond_logits, uncond_logits[, hidden of both])."""
  b = batch["decoder_input_tokens"].shape[0]
  cat = lambda a, c: jnp.concatenate([batch[a], batch[c]], axis=0)
  out = teacher.apply({"params": jax.lax.stop_gradient(teacher_params)},
                      cat("decoder_input_tokens", "null_input_tokens"),
                      positions=cat("decoder_positions", "null_positions"),
                      segment_ids=cat("decoder_segment_ids", "null_segment_ids"),
                      return_hidden=return_hidden)
  out = jax.lax.stop_gradient(out)
  logits, hidden = out if return_hidden else (out, None)
  res = (logits[:b], logits[b:])
  return res + (hidden,) if return_hidden else res


def guided_teacher_logits(teacher, teacher_params, batch: Batch, gamma: float):
  """The CFG teacher's logits l_gamma on the batch's positions [b, T, V]."""
  cond, uncond = teacher_forward(teacher, teacher_params, batch)
  return guided_logits(cond, uncond, gamma)


def reverse_kl_sums(student_logits: jax.Array, teacher_logits: jax.Array,
                    weights: jax.Array) -> dict[str, jax.Array]:
  """sum_i sum_t w_it KL(p_S || p_T) (fp32, teacher stop-gradient); "weight" is the
  number of sequences (rows with any weight), "response_length" the number of
  scored tokens (per sequence once normalised)."""
  sums = distillation_losses.distillation_loss(
      student_logits, jax.lax.stop_gradient(teacher_logits), weights, kind="reverse_kl")
  rows = jnp.sum(jnp.any(weights > 0, axis=-1).astype(jnp.float32))
  return {"loss": sums["loss"], "weight": rows, "response_length": sums["weight"]}


def check_gamma(gamma: float) -> None:
  if not jnp.isfinite(gamma):
    raise ValueError(f"CFG gamma must be finite, got {gamma}.")


def cfg_distillation_objective(student, teacher, *, gamma: float):
  """loss_fn(student_params, batch, teacher_params) for `trainer.optimizer_step`:
  L_distil (module docstring) on a `cfg_batch`. Sums: "loss", "kl" (the same,
  per sequence after normalisation), "response_length", "weight" (= sequences)."""
  check_gamma(gamma)

  def loss_fn(params, batch: Batch, teacher_params):
    s_logits = student.apply({"params": params}, batch["decoder_input_tokens"],
                             positions=batch["decoder_positions"],
                             segment_ids=batch["decoder_segment_ids"])
    t_logits = guided_teacher_logits(teacher, teacher_params, batch, gamma)
    sums = reverse_kl_sums(s_logits, t_logits, batch["decoder_loss_weights"])
    return sums["loss"], {"loss": sums["loss"], "kl": jax.lax.stop_gradient(sums["loss"]),
                          "response_length": sums["response_length"],
                          "weight": sums["weight"]}
  return loss_fn
