"""The quality-diversity objective of diversity-rewarded CFG distillation.

Cideron et al. 2024 (arXiv 2410.06084, Sec. 3): the student maximises

    QD(theta) = Q(theta) + beta * D(theta),     Q = -L_distil

with L_distil the per-token reverse KL to the CFG-guided frozen initial model
(`distillation.cfg`) on the student's own samples and D the expected pairwise
diversity 1 - cos(E(y1), E(y2)) of two samples of one prompt (`rl.diversity`),
optimised by REINFORCE with a baseline. One step minimises, per sequence,

    sum_t KL(pi_theta(.|y<t, c) || pi^gamma_theta0(.|y<t, c)) - beta * A_i log pi_theta(y_i|c)

(the second term's gradient is the unbiased score-function estimate of
beta * grad D). beta = 0 is the paper's quality model, beta > 0 (15 in the
paper [M]) its diversity model; their LERP (`merging.interpolation.average`)
traces the quality-diversity front.

Rows come in groups of samples_per_prompt consecutive samples of one prompt, so
the step takes the whole batch at once (num_microbatches = 1 when beta > 0).
"""

from __future__ import annotations

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
import optax

from posttrain_jax.core import partitioning
from posttrain_jax.core.trainer import Batch, optimizer_step
from posttrain_jax.distillation import cfg as cfg_lib
from posttrain_jax.distillation.trainer import DistillationTrainer
from posttrain_jax.models import ModelConfig
from posttrain_jax.rl import diversity as diversity_lib
from posttrain_jax.rl import policy_gradient as pg

# embedder(batch) -> [b, d]: a jit-traceable function of a cfg_batch (a frozen model's closure)
Embedder = Callable[[Batch], jax.Array]


def target_logprobs(logits: jax.Array, batch: Batch) -> jax.Array:
  """log pi(y|c) [b]: the summed log-probs of the weighted target tokens."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(lp, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
  return jnp.sum(tok * batch["decoder_loss_weights"].astype(jnp.float32), axis=-1)


def qd_objective(student, teacher, *, gamma: float, beta: float, samples_per_prompt: int,
                 baseline: str = "batch", embedder: Embedder | None = None):
  """loss_fn(student_params, batch, teacher_params) for `trainer.optimizer_step` on a
  `distillation.cfg.cfg_batch` of groups of samples_per_prompt rows.

  Sums (per sequence once normalised): "loss" (the joint objective), "kl"
  (L_distil), "diversity" (mean pairwise D of the batch's groups, embedded by
  `embedder` or, by default, mean-pooled final hidden states of the frozen
  initial model), "diversity_objective" (the REINFORCE surrogate term),
  "response_length", "weight" (= sequences).
  """
  cfg_lib.check_gamma(gamma)
  if not beta >= 0:
    raise ValueError(f"beta (the diversity weight) must be >= 0, got {beta}.")
  if beta > 0:
    diversity_lib.check_baseline(baseline, samples_per_prompt)

  def loss_fn(params, batch: Batch, teacher_params):
    weights = batch["decoder_loss_weights"]
    s_logits = student.apply({"params": params}, batch["decoder_input_tokens"],
                             positions=batch["decoder_positions"],
                             segment_ids=batch["decoder_segment_ids"])
    cond, uncond, hidden = cfg_lib.teacher_forward(teacher, teacher_params, batch,
                                                   return_hidden=True)
    sums = cfg_lib.reverse_kl_sums(s_logits, cfg_lib.guided_logits(cond, uncond, gamma),
                                   weights)
    rows = sums["weight"]
    if embedder is None:
      emb = diversity_lib.mean_pooled_embedding(hidden[:weights.shape[0]], weights)
    else:
      emb = embedder(batch)
    adv, div = diversity_lib.diversity_advantages(
        jax.lax.stop_gradient(emb), samples_per_prompt,
        baseline if beta > 0 else "none")
    objective = sums["loss"]
    div_objective = jnp.float32(0.0)
    if beta > 0:
      div_objective, _ = pg.reinforce_loss_sums(target_logprobs(s_logits, batch), adv)
      objective = objective + beta * div_objective
    out = {"loss": objective, "kl": jax.lax.stop_gradient(sums["loss"]),
           "diversity": div["diversity"] * rows,
           "diversity_objective": jax.lax.stop_gradient(div_objective),
           "response_length": sums["response_length"], "weight": rows}
    return objective, out
  return loss_fn


class QDTrainer(DistillationTrainer):
  """`DistillationTrainer` whose step is `qd_objective`: a student trained
  against the CFG-guided frozen teacher (the same architecture: the initial
  model), with beta times the diversity reward.

  `train_step(state, batch, teacher_params)` with batch a `cfg_batch`.
  """

  def __init__(self, model_config: ModelConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule, mesh: jax.sharding.Mesh,
               rules=partitioning.DEFAULT_RULES, *, gamma: float = 3.0, beta: float = 0.0,
               samples_per_prompt: int = 2, baseline: str = "batch",
               embedder: Embedder | None = None, num_microbatches: int = 1,
               skip_nonfinite: bool = True):
    if beta > 0 and num_microbatches != 1:
      raise ValueError("The diversity reward compares the samples of one prompt across "
                       "rows, so the QD step takes the whole batch: set "
                       f"num_microbatches=1 (got {num_microbatches}) or beta=0.")
    super().__init__(model_config, model_config, tx, schedule, mesh, rules,
                     kind="reverse_kl", num_microbatches=num_microbatches,
                     skip_nonfinite=skip_nonfinite)
    self.gamma, self.beta = gamma, beta
    loss_fn = qd_objective(self.model, self.teacher, gamma=gamma, beta=beta,
                           samples_per_prompt=samples_per_prompt, baseline=baseline,
                           embedder=embedder)
    self._distill = jax.jit(
        functools.partial(optimizer_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                          num_microbatches=num_microbatches,
                          skip_nonfinite=skip_nonfinite),
        in_shardings=(self.state_shardings, self.batch_sharding, self.teacher_shardings),
        out_shardings=(self.state_shardings, partitioning.replicated(mesh)),
        donate_argnums=(0,))
