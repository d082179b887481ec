"""SFT data: JSONL conversations -> Gemma chat format -> packed batches with role loss weights."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.core.losses import cross_entropy_sums
from posttrain_jax.data import chat, tasks
from posttrain_jax.data.sft_pipeline import SFTBatchIterator, sft_eval_batches
from posttrain_jax.data.vocab import get_vocabulary
from posttrain_jax.models import ModelConfig, Transformer

VOCAB = get_vocabulary()
ENC = VOCAB.encode
TWO_TURNS = [("system", "Be brief."), ("user", "Name a loop."),
             ("model", "A for loop."), ("user", "Another?"), ("model", "A while loop.")]
# The vocabulary's 2048 ids, small shapes; local window 8 and 64-position
# causal blocks, so packed rows go through the blocked attention paths.
MODEL = ModelConfig(vocab_size=2048, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=8, mlp_dim=32, sliding_window_size=8, causal_block_size=64)
LENGTH = 160


def write_jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                          for r in records))
  return str(path)


def messages(turns):
  return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_render_weights_the_model_turns_only():
  ids, weights = chat.render(TWO_TURNS, ENC, VOCAB.eos_id)
  # By hand: the system text opens the first user turn; each part encoded alone.
  parts = [("<start_of_turn>user\nBe brief.\n\nName a loop.<end_of_turn>\n", 0),
           ("<start_of_turn>model\n", 0), ("A for loop.<end_of_turn>\n", 1),
           ("<start_of_turn>user\nAnother?<end_of_turn>\n", 0),
           ("<start_of_turn>model\n", 0), ("A while loop.<end_of_turn>\n", 1)]
  expected_ids = [i for text, _ in parts for i in ENC(text)] + [VOCAB.eos_id]
  expected_w = [float(w) for text, w in parts for _ in ENC(text)] + [1.0]
  assert ids == expected_ids and weights == expected_w
  all_ids, all_w = chat.render(TWO_TURNS, ENC, VOCAB.eos_id, train_on_prompts=True)
  assert all_ids == ids and all_w == [1.0] * len(ids)
  prompt = chat.render_prompt(TWO_TURNS[:4], ENC)
  assert ids[:len(prompt)] == prompt and weights[len(prompt) - 1] == 0.0
  assert weights[len(prompt)] == 1.0  # the first token after the prompt is the model's


def test_prompt_response_lines_render_as_one_exchange(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [
      {"prompt": "Name a loop.", "response": "A for loop.", "id": 7},
      messages([("user", "Name a loop."), ("model", "A for loop.")])])
  first, second = chat.read_conversations(path)
  assert first.messages == second.messages and (first.line, second.line) == (1, 2)


@pytest.mark.parametrize("line, needle", [
    ({"text": "hello"}, 'no "messages" and no "prompt"/"response"'),
    ({"prompt": "only a prompt"}, 'no "messages" and no "prompt"/"response"'),
    (messages([("user", "hi"), ("assistant", "hello")]), "unknown role 'assistant'"),
    (messages([("user", "hi"), ("user", "hello")]), "do not alternate"),
    ("{not json", "not a JSON line"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, line, needle):
  path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, line])
  with pytest.raises(ValueError) as raised:
    chat.register_sft_task("test_sft_bad", {"train": path})
  text = str(raised.value)
  assert text.startswith(f"{path}:2: ") and needle in text and "\n" not in text


def _conversations(n, words=3):
  return [messages([("user", f"Question {i}?"), ("model", " ".join(["answer"] * words) + ".")])
          for i in range(n)]


def _register(tmp_path, records, name="test_sft", **kw):
  chat.register_sft_task(name, {"train": write_jsonl(tmp_path / f"{name}.jsonl", records)},
                         **kw)
  return name


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_overlong_conversations_are_dropped_or_cut_and_counted(tmp_path, overlong):
  records = _conversations(3) + [_conversations(1, words=60)[0]]
  name = _register(tmp_path, records, overlong=overlong)
  it = SFTBatchIterator(task_name=name, split="train", sequence_length=64, batch_size=1,
                        shuffle=False, num_epochs=1, pack=False)
  assert it.report.conversations == 4 and it.report.overlong == 1
  assert ("1 longer than sequence_length=64 " + {"drop": "dropped", "truncate": "truncated"}[
      overlong]) in it.summary
  rows = [b["decoder_segment_ids"][0].sum() for b in it]
  assert len(rows) == (3 if overlong == "drop" else 4)
  if overlong == "truncate":
    assert rows[-1] == 64


def test_overlong_error_policy_names_the_first_line(tmp_path):
  records = _conversations(2) + [_conversations(1, words=60)[0]]
  name = _register(tmp_path, records, overlong="error")
  with pytest.raises(ValueError) as raised:
    SFTBatchIterator(task_name=name, split="train", sequence_length=64, batch_size=1)
  text = str(raised.value)
  assert ".jsonl:3 (" in text and "1 of 3" in text and "\n" not in text


def _alone(conversation):
  ids, weights = chat.render(conversation, ENC, VOCAB.eos_id)
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


@functools.lru_cache(maxsize=None)
def _params():
  """Fan-in scaled numpy noise (no PRNG kernels to compile)."""
  rng = np.random.default_rng(0)
  shapes = nn.unbox(jax.eval_shape(Transformer(MODEL).init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 1), jnp.int32)))["params"]
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) / np.sqrt(x.shape[0])
                                 ).astype(np.float32), shapes)


@jax.jit
def _logits(params, tokens, positions, segment_ids):
  return Transformer(MODEL).apply({"params": params}, tokens, positions=positions,
                                  segment_ids=segment_ids)


def _alone_logits(inputs):
  """Logits of one sequence alone (right-padded to LENGTH: causal, so the
  padding changes none of its positions), [n, vocab]."""
  n = len(inputs)
  pad = lambda x: np.pad(x, (0, LENGTH - n))[None]
  return _logits(_params(), pad(inputs), pad(np.arange(n)), pad(np.ones(n, np.int32)))[0, :n]


def _one_row(tmp_path, convs):
  name = _register(tmp_path, [messages(c) for c in convs])
  return next(SFTBatchIterator(task_name=name, split="train", sequence_length=LENGTH,
                               batch_size=1, shuffle=False, num_epochs=1))


def test_a_packed_rows_logits_equal_each_conversation_alone(tmp_path):
  convs = [[("user", "Hi?"), ("model", "Yes.")], [("user", "Why?"), ("model", "Because.")],
           [("user", "Name one."), ("model", "The for loop.")]]
  batch = _one_row(tmp_path, convs)
  seg = batch["decoder_segment_ids"]
  assert seg.max() == 3  # all three packed into the one row
  packed = _logits(_params(), batch["decoder_input_tokens"], batch["decoder_positions"],
                   seg)[0]
  for s, conv in enumerate(convs, 1):
    where = np.flatnonzero(seg[0] == s)
    targets, weights = _alone(conv)
    np.testing.assert_array_equal(batch["decoder_target_tokens"][0, where], targets)
    np.testing.assert_array_equal(batch["decoder_loss_weights"][0, where], weights)
    inputs = np.concatenate([[0], targets[:-1]])  # the shift restarts in every segment
    np.testing.assert_array_equal(batch["decoder_input_tokens"][0, where], inputs)
    np.testing.assert_array_equal(batch["decoder_positions"][0, where], np.arange(len(where)))
    assert len(inputs) > 2 * MODEL.sliding_window_size  # the local window is exercised
    np.testing.assert_allclose(packed[where], _alone_logits(inputs), atol=2e-5, rtol=1e-5)


def test_response_only_loss_equals_a_hand_computation(tmp_path):
  conv = TWO_TURNS[1:]
  batch = _one_row(tmp_path, [conv])
  logits = _logits(_params(), batch["decoder_input_tokens"], batch["decoder_positions"],
                   batch["decoder_segment_ids"])
  sums = cross_entropy_sums(logits, batch["decoder_target_tokens"],
                            batch["decoder_loss_weights"])
  loss = float(sums["cross_entropy"] / sums["weight"])
  # By hand: the model's two replies (each with its <end_of_turn>) and the EOS.
  targets, _ = _alone(conv)
  size = lambda text: len(ENC(text))
  first = size("<start_of_turn>user\nName a loop.<end_of_turn>\n") + size(
      "<start_of_turn>model\n")
  reply1 = size("A for loop.<end_of_turn>\n")
  second = first + reply1 + size("<start_of_turn>user\nAnother?<end_of_turn>\n") + size(
      "<start_of_turn>model\n")
  reply2 = size("A while loop.<end_of_turn>\n")
  scored = list(range(first, first + reply1)) + list(range(second, second + reply2 + 1))
  assert second + reply2 + 1 == len(targets)
  alone = np.asarray(_alone_logits(np.concatenate([[0], targets[:-1]])), np.float64)
  top = alone.max(-1, keepdims=True)
  logp = alone - top - np.log(np.exp(alone - top).sum(-1, keepdims=True))
  hand = -np.mean([logp[i, targets[i]] for i in scored])
  assert float(sums["weight"]) == len(scored)
  np.testing.assert_allclose(loss, hand, rtol=1e-5)


def test_resume_continues_the_batches(tmp_path):
  name = _register(tmp_path, _conversations(40))
  make = lambda: SFTBatchIterator(task_name=name, split="train", sequence_length=64,
                                  batch_size=2, seed=5)
  full = make()
  batches = [next(full) for _ in range(4)]
  it = make()
  next(it)
  next(it)
  state = it.get_state()
  full.set_state(state)  # the job restores into a fresh iterator the same way
  for b in batches[2:]:
    got = next(full)
    for k in b:
      np.testing.assert_array_equal(got[k], b[k], err_msg=k)
  with pytest.raises(ValueError, match="'seed': saved=6, current=5"):
    it.set_state(dict(state, seed=6))


def test_the_shipped_instruction_set_is_valid_and_fits_256_tokens():
  for split, path in tasks.PYDOC_SFT_SPLITS.items():
    conversations = chat.read_conversations(path)
    assert len(conversations) >= (2000 if split == "train" else 100)
    report = chat.length_report(tasks.PYDOC_SFT_TASK, split, 256)
    assert report.overlong == 0 and report.conversations == len(conversations)
  kinds = {len(c.messages) for c in chat.read_conversations(tasks.PYDOC_SFT_SPLITS["train"])}
  assert kinds == {2, 4, 5}  # one exchange, two, two behind a system message
  batches = sft_eval_batches(task_name=tasks.PYDOC_SFT_TASK, split="validation",
                             sequence_length=256, batch_size=8)
  assert sum(int(b["decoder_segment_ids"].max(axis=1).sum()) for b in batches) == 100
