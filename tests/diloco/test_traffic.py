"""Traffic / ByteCounter: bytes per replica as the collectives move them
(all-gather of the codes: M - 1 payloads; ring all-reduce: 2 (M - 1) / M),
the bf16 / fp32 data-parallel baselines, and the fp32 fallback counted at the
format the sharded exchange really uses."""

import functools

import jax
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.diloco import exchange as dx
from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import quantization
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco import traffic as tr
from posttrain_jax.diloco.trainer import DiLoCoTrainer
from posttrain_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, embed_dim=16, num_layers=4, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32, sliding_window_size=4)
# gemma2_tiny.gin's shapes (the headline experiment's model)
TINY = ModelConfig(vocab_size=2048, embed_dim=128, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=32, mlp_dim=512, sliding_window_size=64)


def params_of(cfg=CFG):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  model = Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_all_gather_vs_all_reduce_per_replica(m):
  """M = 4: an all-gather of b-byte codes moves 3 b per replica, a ring
  all-reduce of n bytes 1.5 n; the data-parallel baseline (bf16 default)
  is that all-reduce of 2 bytes per parameter, fp32 twice it."""
  params = params_of()
  n = sum(x.size for x in jax.tree.leaves(params))
  config = sd.DiLoCoConfig(num_replicas=m, sync_every=4, num_fragments=2, overlap=1,
                           embeddings="split", quant_block=8)
  algo = sd.StreamingDiLoCo(config, None, params)
  t = algo.traffic
  assert t.reduce_bytes == (0, 0) and t.fallback == ()
  for p, b in enumerate(t.payload_bytes):
    assert t.sync_bytes(p) == (m - 1) * b
  assert t.dp_step_bytes == 2 * (m - 1) * 2 * n // m
  assert t.dp_step_bytes_in("float32") == 2 * t.dp_step_bytes
  if m == 4:
    assert t.dp_step_bytes == 3 * n and t.sync_bytes(0) == 3 * t.payload_bytes[0]
  # over whole windows: each fragment once; ratio to bf16 = 4 H n / (M b) ... per M
  counter = algo.counter_at(3 * 4)
  assert counter.replica_bytes == 3 * (m - 1) * t.full_sync_bytes
  assert counter.sent_bytes == m * counter.replica_bytes
  d = counter.as_dict()
  assert d["dp_replica_bytes"] == 12 * t.dp_step_bytes
  assert d["dp_fp32_replica_bytes"] == 2 * d["dp_replica_bytes"]
  if m > 1:  # FP4 block 8: 4 + 32 / 8 = 8 bits per value (+ rounding)
    ratio = d["dp_replica_bytes"] / d["replica_bytes"]
    assert ratio == pytest.approx(2 * 2 * 4 / m / 1.0, rel=0.02)


def test_headline_ratio_is_16h_over_4_25_for_block_128():
  """M = 2, FP4 with block-128 scales, bf16 baseline: 16 H / 4.25 (H = 30:
  113x); M = 4 halves it; fp32 doubles it."""
  params = {"layer_0": {"w": jax.ShapeDtypeStruct((256, 512), np.float32)},
            "layer_1": {"w": jax.ShapeDtypeStruct((256, 512), np.float32)}}
  for m, expected in ((2, 16 * 30 / 4.25), (4, 8 * 30 / 4.25)):
    config = sd.DiLoCoConfig(num_replicas=m, sync_every=30, num_fragments=2,
                             quant_block=128)
    counter = sd.StreamingDiLoCo(config, None, params).counter_at(60)
    d = counter.as_dict()
    assert d["dp_replica_bytes"] / d["replica_bytes"] == pytest.approx(expected)
    assert d["dp_fp32_replica_bytes"] / d["replica_bytes"] == pytest.approx(2 * expected)


def test_bad_baseline_dtype_and_fallback_mode_are_rejected():
  with pytest.raises(ValueError, match="dp_dtype"):
    tr.Traffic.build(params_of(), (), "fp4_e3m0", None, dp_dtype="bf17")
  with pytest.raises(ValueError, match="block_fallback"):
    sd.DiLoCoConfig(block_fallback="pad")


@functools.cache
def sharded_trainer(block, cfg=CFG, fallback="fp32", m=2, ici=(("fsdp", 2), ("tensor", 2))):
  mesh = partitioning.create_mesh(dict(ici), {"replica": 2})
  schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
  config = sd.DiLoCoConfig(num_replicas=m, sync_every=2, num_fragments=2, overlap=1,
                           quant_block=block, block_fallback=fallback)
  return DiLoCoTrainer(Transformer(cfg), tx, schedule, mesh, config)


