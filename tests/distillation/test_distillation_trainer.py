"""Distillation step, data sources and proxy/golden evaluation on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.distillation import sources as ds
from posttrain_jax.distillation.eval import ProxyGoldenEvaluator
from posttrain_jax.distillation.trainer import DistillationTrainer, distillation_objective
from posttrain_jax.inference.sampling import SamplingConfig
from posttrain_jax.models import ModelConfig, Transformer

STUDENT = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, mlp_dim=64, sliding_window_size=8)
TEACHER = ModelConfig(vocab_size=64, embed_dim=48, num_layers=2, num_heads=4,
                      num_kv_heads=1, head_dim=12, mlp_dim=96, sliding_window_size=8)
B, T, P = 8, 12, 6


def lm_batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, STUDENT.vocab_size, (B, T + 1)).astype(np.int32)
  weights = np.zeros((B, T), np.float32)
  weights[:, P:] = 1.0  # response positions only
  return dict(decoder_input_tokens=tokens[:, :-1], decoder_target_tokens=tokens[:, 1:],
              decoder_loss_weights=weights, decoder_segment_ids=np.ones((B, T), np.int32),
              decoder_positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)))


class FakeIterator:
  """Resumable iterator over a deterministic function of the position."""

  def __init__(self, make):
    self.make, self.position = make, 0

  def __next__(self):
    self.position += 1
    return self.make(self.position - 1)

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def prompt_batch(i, batch=B):
  rng = np.random.default_rng(100 + i)
  lengths = rng.integers(1, P + 1, batch).astype(np.int32)
  prompts = np.zeros((batch, P), np.int32)
  for r, n in enumerate(lengths):
    prompts[r, P - n:] = rng.integers(2, STUDENT.vocab_size, n)
  return {"prompts": prompts, "prompt_lengths": lengths}


def make_trainer(ici=None, **kwargs):
  mesh = partitioning.create_mesh(ici or {"data": -1})
  schedule, tx = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).build(10)
  return DistillationTrainer(STUDENT, TEACHER, tx, schedule, mesh, **kwargs)


def init_params(config, seed):
  return Transformer(config).init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]


def test_no_gradient_reaches_the_teacher():
  student, teacher = Transformer(STUDENT), Transformer(TEACHER)
  sp, tp = init_params(STUDENT, 0), init_params(TEACHER, 1)
  batch = jax.tree.map(jnp.asarray, lm_batch())
  loss_fn = distillation_objective(student, teacher)
  teacher_grads = jax.grad(lambda t: loss_fn(sp, batch, t)[0])(tp)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(teacher_grads))
  student_grads = jax.grad(lambda s: loss_fn(s, batch, tp)[0])(sp)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(student_grads)) > 0


def test_teacher_equal_to_student_gives_zero_loss_and_gradient():
  student = Transformer(STUDENT)
  sp = init_params(STUDENT, 0)
  batch = jax.tree.map(jnp.asarray, lm_batch())
  loss_fn = distillation_objective(student, student)
  (loss, sums), grads = jax.value_and_grad(lambda s: loss_fn(s, batch, sp), has_aux=True)(sp)
  assert abs(float(loss)) < 1e-5
  assert float(sums["weight"]) == B * (T - P)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 2e-5  # fp32 noise


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_objective_equals_full_logits(kind):
  student, teacher = Transformer(STUDENT), Transformer(TEACHER)
  sp, tp = init_params(STUDENT, 0), init_params(TEACHER, 1)
  batch = jax.tree.map(jnp.asarray, lm_batch())
  full = distillation_objective(student, teacher, kind=kind)
  chunked = distillation_objective(student, teacher, kind=kind, chunk_size=5)
  (lf, sf), gf = jax.value_and_grad(lambda s: full(s, batch, tp), has_aux=True)(sp)
  (lc, sc), gc = jax.value_and_grad(lambda s: chunked(s, batch, tp), has_aux=True)(sp)
  np.testing.assert_allclose(lc, lf, rtol=1e-5)
  for k in ("nll", "accuracy", "weight"):
    np.testing.assert_allclose(sc[k], sf[k], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gf)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sample_to_batch_layout():
  trainer = make_trainer()
  src = ds.OnlineSource("online_teacher", TEACHER, FakeIterator(prompt_batch),
                        SamplingConfig(max_new_tokens=5, eos_id=None), trainer.mesh)
  tp = trainer.init_teacher(jax.random.key(1))
  batch = jax.device_get(src.next_batch(1, None, tp))
  prompts = prompt_batch(0)
  assert batch["decoder_input_tokens"].shape == (B, P + 5 - 1)
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:],
                                batch["decoder_target_tokens"][:, :-1])
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, :P], prompts["prompts"])
  # Loss only on the 5 generated tokens; segments mark the real tokens.
  np.testing.assert_array_equal(batch["decoder_loss_weights"].sum(1), np.full(B, 5.0))
  assert (batch["decoder_loss_weights"][:, :P - 1] == 0).all()
  np.testing.assert_array_equal(batch["decoder_segment_ids"].sum(1),
                                prompts["prompt_lengths"] + 4)
  for r, n in enumerate(prompts["prompt_lengths"]):
    np.testing.assert_array_equal(batch["decoder_positions"][r, P - n:], np.arange(n + 4))


@pytest.mark.parametrize("ici", [{"data": -1}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_each_source_and_a_mixture_run_steps_on_8_devices(ici):
  trainer = make_trainer(ici)
  assert len(jax.devices()) == 8
  teacher = trainer.init_teacher(jax.random.key(1))
  sampling = SamplingConfig(max_new_tokens=4, eos_id=1)
  def sources():
    return {
        "offline": ds.OfflineSource(FakeIterator(lm_batch), trainer.shard_batch),
        "online_teacher": ds.OnlineSource("online_teacher", TEACHER,
                                          FakeIterator(prompt_batch), sampling, trainer.mesh),
        "online_student": ds.OnlineSource("online_student", STUDENT,
                                          FakeIterator(prompt_batch), sampling, trainer.mesh,
                                          seed=1)}
  built = sources()
  for weights in ({"offline": 1.0}, {"online_teacher": 1.0}, {"online_student": 1.0},
                  {"offline": 1.0, "online_student": 1.0, "online_teacher": 0.0}):
    data = ds.MixtureSource({n: built[n] for n in weights}, weights, seed=3)
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for step in range(1, 4):
      batch = data.next_batch(step, state.params, teacher)
      state, metrics = trainer.train_step(state, batch, teacher)
      metrics = jax.device_get(metrics)
      assert np.isfinite(metrics["loss"]) and metrics["nonfinite"] == 0
      assert metrics["tokens"] > 0
      losses.append(float(metrics["loss"]))
    assert int(state.step) == 3
    assert sum(data.counts.values()) == 3
    assert data.counts.get("online_teacher", 0) == 0 or weights["online_teacher"] > 0


def test_online_student_samples_come_from_the_params_passed_in():
  """The online_student source samples from the student parameters of the
  current step (not a stale copy): the same params and step give the same
  sequences, other params give other sequences, and what reaches the train step
  is integer token data (the step cannot differentiate through sampling)."""
  trainer = make_trainer()
  teacher = trainer.init_teacher(jax.random.key(1))
  src = ds.OnlineSource("online_student", STUDENT, FakeIterator(prompt_batch),
                        SamplingConfig(max_new_tokens=4, eos_id=None), trainer.mesh)
  state = trainer.init_state(jax.random.key(0))
  batch = jax.device_get(src.next_batch(1, state.params, teacher))
  src.set_state({"position": 0})
  again = jax.device_get(src.next_batch(1, state.params, teacher))
  for k in batch:  # same (seed, step), prompts and params => the same samples
    np.testing.assert_array_equal(batch[k], again[k])
  other = trainer.init_state(jax.random.key(5)).params
  src.set_state({"position": 0})
  moved = jax.device_get(src.next_batch(1, other, teacher))
  assert not np.array_equal(moved["decoder_target_tokens"], batch["decoder_target_tokens"])
  assert np.issubdtype(batch["decoder_target_tokens"].dtype, np.integer)
  new_state, metrics = trainer.train_step(state, trainer.shard_batch(batch), teacher)
  assert float(metrics["grad_norm"]) > 0 and int(new_state.step) == 1


def test_mixture_choice_is_reproducible_and_follows_weights():
  data = ds.MixtureSource({"offline": None, "online_student": None},
                          {"offline": 3.0, "online_student": 1.0}, seed=5)
  picks = [data.choose(t) for t in range(1, 2001)]
  assert picks == [data.choose(t) for t in range(1, 2001)]
  frac = picks.count("offline") / len(picks)
  assert abs(frac - 0.75) < 0.04


@pytest.mark.parametrize("weights,match", [
    ({}, "No distillation data source"), ({"offline_data": 1.0}, "Unknown"),
    ({"offline": 0.0}, "sum to 0"), ({"offline": -1.0}, ">= 0")])
def test_bad_mixtures_are_rejected(weights, match):
  with pytest.raises(ValueError, match=match):
    ds.check_weights(weights)


def test_teacher_equal_to_oracle_gives_identical_proxy_and_golden():
  trainer = make_trainer()
  teacher = trainer.init_teacher(jax.random.key(1))
  prompts = [list(range(2, 2 + n)) for n in (1, 3, 5, 2, 4)]  # 3 padding rows
  evaluator = ProxyGoldenEvaluator(
      STUDENT, {"proxy": (TEACHER, teacher), "golden": (TEACHER, teacher)}, prompts,
      max_new_tokens=6, batch_size=8, mesh=trainer.mesh, seed=0)
  state = trainer.init_state(jax.random.key(0))
  metrics = evaluator(state.params)
  for k in ("kl", "kl_token_sum", "kl_stderr"):
    assert metrics[f"proxy_{k}"] == metrics[f"golden_{k}"]
  assert metrics["proxy_kl"] > 0 and metrics["proxy_kl_token_sum"] > 0
  # A student equal to the reference has zero KL.
  same = ProxyGoldenEvaluator(TEACHER, {"proxy": (TEACHER, teacher)}, prompts,
                              max_new_tokens=6, batch_size=8, mesh=trainer.mesh)
  zero = same(teacher)
  assert abs(zero["proxy_kl"]) < 1e-4 and abs(zero["proxy_kl_token_sum"]) < 1e-4


def test_paired_errors_track_change_and_rise_over_the_same_samples():
  trainer = make_trainer()
  teacher = trainer.init_teacher(jax.random.key(1))
  prompts = [list(range(2, 2 + n)) for n in (1, 3, 5, 2, 4)]
  evaluator = ProxyGoldenEvaluator(
      STUDENT, {"golden": (TEACHER, teacher)}, prompts,
      max_new_tokens=6, batch_size=8, mesh=trainer.mesh, seed=0)
  a = trainer.init_state(jax.random.key(0)).params
  b = trainer.init_state(jax.random.key(3)).params
  first = evaluator(a)
  assert first["golden_kl_change_stderr"] == 0.0
  assert first["golden_kl_rise"] == 0.0 and first["golden_kl_rise_stderr"] == 0.0
  other = evaluator(b)
  assert other["golden_kl_change_stderr"] > 0.0
  # Scored on the same samples, the paired error of the change is below the
  # unpaired error of either evaluation combined in quadrature.
  assert other["golden_kl_change_stderr"] < np.hypot(first["golden_kl_stderr"],
                                                    other["golden_kl_stderr"])
  worse, better = (b, a) if other["golden_kl"] > first["golden_kl"] else (a, b)
  low = min(first["golden_kl"], other["golden_kl"])
  again = evaluator(worse)  # the lowest so far is `better`'s evaluation
  assert again["golden_kl_rise"] == pytest.approx(max(first["golden_kl"],
                                                      other["golden_kl"]) - low)
  assert again["golden_kl_rise"] > 0 and again["golden_kl_rise_stderr"] > 0
  assert evaluator(better)["golden_kl_rise"] == pytest.approx(0.0, abs=1e-5)


def test_paired_stderr_is_the_standard_error_of_the_differences():
  from posttrain_jax.distillation.eval import paired_stderr
  values, reference = np.array([3.0, 5.0, 4.0, 8.0]), np.array([1.0, 4.0, 4.0, 5.0])
  diff = values - reference
  assert paired_stderr(values, reference) == pytest.approx(
      np.std(diff, ddof=1) / 2.0)
  assert paired_stderr(values + 7.0, values) == 0.0  # a shift of every prompt is exact
  assert paired_stderr(values[:1], reference[:1]) == 0.0
