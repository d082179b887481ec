"""seqio task registration: pydoc_lm contents and register_text_lm_task."""

import importlib

import numpy as np
import seqio

from posttrain_jax.data import tasks
from posttrain_jax.data.vocab import get_vocabulary


def _examples(task_name, split, n, length=128):
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset({"targets": length}, split=split, shuffle=False)
    return [ex["targets"] for ex in ds.take(n).as_numpy_iterator()]


def test_pydoc_lm_is_registered_with_both_splits():
    task = seqio.get_mixture_or_task(tasks.PYDOC_LM_TASK)
    assert set(task.splits) == {"train", "validation"}
    assert task.output_features["targets"].add_eos


def test_pydoc_lm_examples_are_valid_in_both_splits():
    vocab = get_vocabulary()
    for split in ("train", "validation"):
        examples = _examples("pydoc_lm", split, 32)
        assert len(examples) == 32, split
        for ids in examples:
            assert ids.dtype == np.int32 and 2 <= len(ids) <= 128
            assert ids.max() < vocab.vocab_size and ids.min() > 0
        # documents end with EOS; only their last chunk carries it
        assert any(ids[-1] == vocab.eos_id for ids in examples)
        text = vocab.decode(examples[0].tolist())
        assert len(text) > 20 and " " in text


def test_long_documents_are_split_not_truncated():
    vocab = get_vocabulary()
    chunks = _examples("pydoc_lm", "validation", 200, length=16)
    assert all(len(c) <= 16 for c in chunks)
    # regroup chunks into documents at each EOS and compare with the text
    task = seqio.get_mixture_or_task("pydoc_lm")
    lines = task.source.get_dataset(split="validation").as_numpy_iterator()
    docs = [line for line in lines if line.strip()][:5]
    flat = np.concatenate(chunks)
    ends = np.flatnonzero(flat == vocab.eos_id)
    start = 0
    for doc, end in zip(docs, ends[:5]):
        expected = vocab.encode(doc.decode("utf-8")) + [vocab.eos_id]
        assert flat[start:end + 1].tolist() == expected
        start = end + 1


def test_registration_is_idempotent():
    tasks.register_text_lm_task("pydoc_lm", tasks.PYDOC_SPLITS)
    importlib.reload(tasks)
    assert "pydoc_lm" in seqio.TaskRegistry.names()


def test_custom_text_task_skips_blank_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("First document here.\n\n   \nSecond one.\n")
    tasks.register_text_lm_task("tmp_custom_lm", {"train": str(path)})
    tasks.register_text_lm_task("tmp_custom_lm", {"train": str(path)})  # re-register: fine
    vocab = get_vocabulary()
    decoded = [vocab.decode(ids[:-1].tolist()) for ids in _examples("tmp_custom_lm", "train", 10)]
    assert decoded == ["First document here.", "Second one."]
    assert tasks.task_filepattern("tmp_custom_lm", "train") == str(path)
    seqio.TaskRegistry.remove("tmp_custom_lm")
