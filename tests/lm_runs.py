"""Small LM training runs shared by the tests of the train job and of core pieces it wires."""

from posttrain_jax.core.optimizer import OptimizerConfig
from posttrain_jax.data.dataset_config import DatasetConfig
from posttrain_jax.jobs.train import train
from posttrain_jax.models import ModelConfig

MODEL = ModelConfig(vocab_size=2048, embed_dim=32, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=16, mlp_dim=64, sliding_window_size=8)
DATA = DatasetConfig(task_name="pydoc_lm", split="train", sequence_length=32,
                     batch_size=8, seed=3)
EVAL = DatasetConfig(task_name="pydoc_lm", split="validation", sequence_length=32,
                     batch_size=8, shuffle=False, num_epochs=1)


def run(run_dir, num_steps, model=MODEL, **kw):
  kw.setdefault("ici_parallelism", {"data": -1})
  return train(model_config=model, run_dir=str(run_dir), train_data=DATA,
               num_steps=num_steps,
               optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2,
                                         decay_steps=8),
               checkpoint_every=3, log_every=2, **kw)
