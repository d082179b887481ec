"""CLP conditioning (rl/clp.py): the simplex, the KL-regularised optimum on a toy
bandit by exact enumeration, and parameter-space / logit mixing of copies."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.inference.sampling import Sampler, SamplingConfig
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.rl import clp
from posttrain_jax.rl.clp_training import CLPSampler, clp_shardings

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=8)


@pytest.fixture(scope="module")
def plain():
  return nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def perturbed(params, seed, scale=0.3):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def tokens_batch(b=4, t=7):
  tokens = jax.random.randint(jax.random.key(3), (b, t), 3, CFG.vocab_size)
  return tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)


# ---------------------------------------------------------------- the simplex

def test_weights_must_lie_on_the_simplex():
  np.testing.assert_allclose(clp.check_weights([0.25, 0.75], 2), [0.25, 0.75])
  np.testing.assert_allclose(clp.parse_weights("0.3,0.7", 2), [0.3, 0.7])
  for bad, msg in [([0.5, 0.6], "sum to 1"), ([1.2, -0.2], ">= 0"), ([1.0], "2 entries"),
                   ([[0.5, 0.5], [0.9, 0.0]], "sum to 1"), ([np.nan, 1.0], "finite")]:
    with pytest.raises(ValueError, match=msg):
      clp.check_weights(bad, 2)
  with pytest.raises(ValueError, match="comma-separated"):
    clp.parse_weights("0.3;0.7", 2)


def test_sampled_and_rounded_weights_are_on_the_simplex():
  w = clp.sample_weights(np.random.default_rng(0), 4000, 3, alpha=1.0)
  clp.check_weights(w, 3)
  np.testing.assert_allclose(w.mean(0), [1 / 3] * 3, atol=0.02)   # Dirichlet(1) mean
  assert np.var(w[:, 0]) == pytest.approx((1 / 3) * (2 / 3) / 4, rel=0.1)  # not Dirichlet(10)
  r = clp.round_to_simplex(w[:50], 1)
  clp.check_weights(r, 3)
  np.testing.assert_allclose(r * 10, np.round(r * 10), atol=1e-5)
  assert np.max(np.abs(r - w[:50])) <= 0.1 + 1e-6
  np.testing.assert_allclose(clp.round_to_simplex([0.34, 0.33, 0.33], 1), [0.4, 0.3, 0.3])
  with pytest.raises(ValueError, match="dirichlet_alpha"):
    clp.sample_weights(np.random.default_rng(0), 1, 2, alpha=0.0)


def test_config_errors_and_serialisation():
  with pytest.raises(ValueError, match="Unknown CLP mixing"):
    clp.CLPConfig(mixing="lora")
  with pytest.raises(ValueError, match="prompt_conditioning"):
    clp.CLPConfig(mixing="none")
  with pytest.raises(ValueError, match="'\\{\\}'"):
    clp.CLPConfig(prompt_template="weights: ")
  cfg = clp.CLPConfig(mixing="none", prompt_conditioning=True)
  assert clp.serialise_weights([0.3, 0.7], cfg) == "weights 0.3 0.7: "
  assert clp.weight_prefix([0.3, 0.7], cfg, lambda s: [len(s)]) == [17]


# --------------------------------------- the optimum of the toy bandit, exactly

K, ALPHA = 7, 0.5


@pytest.fixture(scope="module")
def bandit():
  rng = np.random.default_rng(1)
  logp_ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=K), jnp.float32))
  rewards = jnp.asarray(rng.uniform(size=(K, 2)), jnp.float32)
  return logp_ref, rewards


def test_geometric_mixture_identity_on_a_toy_bandit(bandit):
  """pi*_w propto prod_i (pi*_i)^{w_i}, and pi*_w maximises J(.; w) (enumeration)."""
  logp_ref, rewards = bandit
  singles = [clp.optimal_policy(logp_ref, rewards, jnp.eye(2)[i], ALPHA) for i in range(2)]
  for w in ([0.0, 1.0], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1]):
    w = jnp.asarray(w)
    best = clp.optimal_policy(logp_ref, rewards, w, ALPHA)
    mixture = jax.nn.log_softmax(clp.mix_logits(jnp.stack(singles)[:, None], w[None])[0])
    np.testing.assert_allclose(np.exp(mixture), np.exp(best), atol=1e-6)
    # optimality: every perturbation of pi*_w has a lower objective
    j_best = clp.exact_objective(best, logp_ref, rewards, w, ALPHA)
    for seed in range(20):
      other = jax.nn.log_softmax(best + 0.3 * jax.random.normal(jax.random.key(seed), (K,)))
      assert clp.exact_objective(other, logp_ref, rewards, w, ALPHA) < j_best
  # the closed form value: J(pi*_w) = alpha log E_ref exp(w.r / alpha)
  w = jnp.asarray([0.3, 0.7])
  np.testing.assert_allclose(
      clp.exact_objective(clp.optimal_policy(logp_ref, rewards, w, ALPHA), logp_ref, rewards,
                          w, ALPHA),
      ALPHA * jax.scipy.special.logsumexp(logp_ref + rewards @ w / ALPHA), rtol=1e-5)


def test_one_hot_w_recovers_the_single_objective(bandit):
  logp_ref, rewards = bandit
  for i in range(2):
    single = jax.nn.log_softmax(logp_ref + rewards[:, i] / ALPHA)
    np.testing.assert_allclose(clp.optimal_policy(logp_ref, rewards, jnp.eye(2)[i], ALPHA),
                               single, atol=1e-6)
    p = jnp.exp(single)
    want = jnp.sum(p * rewards[:, i]) - ALPHA * jnp.sum(p * (single - logp_ref))
    np.testing.assert_allclose(clp.exact_objective(single, logp_ref, rewards, jnp.eye(2)[i],
                                                   ALPHA), want, rtol=1e-6)


def test_tabular_logit_clp_trained_on_sampled_w_reaches_every_optimum(bandit):
  """Exact-gradient ascent of E_w J(theta; w) for a tabular logit-CLP (m logit tables,
  w ~ Dirichlet(1)) reaches pi*_w at weightings it was never trained on."""
  logp_ref, rewards = bandit
  train_w = jnp.asarray(clp.sample_weights(np.random.default_rng(0), 16, 2))

  def loss(tables):
    def j(w):
      logp = jax.nn.log_softmax(clp.mix_logits(tables[:, None], w[None])[0])
      return clp.exact_objective(logp, logp_ref, rewards, w, ALPHA)
    return -jnp.mean(jax.vmap(j)(train_w))

  tables = jnp.stack([logp_ref, logp_ref])
  opt = optax.adam(0.05)
  state = opt.init(tables)
  step = jax.jit(lambda t, s: (lambda g: (lambda u, s2: (optax.apply_updates(t, u), s2))(
      *opt.update(g, s, t)))(jax.grad(loss)(t)))
  for _ in range(1500):
    tables, state = step(tables, state)
  for w in ([0.0, 1.0], [0.35, 0.65], [1.0, 0.0]):
    w = jnp.asarray(w)
    got = jax.nn.softmax(clp.mix_logits(tables[:, None], w[None])[0])
    np.testing.assert_allclose(got, jnp.exp(clp.optimal_policy(logp_ref, rewards, w, ALPHA)),
                               atol=2e-3)


# ------------------------------------------------------------- mixing copies

@pytest.mark.parametrize("mixing", ["full", "attn", "logit"])
def test_identical_copies_equal_the_plain_model(plain, mixing):
  cfg = clp.CLPConfig(mixing=mixing)
  policy = clp.ConditionedPolicy(CFG, cfg)
  tokens, positions, segments = tokens_batch()
  w = jnp.asarray(clp.sample_weights(np.random.default_rng(0), 4, 2))
  got = policy.apply({"params": {"policy": policy.init_params(plain), "weights": w}}, tokens,
                     positions=positions, segment_ids=segments)
  want = Transformer(CFG).apply({"params": plain}, tokens, positions=positions,
                                segment_ids=segments)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_attn_clp_mixes_the_attention_weights_only(plain):
  mask = clp.mixed_mask(plain, clp.CLPConfig(mixing="attn"))
  flat = {"/".join(str(k.key) for k in p): v
          for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert {k for k, v in flat.items() if v} == {
      f"layer_{i}/attn/{n}" for i in range(2) for n in "qkvo"}
  assert all(flat.values()) is False
  assert all(jax.tree.leaves(clp.mixed_mask(plain, clp.CLPConfig(mixing="full"))))
  stacked = clp.stack_copies(plain, clp.CLPConfig(mixing="attn"))
  assert stacked["layer_0"]["attn"]["q"].shape == (2,) + plain["layer_0"]["attn"]["q"].shape
  assert stacked["layer_0"]["mlp"]["up"].shape == plain["layer_0"]["mlp"]["up"].shape


@pytest.mark.parametrize("mixing", ["full", "attn"])
def test_parameter_mixing_is_per_row(plain, mixing):
  """Row b of the policy = the plain model with sum_i w[b, i] theta_i (distinct copies)."""
  cfg = clp.CLPConfig(mixing=mixing)
  policy = clp.ConditionedPolicy(CFG, cfg)
  params = clp.stack_models([perturbed(plain, 1), perturbed(plain, 2)], cfg)
  tokens, positions, segments = tokens_batch()
  w = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.5, 0.5]])
  got = policy.apply({"params": {"policy": params, "weights": w}}, tokens,
                     positions=positions, segment_ids=segments)
  model = Transformer(CFG)
  for b in range(4):
    want = model.apply({"params": clp.mix(params, w[b], cfg)}, tokens[b:b + 1],
                       positions=positions[b:b + 1], segment_ids=segments[b:b + 1])
    np.testing.assert_allclose(got[b:b + 1], want, atol=2e-5, rtol=2e-5)
  other = model.apply({"params": clp.mix(params, w[2], cfg)}, tokens[:1],
                      positions=positions[:1], segment_ids=segments[:1])
  assert not np.allclose(got[:1], other, atol=1e-3)  # the rows' weightings matter


def test_logit_mixing_is_the_weighted_sum_of_the_copies_logits(plain):
  cfg = clp.CLPConfig(mixing="logit")
  policy = clp.ConditionedPolicy(CFG, cfg)
  copies = [perturbed(plain, 1), perturbed(plain, 2)]
  params = clp.stack_models(copies, cfg)
  tokens, positions, segments = tokens_batch()
  w = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.5, 0.5]])
  got = policy.apply({"params": {"policy": params, "weights": w}}, tokens,
                     positions=positions, segment_ids=segments)
  model = Transformer(CFG)
  logits = [model.apply({"params": c}, tokens, positions=positions, segment_ids=segments)
            for c in copies]
  want = w[:, 0, None, None] * logits[0] + w[:, 1, None, None] * logits[1]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mixing", ["attn", "logit"])
def test_sampling_with_identical_copies_equals_the_plain_sampler(plain, mixing):
  """The KV-cache sampler on the conditioned policy (per-row w) draws the plain
  model's tokens when the copies are identical."""
  cfg = clp.CLPConfig(mixing=mixing)
  mesh = partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1])
  config = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_id=None)
  plain_sampler = Sampler(CFG, config, mesh)
  policy = clp.ConditionedPolicy(CFG, cfg)
  _, sh = clp_shardings(policy, plain, plain_sampler.param_shardings)
  sampler = CLPSampler(policy, config, mesh, sh)
  prompts = [[3, 4, 5], [6, 7], [8], [9, 10, 11]]
  w = clp.sample_weights(np.random.default_rng(0), 4, 2)
  got = sampler(policy.init_params(plain), w, prompts, jax.random.key(0))
  want = plain_sampler(plain, prompts, jax.random.key(0))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.model_logprobs, want.model_logprobs, atol=1e-4)
  with pytest.raises(ValueError, match="simplex"):
    sampler(policy.init_params(plain), w * 2, prompts, jax.random.key(0))
