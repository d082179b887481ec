"""The elastic exchange's device programs: packed codes of each slice's Δ,
decoded and averaged on the host side, give the SPMD reference exchange's Δ_p
bit for bit (scanned rows, split embeddings, FP4 / int8); token weights; the
outer update it feeds is streaming_diloco's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core.trainer import TrainState
from posttrain_jax.diloco import exchange as dx
from posttrain_jax.diloco import fragments as fr
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.diloco.elastic import slice as es


def tree(rng, scanned):
  if scanned:
    return {"embedder": rng.normal(size=(10, 4)).astype(np.float32),
            "layers": {"w": rng.normal(size=(4, 4, 3)).astype(np.float32)}}
  return {"embedder": rng.normal(size=(10, 4)).astype(np.float32),
          **{f"layer_{i}": {"w": rng.normal(size=(4, 3)).astype(np.float32)}
             for i in range(4)}}


def one_replica_state(theta, local):
  inner = TrainState(jnp.zeros((), jnp.int32), jax.tree.map(lambda x: x[None], local), ())
  return sd.DiLoCoState(jnp.zeros((), jnp.int32), inner, theta, (), ())


@pytest.mark.parametrize("scanned,embeddings,fmt,block", [
    (False, "join", "fp4_e3m0", None), (True, "split", "fp4_e3m0", None),
    (True, "join", "int8", 4), (False, "separate", "bf16", None)])
def test_codes_of_each_slice_average_to_the_reference_exchange(scanned, embeddings, fmt,
                                                               block):
  rng = np.random.default_rng(0)
  theta = tree(rng, scanned)
  locals_ = [jax.tree.map(lambda x: x - 0.01 * rng.normal(size=x.shape).astype(np.float32)
                          * (1 + 100 * (k == 1)), theta) for k in range(3)]
  frags = fr.make_fragments(theta, 2, "strided", embeddings)
  stacked = jax.tree.map(lambda *x: np.stack(x), *locals_)
  for frag in frags:
    ref, count = dx.exchange(theta, stacked, frag, jnp.ones(3), fmt, block)
    payloads = [jax.jit(functools.partial(es.encode_fragment, frag=frag, fmt=fmt,
                                          block=block))(one_replica_state(theta, l))
                for l in locals_]
    payloads = jax.device_get(payloads)  # what travels: numpy codes and scales
    got = jax.jit(functools.partial(es.decode_mean, frag=frag, shapes=frag.shapes(theta),
                                    fmt=fmt, block=block))(payloads, jnp.ones(3))
    assert got.keys() == ref.keys() and float(count) == 3
    for k in ref:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
    if fmt == "fp4_e3m0":  # packed: two codes per byte
      name = frag.selectors[0].name
      n = int(np.prod(frag.shapes(theta)[name][-2:]))
      assert payloads[0][name]["codes"].dtype == np.uint8
      assert payloads[0][name]["codes"].shape[-1] == -(-n // 2)


def test_token_weights_and_survivor_subsets():
  """w = tokens: Σ w_s D(Q(Δ_s)) / Σ w_s; a subset of slices is the reference
  exchange with the others' participation 0."""
  rng = np.random.default_rng(1)
  theta = tree(rng, False)
  locals_ = [jax.tree.map(lambda x: x - 0.1 * rng.normal(size=x.shape).astype(np.float32),
                          theta) for _ in range(3)]
  frag = fr.make_fragments(theta, 2)[1]
  enc = jax.jit(functools.partial(es.encode_fragment, frag=frag, fmt="fp4_e3m0",
                                  block=None))
  payloads = jax.device_get([enc(one_replica_state(theta, l)) for l in locals_])
  dec = jax.jit(functools.partial(es.decode_mean, frag=frag, shapes=frag.shapes(theta),
                                  fmt="fp4_e3m0", block=None))
  stacked = jax.tree.map(lambda *x: np.stack(x), *locals_)
  ref, _ = dx.exchange(theta, stacked, frag, jnp.asarray([1.0, 0.0, 1.0]))
  got = dec([payloads[0], payloads[2]], jnp.ones(2))
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7)
  w = np.asarray([3.0, 1.0, 0.0], np.float32)
  weighted = dec(payloads, jnp.asarray(w))
  unweighted = dec(payloads, jnp.ones(3))
  for k in ref:
    one = [np.asarray(dec([p], jnp.ones(1))[k]) for p in payloads]
    np.testing.assert_allclose(weighted[k], (3 * one[0] + one[1]) / 4, rtol=1e-6,
                               atol=1e-7)
    assert not np.allclose(weighted[k], unweighted[k])


