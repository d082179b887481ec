"""CLP step (rl/clp_training.py): one-hot w is the single-reward REINFORCE step, the
sharded step equals the unsharded one, the reference never sees the serialised w."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.rl import clp, clp_training
from posttrain_jax.rl import policy_gradient as pg
from posttrain_jax.rl.policy_optimization import PolicyState, policy_step
from posttrain_jax.rl.reinforce import Reinforce

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=8)
B, T, G, BETA = 8, 10, 2, 0.1


@pytest.fixture(scope="module")
def plain():
  return nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def make_batch(prefix=0, seed=0):
  """Left-padded prompts (last 3 + prefix prompt slots) then 5 response tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (B, T)).astype(np.int32)
  p = 5
  prompt_len = 3 + prefix
  prompt_mask = np.zeros((B, T), bool)
  prompt_mask[:, p - prompt_len:p] = True
  generated = np.zeros((B, T), bool)
  generated[:, p:] = True
  generated[::3, -1] = False  # ragged responses
  tokens[:, :p - prompt_len] = 0
  pad = p - prompt_len
  positions = np.maximum(np.arange(T)[None] - pad, 0).repeat(B, 0).astype(np.int32)

  class Sample:
    pass
  s = Sample()
  s.tokens, s.prompt_mask, s.generated_mask, s.positions = tokens, prompt_mask, generated, positions
  rewards = rng.uniform(size=(B, 2)).astype(np.float32)
  w = np.repeat(clp.sample_weights(rng, B // G, 2), G, 0)
  return clp_training.sample_batch(s, w, rewards, np.full(B, prefix, np.int32))


@pytest.mark.parametrize("nan_row", [None, 2])
def test_one_hot_w_step_is_the_single_reward_reinforce_step(plain, nan_row):
  """w = e_0 everywhere: the full-CLP step on identical copies moves copy 0 exactly as
  the plain REINFORCE step on r_0 moves the model, and leaves copy 1 unchanged; a
  NaN reward is left out of both alike (its row, and its group's baseline)."""
  cfg = clp.CLPConfig(mixing="full")
  policy = clp.ConditionedPolicy(CFG, cfg)
  model = Transformer(CFG)
  tx, schedule = optax.sgd(0.5), optax.constant_schedule(0.5)
  batch = make_batch()
  batch["weights"] = np.tile([1.0, 0.0], (B, 1)).astype(np.float32)
  if nan_row is not None:
    batch["rewards"] = jnp.asarray(batch["rewards"]).at[nan_row, 0].set(jnp.nan)
  clp_params = policy.init_params(plain)
  state = PolicyState(jnp.int32(0), clp_params, tx.init(clp_params), None)
  new, metrics = jax.jit(lambda s, p, b: clp_training.clp_step(
      s, p, b, policy=policy, ref_model=model, tx=tx, schedule=schedule, beta=BETA,
      baseline="leave_one_out", samples_per_prompt=G))(state, plain, batch)
  plain_batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "mask")}
  plain_batch["rewards"] = batch["rewards"][:, 0]
  plain_state = PolicyState(jnp.int32(0), plain, tx.init(plain), None)
  want, want_metrics = jax.jit(lambda s, p, b: policy_step(
      s, p, b, model=model, tx=tx, schedule=schedule, algorithm=Reinforce("leave_one_out"),
      beta=BETA, ema_rate=0.0, samples_per_prompt=G))(plain_state, plain, plain_batch)
  for key in ("loss", "grad_norm", "kl_sft", "shaped_reward"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=2e-4, atol=1e-6)
  assert float(metrics["grad_norm"]) > 0 and float(metrics["nonfinite"]) == 0.0
  assert float(metrics["nonfinite_rewards"]) == (nan_row is not None)
  np.testing.assert_allclose(metrics["reward"], np.nanmean(batch["rewards"][:, 0]), rtol=1e-6)
  for got, ref, before in zip(jax.tree.leaves(new.params), jax.tree.leaves(want.params),
                              jax.tree.leaves(plain)):
    np.testing.assert_allclose(got[0], ref, atol=2e-5)
    np.testing.assert_array_equal(got[1], before)


def test_reference_sees_the_prompt_without_the_serialised_w(plain):
  """pi_ref(y | x): on the batch with a 2-token w prefix the reference log-probs equal
  the plain model's on the same sequences without the prefix."""
  model = Transformer(CFG)
  with_prefix = make_batch(prefix=2)
  without = make_batch(prefix=0)
  without["tokens"] = np.where(np.arange(T)[None] < 5 - 3, 0, with_prefix["tokens"])
  ref = pg.token_logprobs(clp_training.ref_forward(model, plain, with_prefix),
                          with_prefix["tokens"], with_prefix["mask"])
  want = pg.token_logprobs(model.apply({"params": plain}, without["tokens"],
                                       positions=without["positions"],
                                       segment_ids=without["segment_ids"]),
                           without["tokens"], without["mask"])
  np.testing.assert_allclose(ref, want, atol=1e-5)
  seen = pg.token_logprobs(model.apply({"params": plain}, with_prefix["tokens"],
                                       positions=with_prefix["positions"],
                                       segment_ids=with_prefix["segment_ids"]),
                           with_prefix["tokens"], with_prefix["mask"])
  assert not np.allclose(seen, want, atol=1e-3)  # the prefix would change the reference


def run_steps(mixing, ici, devices, plain, steps=2):
  mesh = partitioning.create_mesh(ici, devices=devices)
  cfg = clp.CLPConfig(mixing=mixing, prompt_conditioning=mixing == "none")
  tx = optax.adam(1e-2)
  trainer = clp_training.CLPTrainer(CFG, cfg, tx, optax.constant_schedule(1e-2), mesh,
                                    beta=BETA, samples_per_prompt=G)
  sft = jax.device_put(plain, trainer.param_shardings)
  state = trainer.init_state(sft)
  out = []
  for i in range(steps):
    state, metrics = trainer.step(state, sft, make_batch(prefix=2 if mixing == "none" else 0,
                                                         seed=i))
    out.append(jax.device_get(metrics))
  return jax.device_get(state.params), out, trainer


@pytest.mark.parametrize("mixing", ["none", "attn", "logit"])
def test_sharded_step_equals_the_unsharded_step(plain, mixing):
  ref_params, ref_metrics, _ = run_steps(mixing, {"data": 1}, jax.devices()[:1], plain)
  params, metrics, _ = run_steps(mixing, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(),
                                 plain)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4)
  for m, r in zip(metrics, ref_metrics):
    for key in ("loss", "grad_norm", "reward", "reward_0", "reward_1", "kl_sft"):
      np.testing.assert_allclose(m[key], r[key], atol=1e-5, rtol=1e-4)
  assert any(not np.allclose(a, np.broadcast_to(b, a.shape))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain)))


def test_step_rejects_weights_off_the_simplex(plain):
  mesh = partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1])
  trainer = clp_training.CLPTrainer(CFG, clp.CLPConfig(mixing="attn"), optax.sgd(0.1),
                                    optax.constant_schedule(0.1), mesh, beta=BETA,
                                    samples_per_prompt=G)
  batch = make_batch()
  batch["weights"] = batch["weights"] * 0.5
  with pytest.raises(ValueError, match="simplex"):
    trainer.step(trainer.init_state(plain), plain, batch)
  with pytest.raises(ValueError, match="leave_one_out"):
    clp_training.CLPTrainer(CFG, clp.CLPConfig(), optax.sgd(0.1), optax.constant_schedule(0.1),
                            mesh, beta=BETA, samples_per_prompt=1)
