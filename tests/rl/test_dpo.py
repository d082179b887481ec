"""DPO / cDPO / IPO losses against hand computations and their limits; the
sequence log-probs of the pairs; the partitioned DPO step on 8 CPU devices
against the unsharded one (and microbatches, padding pairs, precomputed
reference)."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.data.preferences import pairs_to_batch
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.rl.dpo import METRICS, check_dpo_args, dpo_losses, dpo_sums
from posttrain_jax.rl.dpo_training import DPOTrainer, dpo_objective, pair_logprobs

RNG = np.random.default_rng(0)
N = 6
LP_W, LP_L, REF_W, REF_L = (jnp.asarray(RNG.normal(size=N) * 4 - 20, jnp.float32)
                            for _ in range(4))
WEIGHTS = jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def grads(beta, **kw):
  """(objective, sums, gradients wrt the four log-prob arrays)."""
  fn = lambda *lp: dpo_sums(*lp, WEIGHTS, beta=beta, **kw)
  (objective, sums), g = jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True)(
      LP_W, LP_L, REF_W, REF_L)
  return objective, sums, [np.asarray(x) for x in g]


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_sigmoid_loss_gradient_and_metrics_match_hand_computation(beta, eps):
  objective, sums, (g_w, g_l, g_rw, g_rl) = grads(beta, label_smoothing=eps)
  a, b, c, d, w = (np.asarray(x, np.float64) for x in (LP_W, LP_L, REF_W, REF_L, WEIGHTS))
  h = beta * ((a - c) - (b - d))
  loss = (1 - eps) * np.logaddexp(0.0, -h) + eps * np.logaddexp(0.0, h)
  np.testing.assert_allclose(objective, np.sum(w * loss), rtol=1e-5)
  # d loss / dh = -(1 - eps) sigma(-h) + eps sigma(h); dh/d logp_w = beta = -dh/d logp_l
  dl_dh = -(1 - eps) * sigmoid(-h) + eps * sigmoid(h)
  np.testing.assert_allclose(g_w, w * beta * dl_dh, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_l, -w * beta * dl_dh, rtol=1e-5, atol=1e-7)
  assert not g_rw.any() and not g_rl.any()  # the reference is a constant
  expect = {"loss": loss, "rewards_chosen": beta * (a - c), "rewards_rejected": beta * (b - d),
            "reward_margin": h, "accuracy": (h > 0).astype(float), "logp_chosen": a,
            "logp_rejected": b}
  assert set(sums) == set(METRICS) | {"weight"} and float(sums["weight"]) == 5.0
  for k, v in expect.items():
    np.testing.assert_allclose(sums[k], np.sum(w * v), rtol=1e-5, atol=1e-5, err_msg=k)
  # both signs of h occur, so the accuracy is neither 0 nor 1; a tie counts 0
  assert 0.0 < float(sums["accuracy"]) < 5.0
  ties = dpo_sums(LP_W, LP_L, LP_W, LP_L, beta=beta, label_smoothing=eps)[1]
  assert float(ties["accuracy"]) == 0.0 and float(ties["reward_margin"]) == 0.0


def test_beta_to_zero_limit():
  beta = 1e-6
  objective, _, (g_w, g_l, _, _) = grads(beta)
  np.testing.assert_allclose(objective / 5.0, np.log(2.0), rtol=1e-5)
  w = np.asarray(WEIGHTS)
  # grad / beta -> -(1/2) d(logp_w - logp_l): the gradient vanishes like beta
  np.testing.assert_allclose(g_w / beta, -0.5 * w, atol=1e-3)
  np.testing.assert_allclose(g_l / beta, 0.5 * w, atol=1e-3)


def test_beta_to_zero_limit_of_the_model_gradient():
  """Through the model: grad_theta(loss) / beta -> -(1/2) grad_theta sum(logp_w - logp_l)."""
  model, batch = Transformer(CFG), device_batch(make_pairs(4, 1))
  ref = init_params(0)
  params = jax.tree.map(lambda x, y: x + 0.05 * y, ref, init_params(1))  # pi != pi_ref
  beta = 1e-6
  g = jax.jit(jax.grad(lambda p: dpo_objective(model, beta=beta)(p, batch, ref)[0]))(params)

  def gap(p):
    chosen, rejected = pair_logprobs(model, p, batch)
    return jnp.sum(chosen - rejected)
  want = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(gap))(params))[0] * -0.5
  got = jax.flatten_util.ravel_pytree(g)[0] / beta
  assert float(jnp.linalg.norm(got - want)) < 1e-4 * float(jnp.linalg.norm(want))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.49])
def test_label_smoothing(eps):
  h = jnp.linspace(-6.0, 6.0, 41)
  loss = lambda x: dpo_losses(x, beta=0.1, label_smoothing=eps)
  # L(h) - L(-h) = -(1 - 2 eps) h: the preference's pull shrinks to 0 as eps -> 1/2
  np.testing.assert_allclose(loss(h) - loss(-h), -(1 - 2 * eps) * h, atol=1e-5)
  slope = jax.grad(lambda x: jnp.sum(loss(x)))
  np.testing.assert_allclose(slope(jnp.zeros(1)), [-(1 - 2 * eps) / 2], atol=1e-6)
  if eps == 0.0:  # plain DPO
    np.testing.assert_allclose(loss(h), -jax.nn.log_sigmoid(h), rtol=1e-6)
  else:  # cDPO's minimum: sigma(h*) = 1 - eps
    h_star = jnp.asarray([np.log((1 - eps) / eps)], jnp.float32)
    np.testing.assert_allclose(slope(h_star), [0.0], atol=1e-6)
    assert float(loss(h_star)[0]) < float(loss(h_star + 0.1)[0])
    assert float(loss(h_star)[0]) < float(loss(h_star - 0.1)[0])


@pytest.mark.parametrize("beta,tau", [(0.1, 0.1), (0.5, 0.25)])
def test_ipo_loss_minimum_and_gradient(beta, tau):
  target = 1.0 / (2.0 * tau)
  objective, sums, (g_w, g_l, g_rw, g_rl) = grads(beta, loss_type="ipo", ipo_tau=tau)
  a, b, c, d, w = (np.asarray(x, np.float64) for x in (LP_W, LP_L, REF_W, REF_L, WEIGHTS))
  gap = (a - c) - (b - d)  # h / beta
  np.testing.assert_allclose(objective, np.sum(w * (gap - target) ** 2), rtol=1e-5)
  np.testing.assert_allclose(g_w, w * 2 * (gap - target), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_l, -w * 2 * (gap - target), rtol=1e-5, atol=1e-5)
  assert not g_rw.any() and not g_rl.any()
  np.testing.assert_allclose(sums["reward_margin"], np.sum(w * beta * gap), rtol=1e-5)
  # the minimum (zero loss, zero slope) is at h / beta = 1 / (2 tau)
  loss = lambda h: dpo_losses(h, beta=beta, loss_type="ipo", ipo_tau=tau)
  h_star = jnp.asarray([beta * target], jnp.float32)
  np.testing.assert_allclose(loss(h_star), [0.0], atol=1e-10)
  np.testing.assert_allclose(jax.grad(lambda h: jnp.sum(loss(h)))(h_star), [0.0], atol=1e-5)
  assert float(loss(h_star * 1.1)[0]) > 0.0 and float(loss(h_star * 0.9)[0]) > 0.0


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="beta must be > 0"):
    check_dpo_args(0.0)
  with pytest.raises(ValueError, match="beta must be > 0"):
    check_dpo_args(-0.1)
  with pytest.raises(ValueError, match=r"label_smoothing .* must be in \[0, 0.5\)"):
    check_dpo_args(0.1, label_smoothing=0.5)
  with pytest.raises(ValueError, match=r"label_smoothing .* must be in \[0, 0.5\)"):
    check_dpo_args(0.1, label_smoothing=-0.1)
  with pytest.raises(ValueError, match="Unknown DPO loss_type 'hinge'"):
    check_dpo_args(0.1, loss_type="hinge")
  with pytest.raises(ValueError, match="ipo_tau"):
    check_dpo_args(0.1, loss_type="ipo", ipo_tau=0.0)
  with pytest.raises(ValueError, match="differ in shape"):
    dpo_sums(LP_W, LP_L[:3], REF_W, REF_L, beta=0.1)
  with pytest.raises(ValueError, match="Unknown DPO reference 'cached'"):
    schedule, tx = OPT.build(4)
    DPOTrainer(CFG, tx, schedule, mesh_of(1), reference="cached")


# -- the model side: log-probs of the pairs and the partitioned step ----------

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=2,
                  head_dim=8, mlp_dim=32, sliding_window_size=8)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)
L = 12


def make_pairs(n, seed):
  rng = np.random.default_rng(seed)
  return [{"prompt": rng.integers(3, 64, size=rng.integers(2, 6)).tolist(),
           "chosen": rng.integers(3, 64, size=rng.integers(2, 7)).tolist(),
           "rejected": rng.integers(3, 64, size=rng.integers(2, 7)).tolist()}
          for _ in range(n)]


def device_batch(records, length=L):
  batch = {k: jnp.asarray(v) for k, v in pairs_to_batch(records, length).items()}
  batch["pair_weights"] = batch["pair_weights"][:, None]
  return batch


def init_params(seed):
  return nn.unbox(Transformer(CFG).init(jax.random.key(seed),
                                        jnp.zeros((1, 1), jnp.int32))["params"])


def test_pair_logprobs_sum_the_response_tokens_only():
  records = make_pairs(3, 0)
  records[0]["prompt"] = list(range(3, 13))  # cut: the row keeps its last L tokens
  params, batch = init_params(0), device_batch(records)
  chosen, rejected = jax.jit(pair_logprobs, static_argnums=0)(Transformer(CFG), params, batch)
  forward = jax.jit(Transformer(CFG).apply)
  for side, got in (("chosen", chosen), ("rejected", rejected)):
    tokens = np.asarray(batch[f"{side}_tokens"])
    logits = np.asarray(forward({"params": params}, batch[f"{side}_tokens"],
                                positions=batch[f"{side}_positions"],
                                segment_ids=batch[f"{side}_segment_ids"]), np.float64)
    logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    for i, r in enumerate(records):
      row = (r["prompt"] + r[side])[-L:]
      n = len(row)
      # token t of the response is predicted by position t - 1
      want = sum(logp[i, t - 1, tokens[i, t]] for t in range(n - len(r[side]), n))
      np.testing.assert_allclose(got[i], want, rtol=1e-5)


def mesh_of(num_devices, ici=None):
  return partitioning.create_mesh(ici or {"data": num_devices},
                                  devices=jax.devices()[:num_devices])


def run_steps(mesh, batches, reference="on_the_fly", num_microbatches=1, loss_type="sigmoid"):
  schedule, tx = OPT.build(4)
  trainer = DPOTrainer(CFG, tx, schedule, mesh, beta=0.5, reference=reference,
                       num_microbatches=num_microbatches, loss_type=loss_type)
  ref = jax.device_put(init_params(0), trainer.param_shardings)
  state = trainer.init_state(ref)
  metrics = []
  precomputed = reference == "precomputed"
  for local in batches:
    refs = trainer.reference_logprobs(ref, trainer.shard_batch(local)) if precomputed else None
    state, m = trainer.step(state, trainer.shard_batch(local, refs),
                            None if precomputed else ref)
    metrics.append(jax.device_get(m))
  return trainer, state, metrics


BATCHES = [pairs_to_batch(make_pairs(8, s), L) for s in (1, 2)]


@pytest.fixture(scope="module")
def single_device():
  return run_steps(mesh_of(1), BATCHES)


def assert_same(a, b, rtol=2e-5, atol=2e-6):
  (_, sa, ma), (_, sb, mb) = a, b
  for step, (x, y) in enumerate(zip(ma, mb)):
    for k in METRICS + ("grad_norm",):
      if k == "accuracy" and step == 0:
        continue  # h = 0 up to rounding at step 1: the sign of each h is noise
      np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=atol, err_msg=k)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4), sa.params, sb.params)


def test_sharded_step_equals_unsharded(single_device):
  _, _, metrics = single_device
  first, second = metrics
  # step 1: pi = pi_ref, so h = 0 (up to float rounding: two programs) and the loss log 2
  assert abs(first["reward_margin"]) < 1e-5
  np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-6)
  assert first["grad_norm"] > 0.0 and second["reward_margin"] != 0.0
  trainer, state, _ = result = run_steps(mesh_of(8, {"data": 2, "fsdp": 2, "tensor": 2}),
                                         BATCHES)
  assert_same(single_device, result)
  q = state.params["layer_0"]["attn"]["q"]
  assert q.sharding.spec == partitioning.mesh_axes(("embed", "heads", "kv"), q.shape,
                                                   trainer.mesh)
  assert q.addressable_shards[0].data.shape[0] == q.shape[0] // 2  # fsdp really splits


def test_precomputed_reference_equals_the_reference_forward_in_the_step(single_device):
  assert_same(single_device, run_steps(mesh_of(8), BATCHES, reference="precomputed"))


def test_padding_pairs_and_microbatches_do_not_change_the_step():
  real = [pairs_to_batch(make_pairs(4, s), L) for s in (1, 2)]
  padded = []
  for b in real:  # 4 more pairs of other tokens, weight 0
    junk = pairs_to_batch(make_pairs(4, 9), L)
    junk["pair_weights"][:] = 0.0
    padded.append({k: np.concatenate([b[k], junk[k]]) for k in b})
  # microbatch m takes rows m, m + 2, ...: real and padding pairs in each
  a, b = run_steps(mesh_of(4), real), run_steps(mesh_of(8), padded, num_microbatches=2)
  assert_same(a, b)
  assert b[2][0]["tokens"] == 4.0  # the weight counts real pairs only
