"""BOND / J-BOND (rl/bond.py, rl/mixed_rollout.py): Sessa et al. 2024, arXiv 2407.14622.

pi_BoN against a Monte Carlo argmax-of-N with ties, N = 1, normalisation,
E[r_J], the Jeffreys limits beta = 0 / 1, eta = 0, the J-BOND update against a
hand computation on the enumerable toy policy (tests/toy_policy.py: at w = 0
with SGD lr 1 the update is minus the gradient of the hand-written loss), the
sharded step, the mixed rollout's row order and the train_policy job.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.inference.sampling import SampleOutput
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl import bond
from posttrain_jax.rl import mixed_rollout
from posttrain_jax.rl.bond import BOND, JBOND
from posttrain_jax.rl.policy_optimization import PolicyState, policy_step
from posttrain_jax.rl.policy_training import PolicyTrainer

from policy_runs import CFG, OPT, FixedPrompts, leaves, run, sft_dir  # pylint: disable=g-bad-import-order,unused-import
from toy_policy import N, T, V, TablePolicy, batch, log_pi  # pylint: disable=g-bad-import-order

P_REF = np.array([0.1, 0.25, 0.05, 0.3, 0.2, 0.1])
R_TIED = np.array([0.0, 1.0, 1.0, 2.0, 0.0, 3.0])     # ties at 0 and at 1


@pytest.mark.parametrize("n", [2, 3, 5])
def test_best_of_n_matches_monte_carlo_argmax_with_ties(n):
  rng = np.random.default_rng(n)
  draws = rng.choice(len(P_REF), size=(200_000, n), p=P_REF)
  picked = draws[np.arange(len(draws)), np.argmax(R_TIED[draws], axis=1)]
  empirical = np.bincount(picked, minlength=len(P_REF)) / len(draws)
  exact = bond.best_of_n_distribution(P_REF, R_TIED, n)
  np.testing.assert_allclose(exact, empirical, atol=4e-3)
  np.testing.assert_allclose(exact.sum(), 1.0, rtol=1e-12)
  # ties matter: the tie-free formula pi_ref * N p<=^(N-1)... differs from it
  assert not np.allclose(exact, P_REF * n * bond.quantiles(P_REF, R_TIED)[1] ** (n - 1),
                         atol=1e-3)


def test_best_of_one_is_pi_ref_and_every_n_sums_to_one():
  np.testing.assert_allclose(bond.best_of_n_distribution(P_REF, R_TIED, 1), P_REF,
                             rtol=1e-12)
  for n in range(1, 9):
    np.testing.assert_allclose(bond.best_of_n_distribution(P_REF, R_TIED, n).sum(), 1.0,
                               rtol=1e-12)
  # pi_BoN = pi_ref exp((N - 1) r_BOND), r_BOND with the collision term
  n = 4
  np.testing.assert_allclose(
      bond.best_of_n_distribution(P_REF, R_TIED, n),
      P_REF * np.exp((n - 1) * bond.bond_log_reward(P_REF, R_TIED, n)), rtol=1e-10)
  # KL(pi_BoN || pi_ref) <= log N - (N - 1) / N, reached as the atoms vanish
  kl, _ = bond.best_of_n_kls(P_REF, np.arange(6.0), n, P_REF)
  assert kl < bond.best_of_n_kl_bound(n)
  fine = np.full(4000, 1 / 4000)
  kl, _ = bond.best_of_n_kls(fine, np.arange(4000.0), n, fine)
  np.testing.assert_allclose(kl, bond.best_of_n_kl_bound(n), rtol=2e-3)
  with pytest.raises(ValueError, match="probability vector"):
    bond.best_of_n_distribution([0.5, 0.6], [0, 1], 2)


def test_expected_jbond_reward_is_minus_log16_times_one_minus_quantile_squared():
  _, leq = bond.quantiles(P_REF, R_TIED)
  r = jnp.asarray(R_TIED, jnp.float32)
  r_j = bond.jbond_reward(r[:, None, None], r[None, :, None], r[None, None, :])
  expected = np.einsum("yab,a,b->y", np.asarray(r_j, np.float64), P_REF, P_REF)
  np.testing.assert_allclose(expected, -math.log(16) * (1 - leq) ** 2, rtol=1e-6)
  half = np.array([0.25, 0.25, 0.5])           # p<=(y = 1) = 1/2
  _, leq = bond.quantiles(half, [0.0, 1.0, 2.0])
  h = jnp.asarray([0.0, 1.0, 2.0])
  e = np.einsum("ab,a,b->", np.asarray(bond.jbond_reward(h[1], h[:, None], h[None, :])),
                half, half)
  np.testing.assert_allclose([leq[1], e], [0.5, math.log(0.5)], rtol=1e-6)


def test_quantile_estimate_counts_reference_samples_at_or_below():
  ref = jnp.asarray([[0.0, 1.0, 1.0, 3.0]])
  got = bond.quantile_estimate(jnp.asarray([[1.0, -1.0, 3.0]]), ref[:, None, :])
  np.testing.assert_allclose(got, [[0.75, 0.0, 1.0]])


# ------------------------------------------------------------ the toy policy step

G = 3
ORDER = np.random.default_rng(2).permutation(N)       # 9 groups of 3 responses
REWARDS = np.random.default_rng(0).integers(0, 4, size=N).astype(np.float32)  # ties
W_ANCHOR = jnp.asarray(np.random.default_rng(1).normal(size=(T, V)), jnp.float32)
ROWS = np.asarray(batch(REWARDS, ORDER)["tokens"])[:, 1:]


def toy_step(algorithm, anchor=W_ANCHOR, ema_rate=0.0, g=G, lr=1.0):
  model, tx = TablePolicy(), optax.sgd(lr)
  params = {"w": jnp.zeros((T, V), jnp.float32)}
  state = PolicyState(jnp.zeros((), jnp.int32), params, tx.init(params), {"w": anchor})
  return policy_step(state, {"w": jnp.zeros((T, V))}, batch(REWARDS, ORDER), model=model,
                     tx=tx, schedule=lambda _: lr, algorithm=algorithm, beta=0.7,
                     ema_rate=ema_rate, samples_per_prompt=g)


def hand_terms(gamma=0.0):
  """(G_FW, G_BW, G_Reg) as ascent directions, by hand for J-BOND: per group
  (y, y'_1, y'_2), mean over the 9 groups."""
  r = REWARDS.reshape(-1, 3).astype(np.float64)     # rewards of the rows in order
  rows = ROWS.reshape(-1, 3, ROWS.shape[-1])
  lp0 = np.asarray(log_pi(jnp.zeros((T, V)), rows[:, 0]), np.float64)
  lpa = np.asarray(log_pi(W_ANCHOR, rows[:, 0]), np.float64)
  r_j = np.where(r[:, 0] < np.minimum(r[:, 1], r[:, 2]), -np.log(16.0), 0.0)
  ret = r_j - (lp0 - lpa)
  base = (ret.sum() - ret) / (len(ret) - 1)
  best = np.where(r[:, 2] > r[:, 1], 2, 1)            # first maximiser on ties
  b = len(ret)
  y_best = rows[np.arange(b), best]
  fw = jax.grad(lambda w: jnp.sum(log_pi(w, y_best)) / b)(jnp.zeros((T, V)))
  bw = jax.grad(lambda w: jnp.sum(jnp.asarray(ret - base, jnp.float32)
                                  * log_pi(w, rows[:, 0])) / b)(jnp.zeros((T, V)))
  reg = jax.grad(lambda w: jnp.sum(jnp.asarray(lp0 - lpa, jnp.float32)
                                   * log_pi(w, rows[:, 0])) / b)(jnp.zeros((T, V)))
  return fw, bw, -gamma * reg


@pytest.mark.parametrize("beta,gamma", [(0.5, 0.0), (0.3, 1.5)])
def test_jbond_update_matches_a_hand_computation(beta, gamma):
  new, metrics = toy_step(JBOND(beta=beta, gamma=gamma))
  fw, bw, reg = hand_terms(gamma)
  np.testing.assert_allclose(new.params["w"], (1 - beta) * fw + beta * bw + reg,
                             rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(metrics["bond/quantile"]))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_beta_zero_and_one_are_pure_forward_and_backward(beta):
  new, _ = toy_step(JBOND(beta=beta))
  fw, bw, _ = hand_terms()
  np.testing.assert_allclose(new.params["w"], fw if beta == 0 else bw, rtol=1e-5,
                             atol=1e-6)
  assert np.max(np.abs(np.asarray(fw - bw))) > 1e-2


def test_bond_backward_term_carries_n_minus_one_times_log_quantile():
  g, n = 5, 3        # 1 policy sample, k = 4 anchor samples, Best-of-3
  model, tx = TablePolicy(), optax.sgd(1.0)
  params = {"w": jnp.zeros((T, V), jnp.float32)}
  state = PolicyState(jnp.zeros((), jnp.int32), params, tx.init(params), {"w": W_ANCHOR})
  b_in = jax.tree.map(lambda x: x[:25], batch(REWARDS, ORDER))
  new, _ = policy_step(state, {"w": W_ANCHOR}, b_in, model=model, tx=tx,
                       schedule=lambda _: 1.0, algorithm=BOND(n=n, beta=1.0, num_policy=1),
                       beta=0.0, ema_rate=0.0, samples_per_prompt=g)
  r = REWARDS[:25].reshape(-1, g)
  rows = ROWS[:25].reshape(-1, g, ROWS.shape[-1])
  p_hat = np.mean(r[:, 1:] <= r[:, :1], axis=1)
  lp0 = np.asarray(log_pi(jnp.zeros((T, V)), rows[:, 0]))
  lpa = np.asarray(log_pi(W_ANCHOR, rows[:, 0]))
  ret = (n - 1) * np.log(np.maximum(p_hat, 1 / 8)) - (lp0 - lpa)
  adv = ret - (ret.sum() - ret) / (len(ret) - 1)
  want = jax.grad(lambda w: jnp.sum(jnp.asarray(adv, jnp.float32)
                                    * log_pi(w, rows[:, 0])) / len(ret))(jnp.zeros((T, V)))
  np.testing.assert_allclose(new.params["w"], want, rtol=1e-5, atol=1e-6)


def test_eta_zero_keeps_the_anchor_and_eta_mixes_it():
  kept, _ = toy_step(JBOND(), ema_rate=0.0)
  np.testing.assert_array_equal(kept.anchor_params["w"], W_ANCHOR)
  mixed, _ = toy_step(JBOND(), ema_rate=0.02)
  np.testing.assert_allclose(mixed.anchor_params["w"],
                             0.98 * W_ANCHOR + 0.02 * mixed.params["w"], rtol=1e-6)


def test_bad_settings_are_rejected():
  with pytest.raises(ValueError, match="samples_per_prompt = 3"):
    JBOND().check(4)
  with pytest.raises(ValueError, match="num_policy \\+ n"):
    BOND(n=4, num_policy=2).check(5)
  with pytest.raises(ValueError, match="Jeffreys"):
    BOND(beta=1.5).check(12)


def test_mixed_rollout_puts_each_source_in_its_place():
  def fake_sampler(params, prompts, rng, prompt_length):
    del rng
    rows = jnp.asarray([[params, p[0], 0] for p in prompts], jnp.int32)
    z = jnp.zeros_like(rows)
    return SampleOutput(rows, z, z, z, z.astype(jnp.float32), z.astype(jnp.float32),
                        jnp.zeros(len(prompts), jnp.int32))
  prompts = [[i // 3] for i in range(6)]
  out = mixed_rollout.sample(fake_sampler, {"policy": 7, "anchor": 9}, prompts,
                             jax.random.key(0), 1, JBOND().row_sources(3))
  np.testing.assert_array_equal(out.tokens[:, 0], [7, 9, 9, 7, 9, 9])
  np.testing.assert_array_equal(out.tokens[:, 1], [0, 0, 0, 1, 1, 1])


def _tiny_batch(b=24, t=10, prompt=4, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((b, t), np.float32)
  mask[:, prompt:] = 1.0
  return {"tokens": jnp.asarray(rng.integers(2, CFG.vocab_size, (b, t)), jnp.int32),
          "positions": jnp.tile(jnp.arange(t), (b, 1)),
          "segment_ids": jnp.ones((b, t), jnp.int32), "mask": jnp.asarray(mask),
          "rewards": jnp.asarray(rng.integers(0, 3, size=b), jnp.float32)}


def test_sharded_jbond_step_equals_unsharded_on_8_devices(sft_dir):
  schedule, tx = OPT.build(10)
  results = []
  for ici, devices in (({"data": 1}, jax.devices()[:1]),
                       ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())):
    mesh = partitioning.create_mesh(ici, devices=devices)
    trainer = PolicyTrainer(CFG, tx, schedule, mesh, beta=0.0, anchor="ema",
                            ema_rate=0.02, samples_per_prompt=3,
                            algorithm=JBOND(gamma=0.5))
    sft = params_checkpoint.restore_params(sft_dir, trainer.abstract_params, CFG)
    state = trainer.init_state(sft)
    for s in range(2):
      state, metrics = trainer.step(state, sft, _tiny_batch(seed=s))
    results.append((leaves((state.params, state.anchor_params)), jax.device_get(metrics)))
  (x1, m1), (x8, m8) = results
  for a, b in zip(x1, x8):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for key in ("loss", "bond/quantile", "bond/backward_kl", "kl_anchor"):
    np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, atol=1e-6)


def test_train_policy_runs_jbond_with_anchor_samples_and_hard_resets(tmp_path, sft_dir,
                                                                     capfd):
  result = run(tmp_path / "run", sft_dir, 2, algorithm=JBOND(), samples_per_prompt=3,
               anchor="ema", ema_rate=0.0, anchor_reset_every=2,
               prompt_source=FixedPrompts(batch_size=8))
  assert result.final_step == 2
  for key in ("loss", "bond/quantile", "bond/forward_kl", "kl_anchor", "kl_sft"):
    assert np.isfinite(result.metrics[2][key]), key
  m = result.metrics[2]  # J_beta = (1 - beta) forward + beta backward, beta = 0.5
  assert m["bond/jeffreys"] == pytest.approx(
      0.5 * m["bond/forward_kl"] + 0.5 * m["bond/backward_kl"], rel=1e-5)
  out = capfd.readouterr().out.splitlines()
  # The start line shows J-BOND's own beta only (train_policy.beta is not used).
  header = [l for l in out if "initialised from" in l]
  assert len(header) == 1 and "J-BOND(" in header[0] and "beta=0.5" in header[0]
  assert "| beta " not in header[0] and "| anchor ema (mu 0.0) |" in header[0]
  # The progress line shows the Jeffreys objective's pieces, not the surrogate loss.
  progress = [l for l in out if l.startswith("step 2/2")]
  assert len(progress) == 1
  assert all(f"| {k} " in progress[0] for k in ("jeffreys", "fwd_kl", "bwd_kl", "quantile"))
  assert "| loss " not in progress[0]
  for a, b in zip(leaves(result.state.params), leaves(result.state.anchor_params)):
    np.testing.assert_array_equal(a, b)       # reset at step 2
  with pytest.raises(ValueError, match="anchor_reset_every needs anchor"):
    run(tmp_path / "bad", sft_dir, 1, anchor="sft", anchor_reset_every=2)