@pytest.mark.parametrize("m", [2, 4])
def test_fallback_is_counted_at_fp32_all_reduce_and_reported(m, caplog):
  """Block 16 on {replica 2, fsdp 2, tensor 2}: the tensors whose blocks cross
  shards (exchange.plans -> None: what sharded_exchange sends through the fp32
  reference) count 2 (M - 1) / M x 4 bytes per value, the others (M - 1) x
  their FP4 bytes; the start-up line names them."""
  with caplog.at_level("INFO"):
    trainer = sharded_trainer(16, m=m)
  t = trainer.traffic
  params = trainer.trainer.abstract_state.params
  assert t.fallback and "fall back to an fp32 all-reduce" in caplog.text
  for name in t.fallback:
    assert name in caplog.text
  for p, frag in enumerate(trainer.fragments):
    plans = dx.plans(frag, trainer.trainer.param_shardings, frag.shapes(params),
                     "fp4_e3m0", 16)
    slow = {k for k, v in plans.items() if v is None}
    assert {f"{p}/{k}" for k in slow} == {n for n in t.fallback if n.startswith(f"{p}/")}
    sizes = {k: int(np.prod(s)) for k, s in frag.shapes(params).items()}
    assert t.reduce_bytes[p] == 4 * sum(sizes[k] for k in slow)
    # every fast tensor here is a single tensor (no scanned rows): what the 4
    # chips of a replica send, each its shard's FP4 codes + block scales, a
    # shard that 2 chips hold sent half by each
    specs = fr.take_like(trainer.trainer.param_shardings, frag, lambda s, rows: s.spec)
    sent = 0
    for k, s in frag.shapes(params).items():
      if k in slow:
        continue
      used = [a for e in specs[k] for a in ((e,) if isinstance(e, str) else e or ())]
      shard = sizes[k] // 2 ** len(used)
      sent += 4 * -(-quantization.bytes_of((shard,), "fp4_e3m0", 16) // 2 ** (2 - len(used)))
    assert t.gather_bytes[p] == sent
    assert t.sync_bytes(p) == ((m - 1) * t.gather_bytes[p]
                               + 2 * (m - 1) * t.reduce_bytes[p] // m)
  # without the fallback the same fragments would be cheaper: the fp32 is visible
  fp4_only = tr.Traffic.build(params, trainer.fragments, "fp4_e3m0", 16, m)
  assert t.full_sync_bytes > 4 * fp4_only.full_sync_bytes / 2


def test_block_dividing_the_shards_uses_fp4_for_every_tensor(caplog):
  """Block 8 divides every shard's last dimension: no fallback, one line
  saying so; block_fallback='error' refuses the crossing block 16 and names
  the tensors and the fix."""
  with caplog.at_level("INFO"):
    t = sharded_trainer(8).traffic
  assert t.fallback == () and t.reduce_bytes == (0, 0)
  assert "every tensor all-gathered as fp4_e3m0" in caplog.text
  with pytest.raises(ValueError, match=r"fall back to an fp32 all-reduce.*quant_block "
                     r"dividing.*layer_0/mlp/down"):
    sharded_trainer(16, fallback="error")


def test_headline_model_block_128_on_sharded_meshes():
  """gemma2_tiny, FP4 block 128 (the headline): on the headline's multi-slice
  mesh {replica 2, data 4} (params sharded over "replica" only) every tensor
  is all-gathered as FP4, ratio 16 H / 4.25 to bf16 data-parallel. With the
  params also sharded {fsdp 2, tensor 2}, the tensors whose last dimension
  (or its shard) is not a multiple of 128 fall back, counted as fp32;
  block 32 (= head_dim) divides every shard there: FP4 for every tensor."""
  headline = sharded_trainer(128, cfg=TINY, ici=(("data", 4),))
  t = headline.traffic
  assert t.fallback == () and t.reduce_bytes == (0, 0)
  d = headline.counter_at(60).as_dict()
  assert d["dp_replica_bytes"] / d["replica_bytes"] == pytest.approx(16 * 2 / 4.25,
                                                                     rel=0.01)
  t128 = sharded_trainer(128, cfg=TINY).traffic
  assert t128.fallback and sum(t128.reduce_bytes) > 0  # reported, counted as fp32
  assert sharded_trainer(32, cfg=TINY).traffic.fallback == ()
