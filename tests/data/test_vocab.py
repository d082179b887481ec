"""Shipped SentencePiece vocabulary: T5 special ids and lossless round trips."""

import os

import pytest

from posttrain_jax.data.vocab import DEFAULT_VOCAB_PATH, get_vocabulary


def test_default_vocab_is_shipped_and_cached():
    assert os.path.isfile(DEFAULT_VOCAB_PATH)
    assert get_vocabulary() is get_vocabulary(DEFAULT_VOCAB_PATH)


def test_special_ids():
    vocab = get_vocabulary()
    assert vocab.vocab_size == 2048
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    sp = vocab.tokenizer
    assert sp.bos_id() == -1
    assert sp.id_to_piece(0) == "<pad>" and sp.id_to_piece(1) == "</s>"


def test_round_trip_english():
    vocab = get_vocabulary()
    text = "The quick brown fox returns a list of 42 strings, sorted by length."
    ids = vocab.encode(text)
    assert ids and all(3 <= i < vocab.vocab_size for i in ids)
    assert vocab.decode(ids) == text


def test_byte_fallback_handles_unseen_characters():
    vocab = get_vocabulary()
    text = "naïve café 東京 🙂"
    ids = vocab.encode(text)
    assert vocab.unk_id not in ids
    assert vocab.decode(ids) == text


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        get_vocabulary(missing)


def test_package_lazy_exports():
    import posttrain_jax.data as data
    from posttrain_jax.data import pipeline, tasks, vocab

    assert data.get_vocabulary is vocab.get_vocabulary
    assert data.register_text_lm_task is tasks.register_text_lm_task
    assert data.LMBatchIterator is pipeline.LMBatchIterator
    assert data.eval_batches is pipeline.eval_batches
