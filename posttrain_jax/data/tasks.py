"""seqio Tasks for decoder-only language modelling over plain-text files.

Each line of the files is one document (its text becomes ``"targets"``);
blank lines are skipped; documents longer than the sequence length are split
into consecutive chunks rather than truncated. Importing this module registers ``"pydoc_lm"``
over the shipped corpus (splits ``"train"`` and ``"validation"``) and the SFT task
``"pydoc_sft"`` over the shipped instruction set (data.chat, data.sft_pipeline).
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Mapping, Union

from posttrain_jax.data._tf import tf
from posttrain_jax.data.vocab import get_vocabulary
import seqio

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
PYDOC_LM_TASK = "pydoc_lm"
PYDOC_SPLITS = {
    "train": os.path.join(CORPUS_DIR, "pydoc_train.txt"),
    "validation": os.path.join(CORPUS_DIR, "pydoc_validation.txt"),
}

FilePattern = Union[str, Iterable[str]]


def _drop_blank_lines(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)


# The raw text copy ("targets_pretokenized") is not needed for LM training and
# only makes the packing converter warn that it drops it.
_tokenize = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)


@seqio.map_over_dataset
def _line_to_targets(line: tf.Tensor) -> dict:
    return {"targets": line}


def split_to_sequence_length(dataset: tf.data.Dataset, sequence_length=None,
                             output_features=None) -> tf.data.Dataset:
    """Splits each tokenized "targets" into consecutive chunks of at most the
    target feature length, so long documents are kept whole instead of trimmed.

    Runs after EOS is appended; only a document's last chunk ends with EOS.
    Without a sequence length (e.g. ``task.get_dataset(None)``) it is a no-op.
    """
    del output_features
    if not sequence_length or not sequence_length.get("targets"):
        return dataset
    length = int(sequence_length["targets"])

    def chunks(ex):
        tokens = ex["targets"]
        n = tf.shape(tokens, out_type=tf.int64)[0]
        q, r = n // length, n % length
        row_lengths = tf.concat(
            [tf.fill([q], tf.constant(length, tf.int64)), tf.boolean_mask([r], [r > 0])], 0)
        pieces = tf.RaggedTensor.from_row_lengths(tokens, row_lengths)
        return tf.data.Dataset.from_tensor_slices({"targets": pieces})

    return dataset.flat_map(chunks)


def register_text_lm_task(
    name: str,
    split_to_filepattern: Mapping[str, FilePattern],
    vocab_path: str | os.PathLike | None = None,
) -> seqio.Task:
    """Register (or re-register) a seqio LM Task over text files, one example per line.

    Args:
      name: task name for ``seqio.get_dataset`` / ``LMBatchIterator``.
      split_to_filepattern: split name -> file path, glob, or list of them.
      vocab_path: SentencePiece model file; defaults to the shipped vocab.

    Re-registering a name replaces the previous task, so repeated calls and
    module reloads never raise. Returns the registered task.
    """
    vocab = get_vocabulary(vocab_path)
    splits = {
        k: (os.fspath(v) if isinstance(v, (str, os.PathLike)) else [os.fspath(p) for p in v])
        for k, v in split_to_filepattern.items()
    }
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource(splits),
        preprocessors=[
            _drop_blank_lines,
            _line_to_targets,
            _tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos,
            split_to_sequence_length,
        ],
        output_features={
            "targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32),
        },
        metric_fns=[],
    )


def task_filepattern(task_name: str, split: str) -> FilePattern | None:
    """The file pattern behind a file-based task's split (None if unknown)."""
    task = seqio.get_mixture_or_task(task_name)
    mapping = getattr(task.source, "_split_to_filepattern", None)  # no public accessor
    return mapping.get(split) if mapping else None


register_text_lm_task(PYDOC_LM_TASK, PYDOC_SPLITS)

# The shipped instruction set (tools/make_sft_data.py; conversations in Gemma's
# chat format, data.chat): the SFT task "pydoc_sft".
from posttrain_jax.data import chat  # pylint: disable=wrong-import-position

PYDOC_SFT_TASK = "pydoc_sft"
PYDOC_SFT_SPLITS = chat.PYDOC_SFT_SPLITS
chat.register_sft_task(PYDOC_SFT_TASK, PYDOC_SFT_SPLITS, validate=False)
