"""The joint objective Q + beta D of diversity-rewarded CFG distillation, its
trainer, and LERP of its two students (Cideron et al. 2024, arXiv 2410.06084)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.distillation import cfg as cfg_lib
from posttrain_jax.merging.interpolation import average
from posttrain_jax.rl import diversity as dv
from posttrain_jax.rl import quality_diversity as qd
from cfg_models import CFG, MODEL, batch, params  # pylint: disable=g-bad-import-order

G = 2  # batch(): two prompts, one sample each -> one group of 2 here


def _qd(beta, baseline="none"):
  return qd.qd_objective(MODEL, MODEL, gamma=2.0, beta=beta, samples_per_prompt=G,
                         baseline=baseline)


def test_beta_zero_is_cfg_distillation():
  s, t = params(1), params()
  want, _ = cfg_lib.cfg_distillation_objective(MODEL, MODEL, gamma=2.0)(s, batch(), t)
  got, sums = _qd(0.0)(s, batch(), t)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(sums["kl"]), float(want), rtol=1e-6)


def test_diversity_term_is_minus_beta_advantage_times_logprob():
  """objective(beta) - objective(0) = -beta sum_i A_i log pi(y_i|c), with A from
  the frozen theta_0's mean-pooled hidden states, recomputed here."""
  s, t, beta = params(1), params(), 15.0
  b = batch()
  obj0, _ = _qd(0.0)(s, b, t)
  obj, sums = _qd(beta)(s, b, t)
  _, hidden = MODEL.apply({"params": t}, b["decoder_input_tokens"],
                          positions=b["decoder_positions"],
                          segment_ids=b["decoder_segment_ids"], return_hidden=True)
  w = np.asarray(b["decoder_loss_weights"])
  emb = np.stack([np.asarray(hidden[i])[w[i] > 0].mean(0) for i in range(2)])
  d = 1 - emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1])
  adv = 2 * np.array([d, d])   # G = 2, no baseline: r_i = D_12
  logits = MODEL.apply({"params": s}, b["decoder_input_tokens"],
                       positions=b["decoder_positions"], segment_ids=b["decoder_segment_ids"])
  lp = np.asarray(jax.nn.log_softmax(logits))
  tgt = np.asarray(b["decoder_target_tokens"])
  logp = np.array([sum(lp[i, j, tgt[i, j]] * w[i, j] for j in range(w.shape[1]))
                   for i in range(2)])
  np.testing.assert_allclose(float(obj - obj0), -beta * float(adv @ logp), rtol=1e-4)
  np.testing.assert_allclose(float(sums["diversity"]) / 2, d, rtol=1e-4)
  assert d > 1e-4


def test_teacher_gets_no_gradient_with_the_diversity_term():
  s, t = params(1), params()
  grads = jax.grad(lambda x: _qd(15.0)(s, batch(), x)[0])(t)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_lerp_endpoints_and_midpoint():
  q, d = params(1), params(2)
  for lam, want in ((0.0, q), (1.0, d)):
    got = average([q, d], [1.0 - lam, lam])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  mid = average([q, d], [0.5, 0.5])
  for m, a, b in zip(*(jax.tree.leaves(x) for x in (mid, q, d))):
    np.testing.assert_allclose(m, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6, atol=1e-7)


def test_trainer_step_runs_and_bad_settings_rejected():
  mesh = partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1])
  sched = optax.constant_schedule(1e-3)
  tr = qd.QDTrainer(CFG, optax.adam(sched), sched, mesh, gamma=2.0, beta=1.0,
                    samples_per_prompt=G, baseline="none")
  t = tr.init_teacher(jax.random.key(0))
  state = tr.init_state(jax.random.key(1))
  state, m = tr.train_step(state, batch(), t)
  assert np.isfinite(float(m["loss"])) and float(m["kl"]) > 0 and int(state.step) == 1
  with pytest.raises(ValueError, match="num_microbatches=1"):
    qd.QDTrainer(CFG, optax.adam(sched), sched, mesh, beta=1.0, num_microbatches=2)
  with pytest.raises(ValueError, match="beta"):
    qd.qd_objective(MODEL, MODEL, gamma=2.0, beta=-1.0, samples_per_prompt=2)
  with pytest.raises(ValueError, match="samples_per_prompt >= 3"):
    qd.qd_objective(MODEL, MODEL, gamma=2.0, beta=1.0, samples_per_prompt=2,
                    baseline="leave_one_out")
  assert dv.BASELINES
