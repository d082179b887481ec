"""TFDS-backed seqio tasks: generated (prompt, response) datasets and real TFDS text sets.

Generated datasets (e.g. teacher samples for offline distillation, Tiapkin et al.
2025, arXiv 2502.02671) are written as TensorFlow Datasets with the builder
``posttrain_generated``, one builder config per named dataset::

    DATA_DIR/posttrain_generated/NAME/1.0.0/{dataset_info.json, *.tfrecord-*}

Each record is ``{"prompt": int32[], "response": int32[], "prompt_index": int64,
"sample_index": int64}`` plus, when the records carry them, ``"prompt_text"``
and ``"response_text"`` strings. Files are tfrecord: the installed tfds cannot
read array_record through tf.data (``make_tf_data`` raises NotImplementedError),
and seqio reads through tf.data. tfds stores examples in a fixed order hashed
from their keys (not the written order: an ordered dataset would refuse the
file shuffling seqio asks for when training shuffles).

``register_generated_task`` reads such a dataset through ``seqio.TfdsDataSource``
(the path users take for real TFDS datasets) by name, version and data_dir, so
the reading process needs neither the records nor the builder class: tfds loads
a named version from its files. ``register_tfds_text_task`` does the same for
text TFDS datasets (XSum, WMT, C4), tokenizing with a SentencePiece vocabulary.

Both register functions return the task name, so gin can write
``DatasetConfig.task_name = @teacher_data/generated_task()``. This module
imports TensorFlow/tfds/seqio only when a function runs, so the binary can
register these functions with gin without loading TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import functools
import os
import shutil
import uuid

BUILDER_NAME = "posttrain_generated"
VERSION = "1.0.0"
TEXT_FIELDS = ("prompt_text", "response_text")
_INT_FIELDS = ("prompt_index", "sample_index")


def dataset_dir(data_dir: str | os.PathLike, name: str) -> str:
  """Where the named generated dataset lives under data_dir."""
  return os.path.join(os.path.abspath(os.fspath(data_dir)), BUILDER_NAME, name, VERSION)


def tfds_name(name: str) -> str:
  """The TFDS name ``posttrain_generated/NAME:1.0.0`` of a generated dataset."""
  return f"{BUILDER_NAME}/{name}:{VERSION}"


def exists(*, data_dir: str | os.PathLike, name: str) -> bool:
  return os.path.isfile(os.path.join(dataset_dir(data_dir, name), "dataset_info.json"))


@functools.lru_cache(maxsize=None)
def _builder_class():
  """The GeneratorBasedBuilder (defined once; tfds registers it by class name)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from posttrain_jax.data._tf import tf  # pylint: disable=g-import-not-at-top

  class PosttrainGenerated(tfds.core.GeneratorBasedBuilder):
    """(prompt, response) token-id records; one BuilderConfig per dataset name."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, split_records, with_text, **kwargs):
      self._split_records = split_records
      self._with_text = with_text
      super().__init__(**kwargs)

    def _info(self):
      features = {
          "prompt": tfds.features.Sequence(tf.int32),
          "response": tfds.features.Sequence(tf.int32),
          "prompt_index": tf.int64,
          "sample_index": tf.int64,
      }
      if self._with_text:
        features.update({k: tfds.features.Text() for k in TEXT_FIELDS})
      return tfds.core.DatasetInfo(
          builder=self, description=self.builder_config.description,
          features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(records)
              for split, records in self._split_records.items()}

    def _generate_examples(self, records):
      for i, record in enumerate(records):
        yield i, record

  PosttrainGenerated.__module__ = __name__
  return PosttrainGenerated


def _check_record(record: Mapping, n: int, with_text: bool) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for key in ("prompt", "response"):
    if key not in record:
      raise ValueError(f"Record {n} has no {key!r} field; each record needs prompt, "
                       "response, prompt_index and sample_index.")
    out[key] = np.asarray(record[key], np.int32).reshape(-1)
  for key in _INT_FIELDS:
    if key not in record:
      raise ValueError(f"Record {n} has no {key!r} field; each record needs prompt, "
                       "response, prompt_index and sample_index.")
    out[key] = int(record[key])
  if with_text:
    for key in TEXT_FIELDS:
      if key not in record:
        raise ValueError(f"Record {n} has no {key!r} but record 0 has text fields; give "
                         "prompt_text and response_text in every record or in none.")
      out[key] = str(record[key])
  return out


def write_generated_dataset(records, *, data_dir: str | os.PathLike, name: str,
                            description: str = "", overwrite: bool = False) -> str:
  """Prepares the TFDS dataset ``posttrain_generated/NAME`` under data_dir; returns its dir.

  Args:
    records: an iterable of record dicts (written as split "train"), or a
      mapping split name -> iterable of records.
    data_dir: TFDS data directory.
    name: dataset (builder config) name: letters, digits and underscores.
    description: stored in dataset_info.json.
    overwrite: replace an existing dataset of that name (else an error).

  Atomic: the dataset is prepared in a staging directory next to its final place
  and renamed into place when complete, so readers never see a partial dataset
  (an interrupted write leaves only a ``.staging-*`` directory behind).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not name or not name.replace("_", "a").isalnum() or not name[0].isalpha():
    raise ValueError(f"Dataset name {name!r} is not valid; use letters, digits and "
                     "underscores, starting with a letter.")
  final = dataset_dir(data_dir, name)
  if exists(data_dir=data_dir, name=name) and not overwrite:
    raise FileExistsError(f"Generated dataset {name!r} already exists at {final}; pass "
                          "overwrite=True (--overwrite) or choose another name.")
  split_records = dict(records) if isinstance(records, Mapping) else {"train": records}
  split_records = {k: list(v) for k, v in split_records.items()}
  if not split_records or any(not v for v in split_records.values()):
    empty = [k for k, v in split_records.items() if not v] or ["(no split)"]
    raise ValueError(f"No records to write for split(s) {empty} of dataset {name!r}.")
  first = next(iter(split_records.values()))[0]
  with_text = all(k in first for k in TEXT_FIELDS)
  split_records = {k: [_check_record(r, n, with_text) for n, r in enumerate(v)]
                   for k, v in split_records.items()}

  parent = os.path.dirname(os.path.dirname(final))  # DATA_DIR/posttrain_generated
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f".staging-{name}-{uuid.uuid4().hex[:8]}")
  try:
    builder = _builder_class()(
        split_records=split_records, with_text=with_text, data_dir=staging,
        config=tfds.core.BuilderConfig(name=name, version=VERSION, description=description),
        file_format="tfrecord")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=tfds.GenerateMode.FORCE_REDOWNLOAD))
    built = dataset_dir(staging, name)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.exists(final):
      trash = f"{staging}-old"
      os.rename(final, trash)
      os.rename(built, final)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(built, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return final


def read_generated_dataset(*, data_dir: str | os.PathLike, name: str,
                           split: str = "train") -> list[dict]:
  """All records of a split as numpy dicts sorted by (prompt_index, sample_index)
  (small datasets, tests)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _require_exists(data_dir, name)
  builder = tfds.builder_from_directory(dataset_dir(data_dir, name))
  records = builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()
  return sorted(records, key=lambda r: (int(r["prompt_index"]), int(r["sample_index"])))


def _require_exists(data_dir, name) -> None:
  if not exists(data_dir=data_dir, name=name):
    raise FileNotFoundError(
        f"No generated dataset {name!r} under data_dir {os.fspath(data_dir)!r} (expected "
        f"{dataset_dir(data_dir, name)}/dataset_info.json). Fix: check data_dir and name, "
        "or write it with tools/generate_dataset.py.")


def _replace_task(task_name: str, **kwargs) -> None:
  import seqio  # pylint: disable=g-import-not-at-top
  if task_name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(task_name)
  seqio.TaskRegistry.add(task_name, metric_fns=[], **kwargs)


def _rename(mapping: Mapping[str, str]):
  """seqio map preprocessor: keep only the mapped keys, under their new names."""
  import seqio  # pylint: disable=g-import-not-at-top

  @seqio.map_over_dataset
  def fn(ex):
    return {new: ex[old] for old, new in mapping.items()}
  return fn


def register_generated_task(task_name: str, *, name: str, data_dir: str,
                            vocab_path: str | None = None,
                            splits: Sequence[str] = ("train",)) -> str:
  """Registers (or replaces) a prefix-LM seqio Task over a generated dataset; returns task_name.

  Features: ``"inputs"`` = prompt, ``"targets"`` = response, already token ids
  (no tokenizer step, no EOS added: a response ends with EOS iff the sampler
  emitted it). The output features carry the vocabulary (default: the shipped
  one) for decoding. The source is ``seqio.TfdsDataSource`` over
  ``posttrain_generated/NAME:1.0.0`` in data_dir.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from posttrain_jax.data._tf import tf  # pylint: disable=g-import-not-at-top
  from posttrain_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top
  _require_exists(data_dir, name)
  vocab = get_vocabulary(vocab_path)
  source = seqio.TfdsDataSource(tfds_name=tfds_name(name),
                                tfds_data_dir=os.path.abspath(data_dir), splits=list(splits))
  _replace_task(
      task_name,
      source=source,
      preprocessors=[_rename({"prompt": "inputs", "response": "targets"})],
      output_features={
          "inputs": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32),
          "targets": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32),
      })
  return task_name


