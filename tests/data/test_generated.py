"""Generated TFDS datasets: write -> register_generated_task -> read back exactly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio

from posttrain_jax.data import generated
from posttrain_jax.data.pipeline import LMBatchIterator, eval_batches

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _records(n=6, offset=0):
  rng = np.random.default_rng(offset)
  out = []
  for i in range(n):
    prompt = rng.integers(3, 2048, size=1 + i % 4).tolist()
    response = rng.integers(3, 2048, size=2 + i % 3).tolist() + [1]
    out.append(dict(prompt=prompt, response=response, prompt_index=i // 2,
                    sample_index=i % 2))
  return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  records = _records()
  generated.write_generated_dataset(records, data_dir=data_dir, name="toy")
  return data_dir, records


def test_write_then_read(dataset):
  data_dir, records = dataset
  assert os.listdir(os.path.join(data_dir, generated.BUILDER_NAME)) == ["toy"]  # no staging
  back = generated.read_generated_dataset(data_dir=data_dir, name="toy")
  assert len(back) == len(records)
  for r, b in zip(records, back):
    assert b["prompt"].tolist() == r["prompt"] and b["response"].tolist() == r["response"]
    assert (b["prompt_index"], b["sample_index"]) == (r["prompt_index"], r["sample_index"])
    assert b["prompt"].dtype == np.int32


def test_existing_dataset_needs_overwrite(tmp_path):
  data_dir = str(tmp_path)
  generated.write_generated_dataset(_records(2), data_dir=data_dir, name="d")
  with pytest.raises(FileExistsError, match="already exists.*overwrite"):
    generated.write_generated_dataset(_records(3), data_dir=data_dir, name="d")
  generated.write_generated_dataset(_records(3, offset=5), data_dir=data_dir, name="d",
                                    overwrite=True)
  back = generated.read_generated_dataset(data_dir=data_dir, name="d")
  assert [b["prompt"].tolist() for b in back] == [r["prompt"] for r in _records(3, offset=5)]
  # a task registered again in the same process reads the new version
  def task_prompts():
    name = generated.register_generated_task("tmp_rewritten", name="d", data_dir=data_dir)
    ds = seqio.get_mixture_or_task(name).get_dataset(None, split="train", shuffle=False)
    return sorted(ex["inputs"].tolist() for ex in ds.as_numpy_iterator())
  assert task_prompts() == sorted(r["prompt"] for r in _records(3, offset=5))
  generated.write_generated_dataset(_records(5, offset=9), data_dir=data_dir, name="d",
                                    overwrite=True)
  assert task_prompts() == sorted(r["prompt"] for r in _records(5, offset=9))
  assert sorted(os.listdir(os.path.join(data_dir, generated.BUILDER_NAME))) == ["d"]


def test_half_written_dataset_is_not_readable(tmp_path, monkeypatch):
  data_dir = str(tmp_path)

  def bad_records():
    yield _records(1)[0]
    raise RuntimeError("sampler died")

  with pytest.raises(RuntimeError, match="sampler died"):
    generated.write_generated_dataset(bad_records(), data_dir=data_dir, name="half")
  assert not generated.exists(data_dir=data_dir, name="half")
  with pytest.raises(FileNotFoundError, match="No generated dataset 'half'.*generate_dataset"):
    generated.register_generated_task("tmp_half", name="half", data_dir=data_dir)
  # a failure in the middle of writing files also leaves nothing readable
  cls = generated._builder_class()

  def gen(self, records):
    yield 0, records[0]
    raise OSError("disk full")
  monkeypatch.setattr(cls, "_generate_examples", gen)
  with pytest.raises(Exception, match="disk full"):
    generated.write_generated_dataset(_records(2), data_dir=data_dir, name="half")
  assert os.listdir(os.path.join(data_dir, generated.BUILDER_NAME)) == []
  assert not generated.exists(data_dir=data_dir, name="half")


@pytest.mark.parametrize("bad,message", [
    ({"prompt": [3], "response": [4]}, "no 'prompt_index' field"),
    ({"response": [4], "prompt_index": 0, "sample_index": 0}, "no 'prompt' field"),
])
def test_bad_records_are_rejected(tmp_path, bad, message):
  with pytest.raises(ValueError, match=message):
    generated.write_generated_dataset([bad], data_dir=str(tmp_path), name="bad")
  with pytest.raises(ValueError, match="No records"):
    generated.write_generated_dataset([], data_dir=str(tmp_path), name="bad")
  with pytest.raises(ValueError, match="not valid"):
    generated.write_generated_dataset(_records(1), data_dir=str(tmp_path), name="a/b")


def test_fresh_process_reads_by_name_without_the_builder_class(dataset):
  """seqio.TfdsDataSource finds the dataset from name + data_dir alone."""
  data_dir, records = dataset
  code = (
      "import json, sys, seqio\n"
      "from posttrain_jax.data import generated\n"
      "name = generated.register_generated_task('fresh_toy', name='toy', data_dir=sys.argv[1])\n"
      "assert generated._builder_class.cache_info().currsize == 0\n"
      "import tensorflow_datasets as tfds\n"
      "assert 'posttrain_generated' not in tfds.list_builders(with_community_datasets=False)\n"
      "ds = seqio.get_mixture_or_task(name).get_dataset(None, split='train', shuffle=False)\n"
      "print(json.dumps([{k: v.tolist() for k, v in ex.items()} "
      "for ex in ds.as_numpy_iterator()]))\n")
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", code, data_dir], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads(proc.stdout.strip().splitlines()[-1])
  expected = [{"inputs": r["prompt"], "targets": r["response"]} for r in records]
  key = lambda x: json.dumps(x, sort_keys=True)
  assert sorted(rows, key=key) == sorted(expected, key=key)


def test_task_output_features_carry_the_vocabulary(dataset):
  name = generated.register_generated_task("gen_vocab_toy", name="toy", data_dir=dataset[0])
  task = seqio.get_mixture_or_task(name)
  assert sorted(task.output_features) == ["inputs", "targets"]
  assert task.output_features["targets"].vocabulary.vocab_size == 2048
  assert not task.output_features["targets"].add_eos


def _unpacked_rows(data_dir, pack):
  name = generated.register_generated_task("gen_lm_toy", name="toy", data_dir=data_dir)
  it = LMBatchIterator(task_name=name, split="train", sequence_length=16, inputs_length=6,
                       batch_size=2, shuffle=False, num_epochs=1, pack=pack)
  return list(it)


def test_lm_iterator_unpacked_gives_prompt_then_response(dataset):
  data_dir, records = dataset
  batches = _unpacked_rows(data_dir, pack=False)
  rows = sorted((b["decoder_target_tokens"][i].tolist(), b["decoder_loss_weights"][i].tolist())
                for b in batches for i in range(2))
  expected = []
  for r in records:
    n_p, n_r = len(r["prompt"]), len(r["response"])
    pad = 16 - n_p - n_r
    expected.append((r["prompt"] + r["response"] + [0] * pad,
                     [0.0] * n_p + [1.0] * n_r + [0.0] * pad))
  assert rows == sorted(expected)


def test_lm_iterator_packed_holds_every_record(dataset):
  data_dir, records = dataset
  name = generated.register_generated_task("gen_lm_toy", name="toy", data_dir=data_dir)
  (batch,) = eval_batches(task_name=name, split="train", sequence_length=32, inputs_length=8,
                          batch_size=8, pack=True)
  segments = []
  for r in range(8):
    seg = batch["decoder_segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = seg == s
      segments.append((batch["decoder_target_tokens"][r][where].tolist(),
                       batch["decoder_loss_weights"][r][where].tolist()))
  expected = [(x["prompt"] + x["response"], [0.0] * len(x["prompt"]) + [1.0] * len(x["response"]))
              for x in records]
  assert sorted(segments) == sorted(expected)
  assert sum(int(b.max()) for b in batch["decoder_segment_ids"]) == len(records)


def test_tfds_text_task_registers_lazily():
  """Registration needs no data (XSum/C4 cannot be downloaded here)."""
  name = generated.register_tfds_text_task("tmp_xsum", tfds_name="xsum:1.1.0",
                                           inputs_key="document", targets_key="summary",
                                           data_dir="/nonexistent")
  task = seqio.get_mixture_or_task(name)
  assert sorted(task.output_features) == ["inputs", "targets"]
  assert task.output_features["targets"].add_eos
  lm = seqio.get_mixture_or_task(generated.register_tfds_text_task(
      "tmp_c4", tfds_name="c4/en:3.1.0", targets_key="text"))
  assert sorted(lm.output_features) == ["targets"]
  seqio.TaskRegistry.remove("tmp_xsum")
  seqio.TaskRegistry.remove("tmp_c4")


def test_shuffled_training_reads_every_record(dataset):
  """Training shuffles files and examples; one epoch still holds each record once."""
  data_dir, records = dataset
  name = generated.register_generated_task("gen_lm_toy", name="toy", data_dir=data_dir)
  it = LMBatchIterator(task_name=name, split="train", sequence_length=16, inputs_length=6,
                       batch_size=3, shuffle=True, seed=1, num_epochs=1, pack=False)
  rows = sorted(b["decoder_target_tokens"][i][b["decoder_loss_weights"][i] > 0].tolist()
                for b in it for i in range(3))
  assert rows == sorted(r["response"] for r in records)


@pytest.mark.parametrize("gin_file,bindings,task,inputs_length,features", [
    ("data/xsum.gin", ["TFDS_DATA_DIR='/nonexistent'"], "xsum", 768, ["inputs", "targets"]),
    ("data/c4.gin", ["TFDS_DATA_DIR='/nonexistent'"], "c4_en", None, ["targets"]),
    ("data/generated.gin", ["GENERATED_NAME='toy'", "INPUTS_LENGTH=6"], "generated", 6,
     ["inputs", "targets"]),
])
def test_data_gin_files_register_their_tasks(dataset, gin_file, bindings, task, inputs_length,
                                             features):
  import gin
  from posttrain_jax import cli, main
  main.register_configurables()
  bindings = bindings + [f"GENERATED_DATA_DIR='{dataset[0]}'"] * ("GENERATED" in bindings[0])
  gin_dir = os.path.join(REPO, "gin")
  argv = [f"--gin_file={gin_dir}/models/gemma2_tiny.gin", f"--gin_file={gin_dir}/runs/train.gin",
          f"--gin_file={gin_dir}/{gin_file}", "--gin.RUN_DIR='/tmp/unused'",
          "--gin.SEQUENCE_LENGTH=1024", "--gin.BATCH_SIZE=8", "--gin.NUM_STEPS=1"]
  gin.clear_config()
  try:
    cli.configure(cli.parse_flags(argv + [f"--gin.{b}" for b in bindings]))
    with gin.config_scope("train_data"):
      cfg = gin.get_configurable("posttrain_jax.DatasetConfig")()
  finally:
    gin.clear_config()
  assert (cfg.task_name, cfg.inputs_length) == (task, inputs_length)
  source = seqio.get_mixture_or_task(task)
  assert sorted(source.output_features) == features
  assert isinstance(source.source, seqio.TfdsDataSource)
