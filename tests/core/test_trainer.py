"""Partitioned train step: sharded == unsharded, accumulation == full batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.core.losses import cross_entropy_sums
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.trainer import Trainer
from posttrain_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=128, embed_dim=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, mlp_dim=64, sliding_window_size=8)
B, T = 8, 16


def make_batch(seed=0, packed=True):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (B, T + 1)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  if packed:  # two segments per row, the second starting at a random offset
    for r in range(B):
      cut = rng.integers(4, T - 4)
      seg[r, cut:] = 2
      pos[r, cut:] = np.arange(T - cut)
  weights = (rng.random((B, T)) > 0.1).astype(np.float32)
  return dict(decoder_input_tokens=tokens[:, :-1], decoder_target_tokens=tokens[:, 1:],
              decoder_loss_weights=weights, decoder_segment_ids=seg,
              decoder_positions=pos)


def run(ici, devices=None, num_microbatches=1, steps=3, z_loss=0.0, cfg=CFG,
        batches=None):
  mesh = partitioning.create_mesh(ici, devices=devices)
  schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
  trainer = Trainer(Transformer(cfg), tx, schedule, mesh,
                    num_microbatches=num_microbatches, z_loss=z_loss)
  state = trainer.init_state(jax.random.key(0))
  metrics = []
  for i in range(steps):
    batch = batches[i] if batches else make_batch(i)
    state, m = trainer.train_step(state, trainer.shard_batch(batch))
    metrics.append(jax.device_get(m))
  return trainer, state, metrics


@pytest.fixture(scope="module")
def reference():
  return run({"data": 1}, devices=jax.devices()[:1])


def assert_same(a, b, rtol=2e-5, atol=2e-6):
  (_, sa, ma), (_, sb, mb) = a, b
  for x, y in zip(ma, mb):
    for k in ("loss", "grad_norm", "accuracy"):
      np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=atol, err_msg=k)
  # Adam turns float32 reduction-order noise in near-zero gradients into
  # up-to-lr-sized moves of single elements; compare parameters at 1% of lr.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-4), sa.params, sb.params)


@pytest.mark.parametrize("ici", [
    {"data": 8},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"fsdp": 4, "tensor": 2},
])
def test_sharded_step_matches_unsharded(reference, ici):
  result = run(ici)
  assert_same(reference, result)
  trainer, state, _ = result
  q = state.params["layer_0"]["attn"]["q"]
  expected = partitioning.mesh_axes(("embed", "heads", "kv"), q.shape, trainer.mesh)
  assert q.sharding.spec == expected
  if trainer.mesh.shape["fsdp"] > 1:  # parameters really are split
    assert q.addressable_shards[0].data.shape[0] == q.shape[0] // trainer.mesh.shape["fsdp"]
    mu = state.opt_state[1][0].mu["layer_0"]["attn"]["q"]
    assert mu.sharding.spec == q.sharding.spec  # optimizer state follows params


def test_scanned_model_shards_and_matches(reference):
  scanned = ModelConfig(**{**CFG.__dict__, "scan_layers": True, "remat_policy": "full"})
  a = run({"data": 1}, devices=jax.devices()[:1], cfg=scanned)
  b = run({"fsdp": 4, "tensor": 2}, cfg=scanned)
  assert_same(a, b)


@pytest.mark.parametrize("m", [2, 4])
def test_gradient_accumulation_equals_full_batch(reference, m):
  assert_same(reference, run({"data": 1}, devices=jax.devices()[:1], num_microbatches=m))


def test_accumulation_on_a_sharded_mesh(reference):
  assert_same(reference, run({"data": 2, "fsdp": 2}, devices=jax.devices()[:4],
                             num_microbatches=2))


def test_microbatches_must_divide_batch():
  with pytest.raises(ValueError, match="not divisible by num_microbatches 3"):
    run({"data": 1}, devices=jax.devices()[:1], num_microbatches=3, steps=1)


def test_zero_weight_positions_do_not_matter():
  b0 = make_batch(0)
  b1 = {k: v.copy() for k, v in b0.items()}
  masked = b1["decoder_loss_weights"] == 0
  assert masked.any()
  b1["decoder_target_tokens"][masked] = 5  # change only masked targets
  one = jax.devices()[:1]
  _, sa, ma = run({"data": 1}, one, steps=1, batches=[b0])
  _, sb, mb = run({"data": 1}, one, steps=1, batches=[b1])
  np.testing.assert_allclose(ma[0]["loss"], mb[0]["loss"], rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, sa.params, sb.params)


def test_z_loss_is_reported_and_penalises_log_partition():
  one = jax.devices()[:1]
  _, _, plain = run({"data": 1}, one, steps=1)
  _, _, with_z = run({"data": 1}, one, steps=1, z_loss=1e-2)
  np.testing.assert_allclose(plain[0]["loss"], with_z[0]["loss"], rtol=1e-6)
  assert plain[0]["z_loss"] == 0 and with_z[0]["z_loss"] > 0


def test_cross_entropy_sums_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, (2, 3))
  weights = np.array([[1, 1, 0], [1, 0.5, 1]], np.float32)
  out = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                           z_loss=0.1)
  lse = np.log(np.exp(logits).sum(-1))
  ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(out["cross_entropy"], (ce * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(out["z_loss"], (0.1 * lse**2 * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(out["weight"], weights.sum())


def test_learning_rate_schedule_warmup_then_cosine():
  schedule, _ = OptimizerConfig(learning_rate=1.0, warmup_steps=4, decay_steps=10,
                                end_learning_rate_ratio=0.1).build(100)
  lrs = [float(schedule(t)) for t in range(12)]
  np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
  np.testing.assert_allclose(lrs[10], 0.1, rtol=1e-5)
