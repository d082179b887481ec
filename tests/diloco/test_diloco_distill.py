"""Distillation under Streaming DiLoCo: the frozen teacher as the inner step's
shared `aux`; M = 1 reduces to the plain distillation step, the sharded M = 2
step matches the unsharded algorithm and never touches the teacher, and the
gin-configured distill(diloco=...) run evaluates the outer parameters and
resumes exactly mid-window."""

import dataclasses
import functools
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax import cli, main
from posttrain_jax.core import partitioning
from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.core.trainer import Trainer, optimizer_step
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.diloco import loop as diloco_loop
from posttrain_jax.diloco import streaming_diloco as sd
from posttrain_jax.distillation.trainer import DistillationTrainer, distillation_objective
from posttrain_jax.jobs import train as train_lib
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIN = f"{REPO}/gin/experiments/streaming_diloco/distill_streaming_fp4.gin"
STUDENT = ModelConfig(vocab_size=64, embed_dim=16, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, mlp_dim=32, sliding_window_size=4)
TEACHER = dataclasses.replace(STUDENT, embed_dim=24, num_layers=3, head_dim=12)
B, T = 8, 8
EXACT = dict(outer_lr=1.0, outer_momentum=0.0, alpha=0.0, overlap=0, quantization="none")


def make_batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, STUDENT.vocab_size, (B, T + 1))
  return dict(decoder_input_tokens=tokens[:, :-1].astype(np.int32),
              decoder_target_tokens=tokens[:, 1:].astype(np.int32),
              decoder_loss_weights=(rng.random((B, T)) < 0.8).astype(np.float32))


def distillation_trainer(mesh, steps=10):
  schedule, tx = OptimizerConfig(learning_rate=1e-3, warmup_steps=1).build(steps)
  return DistillationTrainer(STUDENT, TEACHER, tx, schedule, mesh, kind="forward_kl")


def close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_one_replica_h1_equals_the_distillation_step():
  """M = 1, H = 1, outer SGD lr 1 without momentum, α = 0, τ = 0: the outer step
  copies the replica, so every step equals DistillationTrainer's."""
  mesh = partitioning.create_mesh({"data": -1})
  plain = distillation_trainer(mesh)
  config = sd.DiLoCoConfig(num_replicas=1, sync_every=1, num_fragments=2, **EXACT)
  loop = diloco_loop.distillation(plain, config, batch_size=B)
  teacher = plain.init_teacher(jax.random.key(1))
  ref, state = plain.init_state(jax.random.key(0)), loop.init_state(jax.random.key(0))
  close(state.outer_params, ref.params, rtol=0, atol=0)
  loop.start(0)
  for t in range(3):
    batch = plain.shard_batch(make_batch(t))
    ref, ref_metrics = plain.train_step(ref, batch, teacher)
    state, metrics = loop.train_step(state, batch, teacher)
    for k in ("loss", "nll", "accuracy", "grad_norm", "tokens"):
      np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, err_msg=k)
    assert loop.trainer.event(t).sync == (0, 1)  # H = 1: every fragment, every step
    close(state.outer_params, ref.params, rtol=1e-4, atol=1e-6)
    close(sd.replica_params(state, 0), ref.params, rtol=1e-4, atol=1e-6)
  assert float(metrics["loss"]) > 0
  with pytest.raises(ValueError, match="pass `aux`"):
    loop.train_step(state, batch)


