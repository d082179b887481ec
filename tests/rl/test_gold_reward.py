"""Gold reward: table, invariants, the optimum that "more words" overshoots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from posttrain_jax.rl import gold_reward as gr

SP = spm.SentencePieceProcessor(model_file=gr.VOCAB_PATH)
TABLE = gr.word_table()
WORDS = [i for i in range(len(TABLE)) if TABLE[i] == 1.0]
OTHERS = [i for i in range(gr.FIRST_TEXT_ID, len(TABLE)) if TABLE[i] == 0.0]


def score(rows, length=None):
  length = length or max(len(r) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return np.asarray(jax.jit(gr.gold_reward)(jnp.asarray(tokens), jnp.asarray(mask)))


def test_word_table_marks_whole_word_pieces():
  assert TABLE.shape == (SP.get_piece_size(),) and TABLE[:3].sum() == 0
  assert TABLE[SP.piece_to_id("\u2581example")] == 1.0
  assert TABLE[SP.piece_to_id("ur")] == 0.0


def test_range_empty_and_padding_invariance():
  rng = np.random.default_rng(0)
  rows = [list(rng.integers(3, 2048, size=n)) for n in (1, 5, 20, 40)]
  values = score(rows)
  assert np.all(values >= 0) and np.all(values < 1)
  np.testing.assert_allclose(score(rows, length=64), values, rtol=1e-6)  # more padding
  assert score([[1, 0, 0]])[0] == 0.0  # EOS only: no text
  # masked-out tokens (e.g. the prompt) do not count
  tokens = jnp.asarray([[WORDS[0], WORDS[1], OTHERS[0]]])
  with_prompt = gr.gold_reward(tokens, jnp.asarray([[0, 1, 1]]))
  np.testing.assert_allclose(with_prompt, score([[WORDS[1], OTHERS[0]]]), rtol=1e-6)


def test_closed_form_and_optimum():
  # 10 distinct tokens, 6 words: p = p* = 0.6, d = 1 -> n / (n + n0)
  row = WORDS[:6] + OTHERS[:4]
  np.testing.assert_allclose(score([row])[0], 10 / 18, rtol=1e-5)
  # the word fraction has an interior optimum: all words or no words score less
  fractions = [score([WORDS[:j] + OTHERS[:10 - j]])[0] for j in range(11)]
  assert int(np.argmax(fractions)) == 6
  assert fractions[10] < 0.1 * fractions[6] and fractions[0] < 0.01 * fractions[6]


def test_repetition_and_length():
  repeated = (WORDS[:3] + OTHERS[:2]) * 2  # p = 0.6, d = 0.5
  np.testing.assert_allclose(score([repeated])[0], 0.5 * 10 / 18, rtol=1e-5)
  # diminishing returns in length at the optimal fraction
  lengths = [score([WORDS[:3 * m] + OTHERS[:2 * m]])[0] for m in (1, 2, 4, 8)]
  assert np.all(np.diff(lengths) > 0) and np.all(np.diff(np.diff(lengths)) < 0)


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="same shape"):
    gr.gold_reward(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4)))
