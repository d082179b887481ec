"""Preference data: JSONL -> seqio task -> resumable pair batches."""

import json

import numpy as np
import pytest

from posttrain_jax.data import preferences as prefs


def make_records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": rng.integers(3, 100, size=rng.integers(1, 6)).tolist(),
             "chosen": rng.integers(3, 100, size=rng.integers(1, 8)).tolist(),
             "rejected": rng.integers(3, 100, size=rng.integers(1, 8)).tolist(),
             "index": i} for i in range(n)]


@pytest.fixture()
def task(tmp_path):
    records = make_records(24)
    prefs.write_preferences(str(tmp_path / "train.jsonl"), records)
    prefs.register_preference_task("test_prefs", {"train": str(tmp_path / "train.jsonl")})
    return records


def test_features_match_the_numpy_reference(task):
    it = prefs.PreferenceBatchIterator(task_name="test_prefs", split="train",
                                       sequence_length=8, batch_size=4, shuffle=False,
                                       num_epochs=1)
    batch = next(it)
    expected = prefs.pairs_to_batch(task[:4], 8)
    assert set(batch) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(batch[k], expected[k], err_msg=k)
    r = task[0]
    row = (r["prompt"] + r["chosen"])[-8:]
    assert batch["chosen_tokens"][0, :len(row)].tolist() == row
    assert batch["chosen_response_mask"][0].sum() == min(len(r["chosen"]), 8)
    assert batch["pair_weights"].tolist() == [1.0] * 4


def test_long_rows_keep_their_end():
    records = [{"prompt": list(range(3, 13)), "chosen": [50, 51, 52], "rejected": [60]}]
    b = prefs.pairs_to_batch(records, 6)
    assert b["chosen_tokens"][0].tolist() == [10, 11, 12, 50, 51, 52]
    assert b["chosen_response_mask"][0].tolist() == [0, 0, 0, 1, 1, 1]
    assert b["rejected_tokens"][0].tolist() == [8, 9, 10, 11, 12, 60]


def test_resume_and_data_order(task):
    def make(seed=0):
        return prefs.PreferenceBatchIterator(task_name="test_prefs", split="train",
                                             sequence_length=8, batch_size=4, seed=seed)
    full = make()
    batches = [next(full) for _ in range(5)]
    resumed = make()
    next(resumed)
    next(resumed)
    state = resumed.get_state()
    fresh = make()
    fresh.set_state(json.loads(json.dumps(state)))
    for expected in batches[2:]:
        np.testing.assert_array_equal(next(fresh)["chosen_tokens"], expected["chosen_tokens"])
    other = make(seed=1)
    assert not np.array_equal(next(other)["chosen_tokens"], batches[0]["chosen_tokens"])
    with pytest.raises(ValueError, match="'seed'"):
        other.set_state(state)


def test_eval_batches_pad_with_zero_weight(task):
    batches = prefs.preference_eval_batches(task_name="test_prefs", split="train",
                                            sequence_length=8, batch_size=10)
    assert len(batches) == 3
    assert batches[-1]["pair_weights"].tolist() == [1.0] * 4 + [0.0] * 6


def test_bad_files_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="No preference file"):
        prefs.register_preference_task("bad", {"train": str(tmp_path / "none.jsonl")})
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": [3], "chosen": [4]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['rejected'\]"):
        prefs.read_preferences(str(path))
    path.write_text('{"prompt": [3], "chosen": [], "rejected": [5]}\n')
    with pytest.raises(ValueError, match="'chosen' must be a non-empty list"):
        prefs.read_preferences(str(path))
    with pytest.raises(ValueError, match="No preference task 'missing'"):
        prefs.PreferenceBatchIterator(task_name="missing", split="train",
                                      sequence_length=8, batch_size=2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    prefs.register_preference_task("empty_prefs", {"train": str(empty)})
    for read in (lambda: prefs.PreferenceBatchIterator(
            task_name="empty_prefs", split="train", sequence_length=8, batch_size=2),
                 lambda: prefs.preference_eval_batches(
            task_name="empty_prefs", split="train", sequence_length=8, batch_size=2)):
        with pytest.raises(ValueError, match=r"empty.jsonl'\] of split 'train' hold no pairs"):
            read()


def test_label_noise_flips_exactly_the_requested_fraction():
    rng = np.random.default_rng(0)
    n = 200
    prompts = [[3, 4]] * n
    a = [[5 + i % 7] for i in range(n)]
    b = [[9, 10 + i % 5] for i in range(n)]
    ga, gb = rng.uniform(size=n), rng.uniform(size=n)
    ga[:10] = gb[:10]  # ties are dropped
    for noise in (0.0, 0.25, 0.5, 1.0):
        records, ties = prefs.label_pairs(prompts, a, b, ga, gb, label_noise=noise, seed=3)
        assert ties == 10 and len(records) == 190
        flipped = [r["flipped"] for r in records]
        assert sum(flipped) == round(noise * 190)
        for r in records:  # flipped <=> the labelled chosen has the lower gold reward
            assert (r["gold_chosen"] < r["gold_rejected"]) == r["flipped"]
    again, _ = prefs.label_pairs(prompts, a, b, ga, gb, label_noise=0.25, seed=3)
    other, _ = prefs.label_pairs(prompts, a, b, ga, gb, label_noise=0.25, seed=4)
    assert again == prefs.label_pairs(prompts, a, b, ga, gb, label_noise=0.25, seed=3)[0]
    assert [r["flipped"] for r in again] != [r["flipped"] for r in other]
    with pytest.raises(ValueError, match="label_noise"):
        prefs.flip_mask(10, 1.5, 0)
