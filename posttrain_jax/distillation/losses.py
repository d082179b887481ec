"""Token-level distillation losses (pure functions).

The student is trained on sequences y drawn from a data source nu (offline
teacher generations, online teacher samples or on-policy student samples) with

    L(pi_S) = E_{x~rho} E_{y~nu(.|x)} sum_t w_t * l(p_T(.|x, y<t), p_S(.|x, y<t))

(Tiapkin et al. 2025, "On Teacher Hacking in Language Model Distillation",
arXiv 2502.02671; the forward KL is the loss of their main figure and is the
default here; the set of other losses they compare is a reconstruction [M]).
The per-token divergences l offered:

  forward_kl     KL(p_T || p_S) = sum_v p_T(v) [log p_T(v) - log p_S(v)]
  reverse_kl     KL(p_S || p_T) = sum_v p_S(v) [log p_S(v) - log p_T(v)]
  jsd            JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m),
                 m = beta p_T + (1 - beta) p_S, 0 < beta < 1
                 (generalized JSD as in GKD, Agarwal et al. 2024; <= log 2 at beta = 0.5)
  jeffreys       beta KL(p_T || p_S) + (1 - beta) KL(p_S || p_T)
                 (beta = 0.5 is half the Jeffreys divergence) [M: an extra
                 option; the mix weighting is our choice]
  cross_entropy  H(p_T, p_S) = -sum_v p_T(v) log p_S(v)
                 (Gemma Team 2024, "Gemma 2: Improving Open Language Models at
                 a Practical Size", arXiv 2408.00118, knowledge distillation). Its
                 gradient w.r.t. the student equals the forward KL's; its value
                 exceeds KL(p_T || p_S) by the teacher entropy H(p_T), which is
                 returned with it ("teacher_entropy"; "forward_kl" too).

Both distributions are p = softmax(z / temperature), computed in float32 with
log_softmax (never softmax-then-log; probabilities are exp(log p)). Logits
must be finite: mask vocabulary entries with a large negative number, not -inf.
Teacher logits pass through `jax.lax.stop_gradient`: no gradient reaches them.
`temperature_squared_scale=True` multiplies the loss by temperature^2 (Hinton et
al. 2015) so gradient magnitudes do not shrink with temperature [M: off by
default; the paper's temperature is 1].

As in `posttrain_jax.core.losses`, every function returns *sums* over tokens
({"loss": sum_t w_t l_t, "weight": sum_t w_t, ...}) so that a caller normalises
once per (accumulated) step.

`chunked_distillation_loss` computes the same sums scanning over chunks of the
sequence, so with a 256k vocabulary only [batch, chunk, vocab] float32
intermediates live at a time; with `student_head`/`teacher_head` it takes
hidden states and projects each chunk to logits itself (the [batch, length,
vocab] logits are then never materialised, forward or backward: the chunk body
is rematerialised). For the Gemma 2 model the head is the tied unembedding
followed by the final soft-cap (what `Transformer` applies to its hidden states):

    emb = params["embedder"]["embedding"]
    head = lambda h: layers.soft_cap(
        jnp.einsum("btd,vd->btv", h, emb.astype(cfg.compute_dtype),
                   preferred_element_type=jnp.float32), cfg.final_logit_soft_cap)

(`Transformer(..., return_hidden=True)` still computes the full logits too; a
hidden-states-only output is needed for the saving to be real.)
"""

from __future__ import annotations

from collections.abc import Callable
import math

import jax
import jax.numpy as jnp

from posttrain_jax.core import losses

Array = jax.Array

KINDS = ("forward_kl", "reverse_kl", "jsd", "jeffreys", "cross_entropy")


def _check(kind: str, temperature: float, beta: float) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown distillation loss {kind!r}; expected one of {KINDS}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if kind in ("jsd", "jeffreys") and not 0.0 < beta < 1.0:
    raise ValueError(f"beta must be in (0, 1) for {kind}, got {beta}")


def _kl_from_logp(logp: Array, logq: Array) -> Array:
  """sum_v p(v) (log p(v) - log q(v)) over the last axis, 0 * (-inf) treated as 0."""
  p = jnp.exp(logp)
  diff = jnp.where(p > 0, logp - logq, 0.0)
  return jnp.sum(p * diff, axis=-1)


