"""Prompt tasks and the resumable prompt iterator (sampling data for distillation / RL).

A prompt is a prefix of a document (one document per line of a text file).
Rule, per document of n tokens (SentencePiece ids, no EOS):

* documents with n < ``min_document_tokens`` (default 16) are dropped: too short
  to leave a continuation worth generating;
* the prompt ("inputs") is the first ``min(max_prompt_tokens, n // 2)`` tokens
  (default cap 64), so at least half of every document remains as its
  reference continuation ("targets", with EOS appended).

On the shipped corpus this drops 2 of 3370 train documents and none of the 103
validation ones. The task is also a valid prefix-LM task (ground-truth
continuations) for ``LMBatchIterator(..., inputs_length=...)``.

``PromptIterator`` yields left-padded prompt batches; consumers cut prompts to
``prompt_length`` (their first tokens). Importing this module registers
``"pydoc_prompts"`` (splits "train", "validation") over the shipped corpus.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping

from posttrain_jax.data import pipeline as _pipeline
from posttrain_jax.data import tasks as _tasks
from posttrain_jax.data._tf import tf
from posttrain_jax.data.vocab import get_vocabulary
import seqio

PYDOC_PROMPTS_TASK = "pydoc_prompts"
MIN_DOCUMENT_TOKENS = 16
MAX_PROMPT_TOKENS = 64
# Fields of get_state() that must match for set_state().
STATE_CONFIG_FIELDS = ("task_name", "split", "seed", "prompt_length", "batch_size",
                       "shuffle", "num_epochs", "shard_index", "num_shards")


def split_prompt(dataset: tf.data.Dataset, *, min_document_tokens: int,
                 max_prompt_tokens: int) -> tf.data.Dataset:
  """Tokenized "targets" (a whole document) -> {"inputs": prefix, "targets": rest}.

  Drops documents shorter than min_document_tokens; the prefix is the first
  min(max_prompt_tokens, n // 2) of the n tokens.
  """
  def keep(ex):
    return tf.shape(ex["targets"])[0] >= min_document_tokens

  def split(ex):
    tokens = ex["targets"]
    k = tf.minimum(max_prompt_tokens, tf.shape(tokens)[0] // 2)
    return {"inputs": tokens[:k], "targets": tokens[k:]}

  return dataset.filter(keep).map(split, num_parallel_calls=tf.data.AUTOTUNE)


def register_prompt_task(name: str, split_to_filepattern: Mapping[str, _tasks.FilePattern],
                         vocab_path: str | os.PathLike | None = None, *,
                         min_document_tokens: int = MIN_DOCUMENT_TOKENS,
                         max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> str:
  """Registers (or replaces) a prompt task over text files, one document per line.

  Features: "inputs" (the prompt, a document prefix; no EOS) and "targets" (the
  rest of the document + EOS). Returns the task name.
  """
  if min_document_tokens < 2 or max_prompt_tokens < 1:
    raise ValueError(f"Need min_document_tokens >= 2 and max_prompt_tokens >= 1 so every "
                     f"prompt and continuation has a token, got {min_document_tokens} and "
                     f"{max_prompt_tokens}.")
  vocab = get_vocabulary(vocab_path)
  splits = {k: (os.fspath(v) if isinstance(v, (str, os.PathLike)) else [os.fspath(p) for p in v])
            for k, v in split_to_filepattern.items()}
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.TextLineDataSource(splits),
      preprocessors=[
          _tasks._drop_blank_lines,  # pylint: disable=protected-access
          _tasks._line_to_targets,  # pylint: disable=protected-access
          _tasks._tokenize,  # pylint: disable=protected-access
          functools.partial(split_prompt, min_document_tokens=min_document_tokens,
                            max_prompt_tokens=max_prompt_tokens),
          seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos,
      ],
      output_features={
          "inputs": seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32),
          "targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32),
      },
      metric_fns=[],
  )
  return name


def _prompt_task(task_name: str, split: str, prompt_length: int, batch_size: int,
                 num_epochs: int | None, shard_index: int, num_shards: int) -> seqio.Task:
  if prompt_length <= 0:
    raise ValueError(f"prompt_length must be positive, got {prompt_length}")
  task = _pipeline._validate(task_name, split, prompt_length, batch_size,  # pylint: disable=protected-access
                             num_epochs, shard_index, num_shards)
  if not _pipeline.is_prefix_lm(task):
    raise ValueError(f"Task {task_name!r} has no \"inputs\" (prompt) feature. Fix: use a "
                     "prompt task, e.g. register_prompt_task(name, {split: text_file}).")
  return task


def _left_pad(prompt_length: int):
  def fn(ex):
    prompt = tf.cast(ex["inputs"][:prompt_length], tf.int32)
    n = tf.shape(prompt)[0]
    return {"prompts": tf.concat([tf.zeros([prompt_length - n], tf.int32), prompt], 0),
            "prompt_lengths": n}
  return fn


def prompt_dataset(*, task_name: str, split: str, prompt_length: int, shuffle: bool,
                   seed: int, num_epochs: int | None, shard_index: int = 0,
                   num_shards: int = 1) -> tf.data.Dataset:
  """Unbatched deterministic {"prompts": int32[prompt_length] left-padded, "prompt_lengths"}."""
  task = _prompt_task(task_name, split, prompt_length, 1, num_epochs, shard_index,
                      num_shards)
  ds = task.get_dataset(
      sequence_length=None, split=split, use_cached=False, shuffle=shuffle, seed=seed,
      shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
      num_epochs=num_epochs)
  ds = ds.filter(lambda ex: tf.shape(ex["inputs"])[0] > 0)  # every prompt has a token
  ds = ds.map(_left_pad(prompt_length), num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


class PromptIterator(_pipeline.ResumableBatchIterator):
  """Batches {"prompts": int32 [batch_size, prompt_length] left-padded with 0,
  "prompt_lengths": int32 [batch_size]}; prompts longer than prompt_length keep
  their first prompt_length tokens.

  Deterministic (same arguments => same batches in any process), sharded per
  process (``shard_index``/``num_shards``), ``num_epochs=None`` repeats forever,
  and resumable with ``get_state()/set_state()`` like ``LMBatchIterator``.
  """

  state_config_fields = STATE_CONFIG_FIELDS

  def __init__(self, *, task_name: str, split: str, prompt_length: int, batch_size: int,
               shuffle: bool = True, seed: int = 0, num_epochs: int | None = None,
               shard_index: int = 0, num_shards: int = 1, start_batch: int = 0):
    self._config = dict(
        task_name=task_name, split=split, seed=int(seed), prompt_length=int(prompt_length),
        batch_size=int(batch_size), shuffle=bool(shuffle),
        num_epochs=None if num_epochs is None else int(num_epochs),
        shard_index=int(shard_index), num_shards=int(num_shards))
    _prompt_task(task_name, split, prompt_length, batch_size, num_epochs, shard_index,
                 num_shards)
    self._start(start_batch)

  def _examples(self) -> tf.data.Dataset:
    return prompt_dataset(**{k: v for k, v in self._config.items() if k != "batch_size"})

  def _describe_empty(self, where: str) -> str:
    return (f"The prompt dataset is empty: {where} yields no prompts (documents shorter "
            "than the task's min_document_tokens are dropped). Fix: point the split at a "
            "text file with longer documents, lower min_document_tokens "
            "(register_prompt_task), or use fewer shards.")


def load_prompts(*, task_name: str, split: str, prompt_length: int,
                 num_prompts: int) -> list[list[int]]:
  """The first num_prompts prompts of a split in file order (held-out evaluation prompts).

  Each is a list of token ids, cut to its first prompt_length tokens.
  """
  if num_prompts < 1:
    raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
  ds = prompt_dataset(task_name=task_name, split=split, prompt_length=prompt_length,
                      shuffle=False, seed=0, num_epochs=1)
  prompts = [ex["prompts"][prompt_length - int(ex["prompt_lengths"]):].tolist()
             for ex in ds.take(num_prompts).as_numpy_iterator()]
  if len(prompts) < num_prompts:
    raise ValueError(
        f"Task {task_name!r}, split {split!r} has only {len(prompts)} prompts, fewer than "
        f"num_prompts={num_prompts}. Fix: lower num_prompts or use a larger split.")
  return prompts


register_prompt_task(PYDOC_PROMPTS_TASK, _tasks.PYDOC_SPLITS)