def test_two_replicas_sharded_match_unsharded_and_leave_the_teacher_untouched():
  config = sd.DiLoCoConfig(num_replicas=2, sync_every=2, num_fragments=2, overlap=1,
                           alpha=0.5, outer_lr=0.7, quantization="fp4_e3m0")
  mesh = partitioning.create_mesh({"fsdp": 2, "tensor": 2}, {"replica": 2})
  plain = distillation_trainer(mesh)
  loop = diloco_loop.distillation(plain, config, batch_size=B)
  teacher = plain.init_teacher(jax.random.key(1))
  teacher_before = jax.device_get(teacher)
  state = loop.init_state(jax.random.key(0))
  loop.start(0)

  # unsharded reference: StreamingDiLoCo with the same inner step, aux = teacher
  student, teacher_model = Transformer(STUDENT), Transformer(TEACHER)
  inner = functools.partial(optimizer_step, loss_fn=distillation_objective(
      student, teacher_model), tx=plain.tx, schedule=plain.schedule)
  algo = sd.StreamingDiLoCo(config, inner, jax.device_get(state.outer_params))
  ref = algo.init(jax.device_get(jax.tree.map(lambda x: x[0], state.replicas)))
  losses, ref_losses = [], []
  # offsets 0 and 1: step 1 exchanges fragment 1; step 2 applies it and exchanges
  # fragment 0; step 3 applies that and exchanges fragment 1 again
  for t in range(3):
    batch = make_batch(t)
    state, metrics = loop.train_step(state, plain.shard_batch(batch), teacher)
    ref, ref_metrics = algo.train_step(ref, sd.split_replicas(batch, 2), t,
                                       aux=teacher_before)
    losses.append(np.asarray(metrics["loss_per_replica"]))
    ref_losses.append(np.asarray(ref_metrics["loss_per_replica"]))
  np.testing.assert_allclose(np.stack(losses), np.stack(ref_losses), rtol=2e-5)
  assert not np.allclose(losses[-1][0], losses[-1][1])  # each replica its own rows
  close(state.outer_params, ref.outer_params, rtol=1e-3, atol=1e-4)
  close(state.replicas.params, ref.replicas.params, rtol=1e-3, atol=1e-4)
  close(state.inflight, ref.inflight, rtol=1e-3, atol=1e-4)
  q = state.replicas.params["layer_0"]["attn"]["q"]
  assert q.sharding.spec[0] == "replica"
  # no gradient, update or donation reaches the teacher: bit-identical, same sharding
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher), teacher_before)
  for x, s in zip(jax.tree.leaves(teacher), jax.tree.leaves(plain.teacher_shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
  payload = loop.trainer.traffic.payload_bytes
  assert loop.traffic()["replica_bytes"] == 2 * payload[1] + payload[0]


# --------------------------------------------------------------- the gin run

@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Tiny random teacher and oracle with the gin student's vocabulary."""
  root = tmp_path_factory.mktemp("models")
  cfg = dataclasses.replace(TEACHER, vocab_size=2048)
  dirs = {}
  for name, seed in (("teacher", 1), ("oracle", 2)):
    params = nn.unbox(Transformer(cfg).init(jax.random.key(seed),
                                            jnp.zeros((1, 1), jnp.int32))["params"])
    params_checkpoint.save(str(root / name), params, cfg)
    dirs[name] = str(root / name)
  return dirs


def configure(extra=()):
  main.register_configurables()
  import posttrain_jax.data.tasks  # pylint: disable=unused-import,import-outside-toplevel
  gin.clear_config()
  cli.configure(cli.parse_flags([f"--gin_file={GIN}", *extra]))


def gin_distill(models, run_dir, num_steps):
  """The gin file on tiny models: M = 2 on the mesh's replica axis, H = 4 (2
  fragments, offsets 0 and 2, τ = 1), both online sources (the student samples
  from the outer params), proxy/golden and LM eval."""
  configure([
      f"--gin.RUN_DIR='{run_dir}'", f"--gin.NUM_STEPS={num_steps}",
      f"--gin.TEACHER='{models['teacher']}'",
      f"--gin.distill.oracle_checkpoint='{models['oracle']}'",
      "--gin.distill.initial_checkpoint=None",
      "--gin.distill.sources={'online_teacher': 1.0, 'online_student': 1.0}",
      "--gin.ModelConfig.embed_dim=16", "--gin.ModelConfig.head_dim=8",
      "--gin.ModelConfig.mlp_dim=32", "--gin.ModelConfig.sliding_window_size=4",
      "--gin.BATCH_SIZE=8", "--gin.PROMPT_LENGTH=8", "--gin.MAX_NEW_TOKENS=4",
      "--gin.eval_prompts/PromptConfig.batch_size=8", "--gin.distill.num_eval_prompts=8",
      "--gin.distill.eval_every=3", "--gin.distill.log_every=2",
      "--gin.distill.checkpoint_every=2", "--gin.distill.async_checkpointing=False",
      "--gin.distill.eval_data=@eval_lm/DatasetConfig()",
      "--gin.eval_lm/DatasetConfig.task_name='pydoc_lm'",
      "--gin.eval_lm/DatasetConfig.split='validation'",
      "--gin.eval_lm/DatasetConfig.sequence_length=16",
      "--gin.eval_lm/DatasetConfig.batch_size=8", "--gin.distill.eval_batches=1",
      "--gin.OptimizerConfig.warmup_steps=1",
      "--gin.OptimizerConfig.decay_steps=6",  # the same schedule for 4 and 6 steps
      "--gin.distill.ici_parallelism={'replica': 2, 'data': -1}",
      "--gin.DiLoCoConfig.sync_every=4"])
  try:
    return gin.get_configurable("posttrain_jax.distill")(
        operative_config=gin.config_str())
  finally:
    gin.clear_config()


def test_gin_distill_streaming_evaluates_outer_params_and_resumes_exactly(models, tmp_path):
  full = gin_distill(models, tmp_path / "full", 6)
  assert sorted(full.losses) == list(range(1, 7))
  assert sorted(full.eval_metrics) == [0, 3, 6]
  for k in ("proxy_kl", "golden_kl", "lm_loss"):
    assert np.isfinite(full.eval_metrics[6][k]) and full.eval_metrics[6][k] > 0, k
  assert sum(full.source_counts.values()) == 6
  t = full.traffic  # fragment 1 synced at step 2 (and 6), fragment 0 at step 4
  assert t["replica_bytes"] > 0 and t["sent_bytes"] == 2 * t["replica_bytes"]
  assert t["dp_ratio"] > 4 * 8 * 0.9 / 2  # fp4 (8x), each fragment once per H = 4
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(tmp_path / "full"))
  acc.Reload()
  assert {"traffic/sent_bytes", "traffic/peak_step_bytes", "traffic/dp_ratio",
          "eval/proxy_kl", "eval/golden_kl", "loss"} <= set(acc.Tags()["tensors"])
  assert [e.step for e in acc.Tensors("traffic/sent_bytes")] == [2, 4, 6]

  # the checkpoint holds the whole DiLoCo state; the LM eval is of θ̃, not a replica
  location = params_checkpoint.locate(str(tmp_path / "full"))
  assert location.subtree == "outer_params" and location.step == 6
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  saved = ocp.PyTreeCheckpointer().restore(location.path)
  schedule, tx = OptimizerConfig().build(1)
  lm = Trainer(Transformer(params_checkpoint.model_config_of(location)), tx, schedule,
               partitioning.create_mesh({"data": -1}))
  batches = train_lib._eval_batches(DatasetConfig(  # pylint: disable=protected-access
      task_name="pydoc_lm", split="validation", sequence_length=16, batch_size=8), 1)
  outer = train_lib.evaluate(lm, saved["outer_params"], batches)["loss"]
  replica = train_lib.evaluate(
      lm, jax.tree.map(lambda x: x[0], saved["replicas"]["params"]), batches)["loss"]
  np.testing.assert_allclose(full.eval_metrics[6]["lm_loss"], outer, rtol=1e-5)
  assert abs(outer - replica) > 1e-6

  # stopped after step 4 (fragment 0's exchange in flight), resumed to 6
  first = gin_distill(models, tmp_path / "split", 4)
  second = gin_distill(models, tmp_path / "split", 6)
  assert second.resumed_from == 4 and sorted(second.losses) == [5, 6]
  losses = {**first.losses, **second.losses}
  for step in range(1, 7):
    np.testing.assert_allclose(losses[step], full.losses[step], rtol=1e-5, err_msg=step)
  for k in ("proxy_kl", "golden_kl", "lm_loss"):
    np.testing.assert_allclose(second.eval_metrics[6][k], full.eval_metrics[6][k],
                               rtol=1e-5, err_msg=k)
  assert second.source_counts == full.source_counts
  assert second.traffic == full.traffic


def test_gin_file_configures_streaming_fp4_distillation():
  configure(["--gin.RUN_DIR='/tmp/unused'"])
  try:
    assert gin.query_parameter("job.name") == "distill"
    config = gin.get_configurable(sd.DiLoCoConfig)()
    assert (config.num_replicas, config.sync_every, config.num_fragments, config.pattern,
            config.overlap, config.alpha, config.quantization) == (
                2, 30, 2, "strided", 1, 0.5, "fp4_e3m0")
    assert (config.outer_lr, config.outer_momentum) == (0.4, 0.9)
    assert gin.query_parameter("%TEACHER") == "runs/teacher_hacking/teacher"
    assert gin.query_parameter("distill.oracle_checkpoint") == "runs/teacher_hacking/oracle"
    assert gin.query_parameter("distill.sources") == {"online_teacher": 1.0}
    student = gin.get_configurable(ModelConfig)()
    assert (student.num_layers, student.embed_dim) == (2, 64)  # the teacher-hacking student
    assert gin.query_parameter("%BATCH_SIZE") % config.num_replicas == 0
  finally:
    gin.clear_config()
