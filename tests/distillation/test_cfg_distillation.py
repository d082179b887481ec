"""CFG distillation (Cideron et al. 2024, arXiv 2410.06084): the guided teacher and
the on-policy reverse-KL loss (the paper's Eq. 2: zero with zero gradient at
theta = theta_0 and gamma = 1; no gradient to the teacher)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.distillation import cfg as cfg_lib
from cfg_models import CFG, MODEL, NULL, PROMPTS, batch, params  # pylint: disable=g-bad-import-order,unused-import


def test_null_view_replaces_the_prompt_and_keeps_generated_columns():
  tokens = jnp.asarray([[0, 5, 6, 7, 8], [0, 0, 9, 11, 12]])
  prompt = jnp.asarray([[0, 1, 1, 0, 0], [0, 0, 1, 0, 0]], bool)
  gen = jnp.asarray([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], bool)
  toks, seg, pos = cfg_lib.null_view(tokens, prompt, gen, (1, 2), pad_id=0)
  np.testing.assert_array_equal(toks, [[0, 1, 2, 7, 8], [0, 1, 2, 11, 0]])
  np.testing.assert_array_equal(seg, [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
  np.testing.assert_array_equal(pos[:, 1:4], [[0, 1, 2], [0, 1, 2]])
  np.testing.assert_array_equal(pos[0, 4], 3)


def _loss(gamma, student_params, teacher_params):
  fn = cfg_lib.cfg_distillation_objective(MODEL, MODEL, gamma=gamma)
  return fn(student_params, batch(), teacher_params)


def test_gamma_one_at_theta0_kl_zero_with_zero_gradient():
  p = params()
  (loss, sums), grads = jax.value_and_grad(
      lambda s: _loss(1.0, s, p), has_aux=True)(p)
  assert abs(float(loss)) < 1e-6
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-5  # fp32
  assert float(sums["weight"]) == 2 and float(sums["response_length"]) == 10


def test_teacher_gets_no_gradient_and_guidance_moves_the_student():
  p, s = params(), params(1)
  grads_t = jax.grad(lambda t: _loss(3.0, s, t)[0])(p)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads_t))
  (loss, _), grads = jax.value_and_grad(lambda x: _loss(3.0, x, p), has_aux=True)(p)
  assert float(loss) > 1e-3   # gamma = 3 at theta_0: the teacher differs from the student
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 1e-2


def test_loss_equals_reference_from_separate_full_forwards():
  """The guided teacher recomputed row by row, without the batched null view."""
  gamma, s, t = 2.5, params(1), params()
  b = batch()
  want = 0.0
  for row, prompt in enumerate(PROMPTS):
    w = np.asarray(b["decoder_loss_weights"][row])
    gen = np.asarray(b["decoder_target_tokens"][row])[w > 0].tolist()
    seq = jnp.asarray([prompt + gen[:-1]])
    s_l = MODEL.apply({"params": s}, seq)[0, len(prompt) - 1:]
    c_l = MODEL.apply({"params": t}, seq)[0, len(prompt) - 1:]
    u_l = MODEL.apply({"params": t}, jnp.asarray([list(NULL) + gen[:-1]]))[0]
    g_lp = jax.nn.log_softmax(gamma * c_l + (1 - gamma) * u_l)
    s_lp = jax.nn.log_softmax(s_l)
    want += float(jnp.sum(jnp.exp(s_lp) * (s_lp - g_lp)))
  loss, _ = _loss(gamma, s, t)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)


def test_bad_inputs_rejected():
  with pytest.raises(ValueError, match="gamma must be finite"):
    cfg_lib.cfg_distillation_objective(MODEL, MODEL, gamma=float("inf"))
  with pytest.raises(ValueError, match="null_prompt"):
    cfg_lib.cfg_batch(None, ())