def token_divergence(student_logits: Array, teacher_logits: Array, *,
                     kind: str = "forward_kl", temperature: float = 1.0,
                     beta: float = 0.5) -> dict[str, Array]:
  """Per-token divergence l_t [..., ] (no weights), plus per-token extras.

  Args:
    student_logits: float [..., vocab].
    teacher_logits: float [..., vocab]; gradient is stopped.
    kind: one of KINDS (see the module docstring for the equations).
    temperature: softmax temperature applied to both distributions.
    beta: JSD / Jeffreys mixing weight.

  Returns:
    {"loss": l [...]} and, for cross_entropy, "forward_kl" and
    "teacher_entropy" [...] (loss = forward_kl + teacher_entropy).
  """
  _check(kind, temperature, beta)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  if kind == "forward_kl":
    return {"loss": _kl_from_logp(log_t, log_s)}
  if kind == "reverse_kl":
    return {"loss": _kl_from_logp(log_s, log_t)}
  if kind == "jeffreys":
    return {"loss": beta * _kl_from_logp(log_t, log_s)
                    + (1.0 - beta) * _kl_from_logp(log_s, log_t)}
  if kind == "jsd":
    # log m = log(beta p_T + (1 - beta) p_S), in log space.
    log_m = jnp.logaddexp(math.log(beta) + log_t, math.log1p(-beta) + log_s)
    return {"loss": beta * _kl_from_logp(log_t, log_m)
                    + (1.0 - beta) * _kl_from_logp(log_s, log_m)}
  # cross_entropy
  p_t = jnp.exp(log_t)
  ce = -jnp.sum(p_t * log_s, axis=-1)
  ent = -jnp.sum(jnp.where(p_t > 0, p_t * log_t, 0.0), axis=-1)
  return {"loss": ce, "forward_kl": ce - ent, "teacher_entropy": ent}


def distillation_loss(student_logits: Array, teacher_logits: Array, weights: Array, *,
                      kind: str = "forward_kl", temperature: float = 1.0,
                      beta: float = 0.5,
                      temperature_squared_scale: bool = False) -> dict[str, Array]:
  """Weighted token-level distillation loss, summed over tokens.

  loss = s * sum_t w_t * l(p_T(.|ctx_t), p_S(.|ctx_t)),  s = temperature^2 if
  temperature_squared_scale else 1, p = softmax(logits / temperature).

  Args:
    student_logits: float [batch, length, vocab] (any float dtype; fp32 inside).
    teacher_logits: float [batch, length, vocab] on the same positions.
    weights: [batch, length]; 0 masks a position (prompt, padding).
    kind, temperature, beta: see `token_divergence`.
    temperature_squared_scale: multiply by temperature^2 (Hinton et al. 2015) [M].

  Returns:
    dict of scalars: "loss" (what to differentiate), "weight" = sum_t w_t, and
    for cross_entropy also "forward_kl" and "teacher_entropy" sums.
  """
  weights = weights.astype(jnp.float32)
  per_tok = token_divergence(student_logits, teacher_logits, kind=kind,
                             temperature=temperature, beta=beta)
  scale = temperature ** 2 if temperature_squared_scale else 1.0
  out = {k: jnp.sum(v * weights) for k, v in per_tok.items()}
  out["loss"] = scale * out["loss"]
  out["weight"] = jnp.sum(weights)
  return out


def chunked_distillation_loss(student: Array, teacher: Array, weights: Array, *,
                              chunk_size: int,
                              student_head: Callable[[Array], Array] | None = None,
                              teacher_head: Callable[[Array], Array] | None = None,
                              kind: str = "forward_kl", temperature: float = 1.0,
                              beta: float = 0.5,
                              temperature_squared_scale: bool = False) -> dict[str, Array]:
  """`distillation_loss` computed by a `lax.scan` over sequence chunks.

  Same sums as `distillation_loss` (up to float summation order). Only one
  chunk's [batch, chunk_size, vocab] float32 intermediates are live at a time,
  and the chunk body is wrapped in `jax.checkpoint`, so the backward pass
  recomputes them per chunk instead of storing them for the whole sequence.

  Args:
    student, teacher: [batch, length, vocab] logits, or [batch, length, d]
      hidden states when the corresponding head is given.
    weights: [batch, length].
    chunk_size: positions per chunk; the length is zero-padded (weight 0) to a
      multiple of it.
    student_head / teacher_head: optional callables [batch, c, d] -> logits
      [batch, c, vocab] (e.g. the tied unembedding and final soft-cap). They may
      close over parameters; gradients flow to the student head's, never to the
      teacher's.
    kind, temperature, beta, temperature_squared_scale: as `distillation_loss`.
  """
  _check(kind, temperature, beta)

  def chunk_sums(s, t, w):
    s_logits = s if student_head is None else student_head(s)
    t_logits = t if teacher_head is None else teacher_head(t)
    return distillation_loss(s_logits, t_logits, w, kind=kind, temperature=temperature,
                             beta=beta, temperature_squared_scale=temperature_squared_scale)

  return losses.scan_chunk_sums(
      chunk_sums, (student, jax.lax.stop_gradient(teacher), weights.astype(jnp.float32)),
      chunk_size)
