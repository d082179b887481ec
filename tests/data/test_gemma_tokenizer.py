"""A Gemma-style SentencePiece tokenizer.model (pad 0, eos 1, bos 2, unk 3) as the
seqio vocabulary of a task: encode/decode and batches from the LM pipeline."""

import itertools

import numpy as np
import pytest
import sentencepiece as spm

from posttrain_jax.data.pipeline import LMBatchIterator
from posttrain_jax.data.tasks import PYDOC_SPLITS, register_text_lm_task
from posttrain_jax.data.vocab import get_vocabulary


@pytest.fixture(scope="module")
def gemma_style_model(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gemma_tok")
  with open(PYDOC_SPLITS["train"]) as f:
    lines = [line for line in itertools.islice(f, 400) if line.strip()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(tmp / "tokenizer"),
      model_type="bpe", vocab_size=320, character_coverage=1.0,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3,  # Gemma's special ids
      pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      minloglevel=2)
  corpus = tmp / "docs.txt"
  corpus.write_text("".join(lines[:40]))
  return str(tmp / "tokenizer.model"), str(corpus)


def test_gemma_special_ids_and_round_trip(gemma_style_model):
  vocab = get_vocabulary(gemma_style_model[0])
  sp = vocab.tokenizer
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, sp.bos_id()) == (0, 1, 3, 2)
  assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  text = "Return a new list of the items in the dictionary."
  ids = vocab.encode(text)
  assert ids and min(ids) >= 4 and max(ids) < vocab.vocab_size
  assert vocab.decode(ids) == text


def test_task_batches_use_the_tokenizer(gemma_style_model):
  model_path, corpus = gemma_style_model
  vocab = get_vocabulary(model_path)
  register_text_lm_task("gemma_tokenizer_test", {"train": corpus}, vocab_path=model_path)
  batches = LMBatchIterator(task_name="gemma_tokenizer_test", split="train",
                            sequence_length=64, batch_size=2, shuffle=False, pack=False)
  batch = next(batches)
  targets = batch["decoder_target_tokens"]
  assert targets.shape == (2, 64) and targets.max() < vocab.vocab_size
  first = open(corpus).readline().strip()
  row = targets[0][targets[0] > 0].tolist()
  # seqio appends EOS (id 1) and pads with 0; it does not prepend BOS (id 2)
  assert row[0] != 2 and vocab.decode(row).startswith(first[:20])
  np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], targets[:, :-1])
