"""Partitioned knowledge-distillation step: a frozen teacher, a trained student.

The objective (Tiapkin et al. 2025, "On Teacher Hacking in Language Model
Distillation", arXiv 2502.02671, Sec. 3; Gemma 2 report, Sec. 3.2):

    L(pi_S) = E_{x ~ rho} E_{y ~ nu(.|x)} sum_t w_t l(pi_T(.|x, y<t), pi_S(.|x, y<t))

with l a token-level divergence from `distillation_losses` (forward KL by
default) and nu the data source (offline teacher generations, fresh teacher or
student samples, see `distillation_sources`). Batches use the LM layout
(decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
decoder_segment_ids, decoder_positions): the loss weights mark the response
tokens, so prompt and padding positions count zero. Pretraining distillation
(Gemma 2) is the same step on plain LM batches (weight 1 on every token).

The teacher is a separate model (its own `ModelConfig`: size, dtype) whose
parameters are sharded by the same logical-axis rules and passed to the jitted
step as an argument (`aux` of `trainer.optimizer_step`): they get no gradient
and are never donated or updated. With `chunk_size`, both models return hidden
states and the logits are formed one sequence chunk at a time
(`chunked_distillation_loss`), so no [batch, length, vocab] array exists.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from posttrain_jax.core import partitioning
from posttrain_jax.core.losses import chunked_cross_entropy_sums, cross_entropy_sums
from posttrain_jax.core.trainer import Batch, Trainer, optimizer_step
from posttrain_jax.distillation import losses as distillation_losses
from posttrain_jax.models import ModelConfig, Transformer


def _apply(model: Transformer, params, batch: Batch, **kwargs):
  return model.apply({"params": params}, batch["decoder_input_tokens"],
                     positions=batch.get("decoder_positions"),
                     segment_ids=batch.get("decoder_segment_ids"), **kwargs)


def distillation_objective(student: Transformer, teacher: Transformer, *,
                           kind: str = "forward_kl", temperature: float = 1.0,
                           beta: float = 0.5, chunk_size: int | None = None):
  """loss_fn(student_params, batch, teacher_params) for `optimizer_step`.

  Sums: "loss" (the divergence), "nll" (student cross-entropy of the batch's
  target tokens, i.e. the sampled tokens), "accuracy" (student argmax equals
  the target) and "weight" (number of scored tokens).
  """
  distillation_losses._check(kind, temperature, beta)  # pylint: disable=protected-access

  def loss_fn(params, batch: Batch, teacher_params):
    weights = batch["decoder_loss_weights"]
    teacher_params = jax.lax.stop_gradient(teacher_params)
    if chunk_size is None:
      s_logits = _apply(student, params, batch)
      t_logits = jax.lax.stop_gradient(_apply(teacher, teacher_params, batch))
      sums = distillation_losses.distillation_loss(
          s_logits, t_logits, weights, kind=kind, temperature=temperature, beta=beta)
      ce = cross_entropy_sums(s_logits, batch["decoder_target_tokens"], weights)
      nll, correct = ce["cross_entropy"], ce["correct"]
    else:
      s_hidden = _apply(student, params, batch, hidden_only=True)
      t_hidden = jax.lax.stop_gradient(_apply(teacher, teacher_params, batch,
                                              hidden_only=True))
      head = lambda model, p: functools.partial(
          model.apply, {"params": p}, method="hidden_to_logits")
      sums = distillation_losses.chunked_distillation_loss(
          s_hidden, t_hidden, weights, chunk_size=chunk_size,
          student_head=head(student, params), teacher_head=head(teacher, teacher_params),
          kind=kind, temperature=temperature, beta=beta)
      ce = chunked_cross_entropy_sums(  # metrics only: no gradient
          jax.lax.stop_gradient(s_hidden), batch["decoder_target_tokens"], weights,
          head=head(student, jax.lax.stop_gradient(params)), chunk_size=chunk_size)
      nll, correct = ce["cross_entropy"], ce["correct"]
    out = {"loss": sums["loss"], "nll": jax.lax.stop_gradient(nll),
           "accuracy": jax.lax.stop_gradient(correct), "weight": sums["weight"]}
    return sums["loss"], out
  return loss_fn


class DistillationTrainer(Trainer):
  """`Trainer` for the student plus a frozen, sharded teacher.

  `train_step(state, batch, teacher_params)`; `teacher_shardings` and
  `abstract_teacher_params` place the teacher's parameters (restore them with
  params_checkpoint.restore_params onto these). Evaluation (`eval_sums`) is the
  student's LM loss, as in `Trainer`.
  """

  def __init__(self, student_config: ModelConfig, teacher_config: ModelConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               mesh: jax.sharding.Mesh, rules=partitioning.DEFAULT_RULES, *,
               kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
               chunk_size: int | None = None, num_microbatches: int = 1,
               skip_nonfinite: bool = True):
    if teacher_config.vocab_size != student_config.vocab_size:
      raise ValueError(
          f"Teacher vocab_size {teacher_config.vocab_size} != student vocab_size "
          f"{student_config.vocab_size}: token-level distillation needs one vocabulary.")
    super().__init__(Transformer(student_config), tx, schedule, mesh, rules,
                     num_microbatches=num_microbatches, skip_nonfinite=skip_nonfinite)
    self.teacher = Transformer(teacher_config)
    abstract, self.teacher_shardings = partitioning.params_and_shardings(
        lambda: self.teacher.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
        mesh, rules)
    self.abstract_teacher_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, self.teacher_shardings)
    loss_fn = distillation_objective(self.model, self.teacher, kind=kind,
                                     temperature=temperature, beta=beta,
                                     chunk_size=chunk_size)
    self._distill = jax.jit(
        functools.partial(optimizer_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                          num_microbatches=num_microbatches,
                          skip_nonfinite=skip_nonfinite),
        in_shardings=(self.state_shardings, self.batch_sharding, self.teacher_shardings),
        out_shardings=(self.state_shardings, partitioning.replicated(mesh)),
        donate_argnums=(0,))

  def init_teacher(self, rng: jax.Array):
    """Randomly initialised teacher parameters (tests; real runs restore them)."""
    with self._context():
      init = lambda r: nn.unbox(self.teacher.init(r, jnp.zeros((1, 1), jnp.int32))["params"])
      return jax.jit(init, out_shardings=self.teacher_shardings)(rng)

  def train_step(self, state, batch: Batch, teacher_params=None):
    if teacher_params is None:
      raise ValueError("DistillationTrainer.train_step needs the teacher's parameters.")
    with self._context():
      return self._distill(state, batch, teacher_params)
