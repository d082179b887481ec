"""Prompt tasks, PromptIterator and load_prompts."""

import json

import numpy as np
import pytest
import seqio

from posttrain_jax.data import prompts as prompts_lib
from posttrain_jax.data.prompts import PromptIterator, load_prompts, register_prompt_task

CFG = dict(task_name="pydoc_prompts", split="train", prompt_length=24, batch_size=4, seed=3)


def _documents(split):
  """Token ids of each document, tokenized as the seqio tasks do (the TF SentencePiece
  op can segment runs like '*****' differently from the Python library)."""
  ds = seqio.get_mixture_or_task("pydoc_lm").get_dataset(None, split=split, shuffle=False)
  return [ex["targets"][:-1].tolist() for ex in ds.as_numpy_iterator()]  # drop EOS


def _unpad(batch):
  return [row[len(row) - n:].tolist() for row, n in zip(batch["prompts"], batch["prompt_lengths"])]


def test_batches_are_left_padded_prefixes_of_documents():
  docs = {tuple(d) for d in _documents("train")}
  prefixes = {tuple(d[:k]) for d in docs for k in range(1, 25)}
  it = PromptIterator(**CFG)
  for _ in range(3):
    batch = next(it)
    assert batch["prompts"].shape == (4, 24) and batch["prompts"].dtype == np.int32
    assert batch["prompt_lengths"].shape == (4,) and batch["prompt_lengths"].dtype == np.int32
    lengths = batch["prompt_lengths"]
    assert np.all(lengths >= 1) and np.all(lengths <= 24)
    pad = np.arange(24)[None, :] < (24 - lengths)[:, None]
    assert not batch["prompts"][pad].any()  # zeros on the left ...
    assert np.all(batch["prompts"][~pad] != 0)  # ... and only there
    for p in _unpad(batch):
      assert tuple(p) in prefixes


def test_prompt_rule_matches_the_documents():
  """First min(64, n // 2) tokens of each document with n >= 16, in file order."""
  docs = [d for d in _documents("validation") if len(d) >= prompts_lib.MIN_DOCUMENT_TOKENS]
  expected = [d[:min(64, len(d) // 2)] for d in docs]
  got = load_prompts(task_name="pydoc_prompts", split="validation", prompt_length=64,
                     num_prompts=len(docs))
  assert got == expected
  short = load_prompts(task_name="pydoc_prompts", split="validation", prompt_length=8,
                       num_prompts=5)
  assert short == [e[:8] for e in expected[:5]]  # truncation keeps the first tokens
  with pytest.raises(ValueError, match=f"only {len(docs)} prompts.*num_prompts=200"):
    load_prompts(task_name="pydoc_prompts", split="validation", prompt_length=8,
                 num_prompts=200)


def test_resume_gives_the_same_next_batch():
  fresh = [next(it) for it in [PromptIterator(**CFG)] for _ in range(4)]
  it = PromptIterator(**CFG)
  next(it), next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["batches_consumed"] == 2
  restored = PromptIterator(**CFG)
  restored.set_state(state)
  for want in fresh[2:]:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  np.testing.assert_array_equal(next(PromptIterator(**CFG, start_batch=3))["prompts"],
                                fresh[3]["prompts"])
  assert not np.array_equal(next(PromptIterator(**dict(CFG, seed=4)))["prompts"],
                            fresh[0]["prompts"])
  with pytest.raises(ValueError, match=r"'prompt_length'.*saved=24.*current=16"):
    PromptIterator(**dict(CFG, prompt_length=16)).set_state(state)


def test_shards_differ():
  a, b = (next(PromptIterator(**dict(CFG, shuffle=False), shard_index=i, num_shards=2))
          for i in range(2))
  assert not np.array_equal(a["prompts"], b["prompts"])


def test_empty_and_wrong_tasks_give_clear_errors(tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("too short\n\nalso short\n")
  register_prompt_task("tmp_short_prompts", {"train": str(short)})
  try:
    with pytest.raises(ValueError, match="prompt dataset is empty.*tmp_short_prompts.*Fix"):
      next(PromptIterator(task_name="tmp_short_prompts", split="train", prompt_length=8,
                          batch_size=2))
    with pytest.raises(ValueError, match="only 0 prompts"):
      load_prompts(task_name="tmp_short_prompts", split="train", prompt_length=8,
                   num_prompts=1)
  finally:
    seqio.TaskRegistry.remove("tmp_short_prompts")
  with pytest.raises(ValueError, match="no \"inputs\" \\(prompt\\) feature"):
    PromptIterator(task_name="pydoc_lm", split="train", prompt_length=8, batch_size=2)
  with pytest.raises(ValueError, match="no split 'test'"):
    PromptIterator(task_name="pydoc_prompts", split="test", prompt_length=8, batch_size=2)
