"""LoRA adapters: exact start, merge, frozen base, reference without a second copy, sharding."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import lora as lora_lib
from posttrain_jax.models.lora_training import LoraTrainer, base_boxed, lora_objective
from posttrain_jax.rl.dpo_training import dpo_objective, pair_logprobs

CFG = ModelConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)
LORA = lora_lib.LoraConfig(rank=2, alpha=4.0)
TOKENS = np.random.default_rng(0).integers(1, 32, (2, 12)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def base_and_adapters(scan_layers=False, b_scale=0.0):
  """Numpy-noise base params and adapters (B = b_scale * noise) for CFG."""
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  boxed = base_boxed(cfg)
  rng = np.random.default_rng(1)
  noise = lambda x, std: (std * rng.standard_normal(x.shape)).astype(np.float32)
  base = jax.tree.map(lambda x: noise(x, x.shape[-1] ** -0.5), nn.unbox(boxed))
  adapters = nn.unbox(lora_lib.init_adapters(jax.random.key(2), boxed, LORA))
  if b_scale:  # else B as init_adapters made it
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: noise(x, b_scale) if lora_lib.weight_path(p).endswith("_b") else x,
        adapters)
  return cfg, base, adapters


@functools.lru_cache(maxsize=None)
def _apply(cfg, lora=LORA):
  model = Transformer(cfg, lora=lora)
  return jax.jit(lambda p, t: model.apply({"params": p}, t))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_b_at_zero_gives_exactly_the_base_logits(scan_layers):
  cfg, base, adapters = base_and_adapters(scan_layers)
  assert all(float(np.abs(x).max()) == 0.0 for p, x in
             jax.tree_util.tree_flatten_with_path(adapters)[0]
             if lora_lib.weight_path(p).endswith("_b"))
  base_logits = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(base, TOKENS)
  adapted = _apply(cfg)(lora_lib.combine(base, adapters), TOKENS)
  np.testing.assert_array_equal(adapted, base_logits)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_merged_logits_equal_the_adapter_models(scan_layers):
  cfg, base, adapters = base_and_adapters(scan_layers, b_scale=0.3)
  combined = lora_lib.combine(base, adapters)
  assert jax.tree.structure(lora_lib.split(combined)) == jax.tree.structure((base, adapters))
  adapted = _apply(cfg)(combined, TOKENS)
  merged_params = lora_lib.merge(base, adapters, LORA)
  assert jax.tree.map(np.shape, merged_params) == jax.tree.map(np.shape, base)
  merged = _apply(cfg)(merged_params, TOKENS)  # a plain model: no adapters in the tree
  assert float(jnp.abs(adapted - _apply(cfg)(base, TOKENS)).max()) > 0.1
  np.testing.assert_allclose(merged, adapted, atol=2e-5, rtol=1e-5)


def test_adapters_carry_the_weights_logical_axes():
  shapes = lora_lib.adapter_shapes(base_boxed(dataclasses.replace(CFG, scan_layers=True)),
                                   LORA)
  attn = ("layers", "local_0", "attn")
  assert shapes[attn + ("q_lora_a",)] == ((1, 16, 2), ("layers", "embed", None))
  assert shapes[attn + ("q_lora_b",)] == ((1, 2, 4, 8), ("layers", None, "heads", "kv"))
  assert shapes[attn + ("o_lora_a",)] == ((1, 4, 8, 2), ("layers", "heads", "kv", None))
  assert shapes[("layers", "global_1", "mlp", "down_lora_b")] == (
      (1, 2, 16), ("layers", None, "embed"))
  only_q = lora_lib.targeted(base_boxed(CFG), lora_lib.LoraConfig(targets=("attn/q$",)))
  assert sorted(only_q) == ["layer_0/attn/q", "layer_1/attn/q"]


def test_dropout_applies_only_with_a_dropout_rng():
  cfg, base, adapters = base_and_adapters(False, b_scale=0.3)
  params = lora_lib.combine(base, adapters)
  model = Transformer(cfg, lora=dataclasses.replace(LORA, dropout=0.5))
  apply = jax.jit(lambda p, rngs: model.apply({"params": p}, TOKENS, rngs=rngs))
  plain = apply(params, None)
  np.testing.assert_array_equal(plain, _apply(cfg)(params, TOKENS))
  dropped = apply(params, {"dropout": jax.random.key(0)})
  assert float(jnp.abs(dropped - plain).max()) > 1e-3


def _batch(rows=8, length=12, seed=3):
  tokens = np.random.default_rng(seed).integers(1, 32, (rows, length + 1)).astype(np.int32)
  return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
          "decoder_loss_weights": np.ones((rows, length), np.float32),
          "decoder_segment_ids": np.ones((rows, length), np.int32),
          "decoder_positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                               (rows, length)).copy()}


def _trainer(mesh, lora=LORA):
  tx = optax.adam(1e-2)
  trainer = LoraTrainer(CFG, lora, tx, optax.constant_schedule(1e-2), mesh)
  trainer.set_base(base_and_adapters()[1])
  return trainer


def _steps(trainer, n=2):
  state = trainer.init_state(jax.random.key(0))
  losses = []
  for _ in range(n):
    state, metrics = trainer.train_step(state, trainer.shard_batch(_batch()))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_gradients_reach_only_the_adapters():
  trainer = _trainer(partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1]))
  base_before = jax.tree.map(np.array, trainer.base)
  initial = jax.tree.map(np.array, trainer.init_state(jax.random.key(0)).params)
  state, _ = _steps(trainer)
  names = [lora_lib.weight_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      state.params)[0]]
  assert names and all(n.endswith(("_lora_a", "_lora_b")) for n in names)
  # the optimizer state holds adapter-sized moments only (and Adam's step count)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert sum(x.size for x in moments) == 2 * lora_lib.count(state.params)
  assert lora_lib.count(state.params) < lora_lib.count(trainer.base) / 4
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, trainer.base),
               base_before)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, initial)
  assert all(jax.tree.leaves(moved)), moved  # A moves once B is non-zero (step 2)


def test_dpo_reference_with_the_adapters_off_is_the_base():
  _, base, adapters = base_and_adapters(False, b_scale=0.3)
  pairs = {"pair_weights": np.ones((2, 1), np.float32)}
  for side, seed in (("chosen", 4), ("rejected", 5)):
    rows = _batch(2, 8, seed)
    pairs[f"{side}_tokens"] = rows["decoder_input_tokens"]
    pairs[f"{side}_positions"] = rows["decoder_positions"]
    pairs[f"{side}_segment_ids"] = rows["decoder_segment_ids"]
    pairs[f"{side}_response_mask"] = np.broadcast_to(np.arange(8) >= 3, (2, 8)).astype(np.int32)
  lora_model, base_model = Transformer(CFG, lora=LORA), Transformer(CFG)
  logprobs = jax.jit(pair_logprobs, static_argnums=0)
  # The reference is the adapter model applied to the base tree: the base model's log-probs.
  ref = logprobs(lora_model, base, pairs)
  for got, want in zip(ref, logprobs(base_model, base, pairs)):
    np.testing.assert_array_equal(got, want)
  policy = logprobs(lora_model, lora_lib.combine(base, adapters), pairs)
  assert float(jnp.abs(policy[0] - ref[0]).max()) > 1e-3
  # DPO over the adapters, aux = (base, base): one copy of the base is the
  # frozen part of the policy and the reference; at B = 0 the loss is log 2.
  loss_fn = jax.jit(lora_objective(dpo_objective(lora_model, beta=0.1)))
  zero_b = base_and_adapters(False)[2]
  objective, sums = loss_fn(zero_b, pairs, (base, base))
  np.testing.assert_allclose(float(objective / sums["weight"]), np.log(2.0), rtol=1e-6)


def test_sharded_equals_unsharded_on_8_devices():
  single = _trainer(partitioning.create_mesh({"data": 1}, devices=jax.devices()[:1]))
  sharded = _trainer(partitioning.create_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  specs = {lora_lib.weight_path(p): s.spec for p, s in
           jax.tree_util.tree_flatten_with_path(sharded.state_shardings.params)[0]}
  assert specs["layer_0/attn/q_lora_a"][0] == "fsdp"      # "embed" like the weight's
  assert specs["layer_0/attn/q_lora_b"][1] == "tensor"    # "heads"
  assert specs["layer_0/mlp/gate_lora_b"][1] == "tensor"  # "mlp"
  (s1, l1), (s8, l8) = _steps(single), _steps(sharded)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               jax.tree.map(np.asarray, s8.params), jax.tree.map(np.asarray, s1.params))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(rank=0), "LoraConfig.rank must be an integer >= 1, got 0"),
    (dict(rank=-2), "LoraConfig.rank must be an integer >= 1, got -2"),
    (dict(dropout=1.0), "LoraConfig.dropout must be in [0, 1)"),
    (dict(targets=("attn/(q",)), "is not a regular expression"),
])
def test_bad_settings_are_one_line(kwargs, needle):
  with pytest.raises(ValueError) as raised:
    lora_lib.LoraConfig(**kwargs)
  assert needle in str(raised.value) and "\n" not in str(raised.value)


def test_a_target_that_matches_nothing_is_named():
  with pytest.raises(ValueError) as raised:
    lora_lib.targeted(base_boxed(CFG), lora_lib.LoraConfig(targets=("attn/q$", "embedder")))
  text = str(raised.value)
  assert "pattern 'embedder' matches no adaptable weight" in text and "\n" not in text