def register_tfds_text_task(task_name: str, *, tfds_name: str, targets_key: str,
                            inputs_key: str | None = None, data_dir: str | None = None,
                            vocab_path: str | None = None,
                            splits: Iterable[str] | Mapping[str, str] | None = None) -> str:
  """Registers (or replaces) a seqio Task over a text TFDS dataset; returns task_name.

  With ``inputs_key`` (e.g. XSum: inputs_key="document", targets_key="summary")
  the task is prefix-LM ("inputs" -> "targets"); without it (C4: targets_key="text")
  it is plain LM. Text is tokenized with the SentencePiece vocabulary (default:
  the shipped one; pass the model's own for real runs) and EOS is appended to
  the targets. ``tfds_name`` is e.g. "xsum:1.1.0" or "c4/en:3.1.0"; the data must
  already be prepared in data_dir (nothing is downloaded at training time).
  """
  import seqio  # pylint: disable=g-import-not-at-top
  from posttrain_jax.data._tf import tf  # pylint: disable=g-import-not-at-top
  from posttrain_jax.data.tasks import split_to_sequence_length  # pylint: disable=g-import-not-at-top
  from posttrain_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top
  vocab = get_vocabulary(vocab_path)
  mapping = {targets_key: "targets"}
  features = {"targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)}
  if inputs_key is not None:
    mapping = {inputs_key: "inputs", targets_key: "targets"}
    features["inputs"] = seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32)
  if splits is not None and not isinstance(splits, Mapping):
    splits = list(splits)
  # Plain LM splits long documents into chunks (as text-file LM tasks do).
  chunk = [] if inputs_key is not None else [split_to_sequence_length]
  _replace_task(
      task_name,
      source=seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir,
                                  splits=splits, read_only=True),
      preprocessors=[
          _rename(mapping),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos,
          *chunk,
      ],
      output_features=features)
  return task_name
