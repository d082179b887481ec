"""seqio Tasks for decoder-only language modelling over plain-text files.

Each line of the files is one example (its text becomes ``"targets"``);
blank lines are skipped. Importing this module registers ``"pydoc_lm"``
over the shipped corpus (splits ``"train"`` and ``"validation"``).
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
            seqio.preprocessors.append_eos_after_trim,
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
