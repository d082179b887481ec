"""LMBatchIterator / eval_batches: layout, packing, determinism, resume, errors."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio

from posttrain_jax.data import prompts as _prompts  # noqa: F401  (registers "pydoc_prompts")
from posttrain_jax.data.pipeline import (MODEL_FEATURE_KEYS, LMBatchIterator, build_dataset,
                                        eval_batches)
from posttrain_jax.data.tasks import register_text_lm_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = dict(task_name="pydoc_lm", split="train", sequence_length=64, batch_size=4, seed=7)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _digest(batches):
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def fresh_batches():
    """Batches 0..5 of a fresh shuffled, packed train iterator."""
    return _take(LMBatchIterator(**CFG), 6)


@pytest.fixture
def temp_task(tmp_path):
    """Factory registering a throwaway task over given file contents."""
    names = []

    def make(name, splits):
        mapping = {}
        for split, content in splits.items():
            if content is None:  # a pattern matching no file
                mapping[split] = str(tmp_path / f"{split}_missing_*.txt")
            else:
                (tmp_path / f"{split}.txt").write_text(content)
                mapping[split] = str(tmp_path / f"{split}.txt")
        register_text_lm_task(name, mapping)
        names.append(name)
        return mapping

    yield make
    for name in names:
        seqio.TaskRegistry.remove(name)


@pytest.mark.parametrize("pack", [True, False])
def test_keys_shapes_dtypes(pack):
    batch = next(LMBatchIterator(**dict(CFG, pack=pack, shuffle=False)))
    assert sorted(batch) == sorted(MODEL_FEATURE_KEYS)
    for k, v in batch.items():
        assert v.shape == (4, 64), k
        assert v.dtype == (np.float32 if k == "decoder_loss_weights" else np.int32), k
    if not pack:
        t = batch["decoder_target_tokens"]
        np.testing.assert_array_equal(batch["decoder_segment_ids"], (t != 0).astype(np.int32))
        np.testing.assert_array_equal(batch["decoder_positions"][1], np.arange(64))


def test_packing_layout():
    it = LMBatchIterator(**dict(CFG, sequence_length=128, batch_size=8))
    multi_segment_rows = 0
    for batch in _take(it, 4):
        tgt, inp = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
        seg, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
        w = batch["decoder_loss_weights"]
        np.testing.assert_array_equal(w, (tgt != 0).astype(np.float32))
        for r in range(tgt.shape[0]):
            real = seg[r] > 0
            n = int(real.sum())
            assert real[:n].all() and not real[n:].any()  # padding only at the end
            s = seg[r, :n]
            assert s[0] == 1 and np.all(np.diff(s) >= 0) and np.all(np.diff(s) <= 1)
            starts = np.concatenate([[True], np.diff(s) == 1])
            assert np.all(pos[r, :n][starts] == 0)
            assert np.all(pos[r, 1:n][~starts[1:]] == pos[r, :n - 1][~starts[1:]] + 1)
            # inputs are targets shifted right within each segment
            assert np.all(inp[r, :n][starts] == 0)
            assert np.all(inp[r, 1:n][~starts[1:]] == tgt[r, :n - 1][~starts[1:]])
            assert np.all(tgt[r, n:] == 0)
            multi_segment_rows += int(s[-1] > 1)
    assert multi_segment_rows > 0, "expected some rows to pack several examples"


def test_determinism_two_fresh_iterators(fresh_batches):
    _assert_batches_equal(_take(LMBatchIterator(**CFG), 4), fresh_batches[:4])
    other_seed = next(LMBatchIterator(**dict(CFG, seed=8)))
    assert not np.array_equal(other_seed["decoder_target_tokens"],
                              fresh_batches[0]["decoder_target_tokens"])


def test_determinism_across_processes(fresh_batches):
    code = (
        "import json, sys; from posttrain_jax.data.pipeline import LMBatchIterator; "
        "it = LMBatchIterator(**json.loads(sys.argv[1])); "
        "print(json.dumps({k: v.tolist() for k, v in next(it).items()}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(CFG)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    other = json.loads(out.strip().splitlines()[-1])
    batch = {k: np.asarray(v, dtype=fresh_batches[0][k].dtype) for k, v in other.items()}
    assert _digest([batch]) == _digest(fresh_batches[:1])


def test_resume_with_start_batch(fresh_batches):
    _assert_batches_equal(_take(LMBatchIterator(**CFG, start_batch=3), 3), fresh_batches[3:6])


def test_resume_with_set_state(fresh_batches):
    it = LMBatchIterator(**CFG)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    assert state["batches_consumed"] == 3
    restored = LMBatchIterator(**CFG)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 3), fresh_batches[3:6])
    it.set_state(state)  # same iterator, rewound/re-created in place
    _assert_batches_equal(_take(it, 1), fresh_batches[3:4])


def test_set_state_rejects_other_seed():
    it = LMBatchIterator(**dict(CFG, shuffle=False))
    state = dict(it.get_state(), seed=99)
    with pytest.raises(ValueError, match=r"'seed'.*saved=99.*current=7"):
        it.set_state(state)


def test_sharding_gives_disjoint_shaped_batches():
    shards = [next(LMBatchIterator(**dict(CFG, shuffle=False), shard_index=i, num_shards=2))
              for i in range(2)]
    for b in shards:
        assert all(v.shape == (4, 64) for v in b.values())
    assert not np.array_equal(shards[0]["decoder_target_tokens"],
                              shards[1]["decoder_target_tokens"])


def test_empty_file_raises_clear_error(temp_task):
    paths = temp_task("tmp_empty_lm", {"train": "", "blank": "\n  \n"})
    for split in ("train", "blank"):
        it = LMBatchIterator(task_name="tmp_empty_lm", split=split, sequence_length=16,
                             batch_size=2)
        with pytest.raises(ValueError, match="empty") as err:
            next(it)
        msg = str(err.value)
        assert "tmp_empty_lm" in msg and repr(split) in msg and paths[split] in msg
        assert "Fix" in msg
    with pytest.raises(ValueError, match="tmp_empty_lm"):
        eval_batches(task_name="tmp_empty_lm", split="train", sequence_length=16, batch_size=2)


def test_missing_file_pattern_raises_at_construction(temp_task):
    paths = temp_task("tmp_missing_lm", {"train": None})
    with pytest.raises(ValueError, match="No input file") as err:
        LMBatchIterator(task_name="tmp_missing_lm", split="train", sequence_length=16,
                        batch_size=2)
    assert paths["train"] in str(err.value) and "'train'" in str(err.value)


def test_finite_set_smaller_than_batch(temp_task):
    temp_task("tmp_small_lm", {"validation": "one line\nanother line\n"})
    kw = dict(task_name="tmp_small_lm", split="validation", sequence_length=8, batch_size=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(LMBatchIterator(**kw, num_epochs=1, pack=False))
    # repeating fills the batch; eval pads it instead of failing
    assert next(LMBatchIterator(**kw))["decoder_target_tokens"].shape == (4, 8)
    (batch,) = eval_batches(**kw, pack=False)
    assert batch["decoder_target_tokens"].shape == (4, 8)
    np.testing.assert_array_equal(batch["decoder_loss_weights"].sum(1) > 0,
                                  [True, True, False, False])


def test_finite_iterator_ends_with_stop_iteration():
    kw = dict(task_name="pydoc_lm", split="validation", sequence_length=64, batch_size=16,
              shuffle=False, num_epochs=1, pack=False)
    batches = list(LMBatchIterator(**kw))
    assert len(batches) == _num_validation_chunks(64) // 16  # remainder dropped


def _num_validation_chunks(length):
    """Examples of the validation split: lines, with long ones split into chunks."""
    n = sum(1 for _ in build_dataset(task_name="pydoc_lm", split="validation",
                                     sequence_length=length, shuffle=False, seed=0,
                                     num_epochs=1, pack=False))
    assert n > 103  # more chunks than the 103 validation lines
    return n


def test_eval_batches_cover_everything_deterministically():
    kw = dict(task_name="pydoc_lm", split="validation", sequence_length=64, batch_size=16,
              pack=False)
    batches = eval_batches(**kw)
    n = _num_validation_chunks(64)
    assert len(batches) == -(-n // 16)
    rows = sum(int((b["decoder_loss_weights"].sum(1) > 0).sum()) for b in batches)
    assert rows == n
    assert all(v.shape == (16, 64) for b in batches for v in b.values())
    _assert_batches_equal(eval_batches(**kw, max_batches=2), batches[:2])


# Prefix-LM tasks ("inputs" prompt + "targets" response): pydoc_prompts splits each
# document into a prefix (inputs) and the rest + EOS (targets).
PREFIX = dict(task_name="pydoc_prompts", split="validation", sequence_length=40,
              inputs_length=12, batch_size=4, shuffle=False, num_epochs=1)


def _prompt_task_examples(inputs_length, targets_length):
    ds = seqio.get_mixture_or_task("pydoc_prompts").get_dataset(
        None, split="validation", shuffle=False)
    return [(ex["inputs"][:inputs_length].tolist(), ex["targets"][:targets_length].tolist())
            for ex in ds.take(8).as_numpy_iterator()]


def test_prefix_lm_unpacked_weights_only_the_response():
    batches = _take(LMBatchIterator(**PREFIX, pack=False), 2)
    expected = _prompt_task_examples(12, 28)
    for r, (inputs, targets) in enumerate(expected):
        b = batches[r // 4]
        row = r % 4
        tgt, inp = b["decoder_target_tokens"][row], b["decoder_input_tokens"][row]
        w = b["decoder_loss_weights"][row]
        n_i, n = len(inputs), len(inputs) + len(targets)
        np.testing.assert_array_equal(tgt[:n], inputs + targets)
        assert not tgt[n:].any()
        np.testing.assert_array_equal(w, np.r_[np.zeros(n_i), np.ones(len(targets)),
                                               np.zeros(40 - n)])
        np.testing.assert_array_equal(inp, np.r_[0, tgt[:-1]])  # shifted right by one
        np.testing.assert_array_equal(b["decoder_segment_ids"][row], (tgt != 0).astype(int))
        np.testing.assert_array_equal(b["decoder_positions"][row], np.arange(40))
    assert sorted(batches[0]) == sorted(MODEL_FEATURE_KEYS)  # no decoder_causal_attention


def test_prefix_lm_packed_segments_keep_prompt_and_response():
    (batch,) = eval_batches(**{k: v for k, v in PREFIX.items()
                               if k not in ("shuffle", "num_epochs")},
                            pack=True, max_batches=1)
    assert sorted(batch) == sorted(MODEL_FEATURE_KEYS)
    expected = _prompt_task_examples(12, 28)
    seen = []
    for r in range(4):
        seg, pos = batch["decoder_segment_ids"][r], batch["decoder_positions"][r]
        tgt, inp = batch["decoder_target_tokens"][r], batch["decoder_input_tokens"][r]
        w = batch["decoder_loss_weights"][r]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
            assert inp[idx[0]] == 0
            np.testing.assert_array_equal(inp[idx[1:]], tgt[idx[:-1]])
            seen.append((tgt[idx].tolist(), w[idx].tolist()))
    for inputs, targets in expected[:len(seen)]:
        assert (inputs + targets, [0.0] * len(inputs) + [1.0] * len(targets)) in seen


def test_prefix_lm_needs_inputs_length_and_plain_lm_rejects_it():
    kw = {k: v for k, v in PREFIX.items() if k != "inputs_length"}
    with pytest.raises(ValueError, match="prefix-LM.*needs inputs_length.*Fix"):
        LMBatchIterator(**kw)
    with pytest.raises(ValueError, match="inputs_length must be in"):
        LMBatchIterator(**dict(kw, inputs_length=40))
    with pytest.raises(ValueError, match="no \"inputs\" feature.*drop inputs_length"):
        LMBatchIterator(**dict(CFG, inputs_length=8))


def test_prefix_lm_resume_and_old_states():
    kw = dict(PREFIX, num_epochs=None, shuffle=True)
    fresh = _take(LMBatchIterator(**kw), 3)
    it = LMBatchIterator(**kw)
    _take(it, 2)
    restored = LMBatchIterator(**kw)
    restored.set_state(json.loads(json.dumps(it.get_state())))
    _assert_batches_equal(_take(restored, 1), fresh[2:3])
    # states saved before inputs_length existed still restore plain-LM iterators
    plain = LMBatchIterator(**dict(CFG, shuffle=False))
    old_state = {k: v for k, v in plain.get_state().items() if k != "inputs_length"}
    plain.set_state(old_state)