def test_padding_the_mean_to_every_slice_changes_no_bit():
  """ElasticSlice.sync decodes num_slices payloads whatever the membership,
  the absent ones (any codes) weighing 0: the same bits as the mean of the
  present ones alone, with weights 1 or tokens (one program for all counts)."""
  rng = np.random.default_rng(3)
  theta = tree(rng, True)
  frag = fr.make_fragments(theta, 2)[0]
  enc = jax.jit(functools.partial(es.encode_fragment, frag=frag, fmt="fp4_e3m0",
                                  block=None))
  payloads = jax.device_get([enc(one_replica_state(theta, jax.tree.map(
      lambda x: x - 0.1 * rng.normal(size=x.shape).astype(np.float32), theta)))
                             for _ in range(4)])
  dec = jax.jit(functools.partial(es.decode_mean, frag=frag, shapes=frag.shapes(theta),
                                  fmt="fp4_e3m0", block=None))
  for w in ([1.0, 1.0], [7.0, 3.0], [5.0]):
    n = len(w)
    alone = dec(payloads[:n], jnp.asarray(w, jnp.float32))
    padded = dec(payloads, jnp.asarray(w + [0.0] * (4 - n), jnp.float32))  # 4 - n absent
    for k in alone:
      np.testing.assert_array_equal(np.asarray(padded[k]), np.asarray(alone[k]), err_msg=k)


def test_outer_with_is_the_reference_outer_update():
  """outer_with(Δ given) == streaming_diloco.outer_update with one replica."""
  rng = np.random.default_rng(2)
  theta = tree(rng, False)
  local = jax.tree.map(lambda x: x - 0.1, theta)
  config = sd.DiLoCoConfig(num_replicas=1, sync_every=2, num_fragments=2, overlap=0,
                           quantization="none")
  algo = sd.StreamingDiLoCo(config, None, theta)
  state = algo.init(TrainState(jnp.zeros((), jnp.int32), theta, ()))
  state = state.replace(replicas=state.replicas.replace(
      params=jax.tree.map(lambda x: jnp.asarray(x)[None], local)))
  event = fr.Event(sync=(0,), apply=(0,))
  ref = algo.outer_fn(event)(state, jnp.ones(1))
  delta, count = dx.exchange(theta, jax.tree.map(lambda x: x[None], local),
                             algo.fragments[0], jnp.ones(1), "none")
  got = es.outer_with(state, {"0": {"delta": delta, "count": count}},
                      fragments=algo.fragments, event=event, outer_tx=algo.outer_tx,
                      alpha=config.alpha)
  jax.tree.map(np.testing.assert_array_equal, got.outer_params, ref.outer_params)
  jax.tree.map(np.testing.assert_array_equal, got.replicas.params, ref.replicas.params)
  jax.tree.map(np.testing.assert_array_equal, got.outer_opt_state, ref.outer_opt_state)


def test_elastic_config_rejects_bad_values():
  with pytest.raises(ValueError, match="slice_id"):
    es.ElasticConfig(slice_id=3, num_slices=3)
  with pytest.raises(ValueError, match="wait_for"):
    es.ElasticConfig(slice_id=0, num_slices=3, wait_for=4)


def test_heal_restore_takes_the_outer_state_and_resets_the_replica():
  """snapshot -> restore: θ̃, outer optimizer state, in-flight Δ and step are
  the source's; the replica is θ̃ with a fresh inner optimizer state."""
  from posttrain_jax.diloco.elastic import toy  # pylint: disable=g-import-not-at-top
  tx = toy.optimizer(1e-2)
  params = toy.init_params(0, 2, 4)
  config = sd.DiLoCoConfig(num_replicas=1, sync_every=2, num_fragments=2, overlap=1)
  inner = toy.make_inner_step(tx)
  el = es.ElasticSlice(config, inner, params, lambda p, t: toy.inner_state(p, tx, t),
                       None, None, es.ElasticConfig(0, 2))
  source = el.init(toy.inner_state(params, tx))
  for t in range(3):  # move θ̃, the replica, the optimizers and the in-flight Δ
    event = el.algo.event(t)
    source, _ = el.algo.train_step(source, {k: v[None] for k, v in toy.batch(
        0, 0, t, 8, 4, layers=2).items()}, t)
  assert event.apply or event.sync
  fresh = el.init(toy.inner_state(toy.init_params(5, 2, 4), tx))
  healed = el.restore(fresh, el.snapshot(source))
  assert int(healed.step) == int(source.step) == 3
  for a, b in ((healed.outer_params, source.outer_params),
               (healed.outer_opt_state, source.outer_opt_state),
               (healed.inflight, source.inflight),
               (jax.tree.map(lambda x: x[0], healed.replicas.params), source.outer_params)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  reset = tx.init(source.outer_params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b),
               healed.replicas.opt_state, reset)
  assert int(healed.replicas.step[0]) == 3
