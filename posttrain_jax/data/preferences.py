"""Preference data: (prompt, chosen, rejected) token-id triples for reward models.

File format: JSON lines, one pair per line,

    {"prompt": [ids], "chosen": [ids], "rejected": [ids], ...}

(token ids of the shipped SentencePiece vocabulary or the model's; other
fields, e.g. "flipped", "gold_chosen", "gold_rejected" written by
tools/label_preferences.py, are kept in the file and ignored by training).

``register_preference_task(name, {split: files})`` registers a seqio Task over
such files (a ``seqio.FunctionDataSource``; features "prompt", "chosen",
"rejected", int32). ``PreferenceBatchIterator`` turns it into resumable numpy
batches for the reward trainer: for side in ("chosen", "rejected"),

    {side}_tokens        int32 [B, L]  prompt + response, right-padded with 0
    {side}_positions     int32 [B, L]  0, 1, ... on real tokens, 0 on padding
    {side}_segment_ids   int32 [B, L]  1 on real tokens, 0 on padding
    {side}_response_mask int32 [B, L]  1 on the response's tokens
    pair_weights         float32 [B]   1 for real pairs, 0 for eval padding

A row longer than L keeps its last L tokens (the prompt's start is cut, the
response and its end, where the reward model reads its score, are kept).

``label_pairs`` turns two gold-scored responses per prompt into records
(higher gold = chosen, ties dropped, exactly round(label_noise * pairs) labels
flipped at seeded positions; tools/label_preferences.py).

``read_preferences`` / ``write_preferences`` / ``label_pairs`` import no TensorFlow (tools that
only score pairs use them); seqio/TF load when a task or iterator is built.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

SIDES = ("chosen", "rejected")
FIELDS = ("prompt",) + SIDES
FEATURE_SUFFIXES = ("tokens", "positions", "segment_ids", "response_mask")
STATE_CONFIG_FIELDS = ("task_name", "split", "seed", "sequence_length", "batch_size",
                       "shuffle", "num_epochs", "shard_index", "num_shards")

FilePattern = Union[str, Iterable[str]]


def _files(pattern: FilePattern) -> list[str]:
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    found = []
    for p in patterns:
        matches = sorted(glob.glob(os.fspath(p)))
        if not matches:
            raise FileNotFoundError(f"No preference file matches {os.fspath(p)!r}. Fix: "
                                    "write one with tools/label_preferences.py or point "
                                    "the split at an existing JSONL file.")
        found += matches
    return found


def _check_ids(path: str, line: int, field: str, value: Any) -> list[int]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(t, int) and t >= 0 for t in value)):
        raise ValueError(f"{path}:{line}: field {field!r} must be a non-empty list of "
                         f"non-negative token ids, got {str(value)[:60]}.")
    return value


def read_preferences(pattern: FilePattern) -> list[dict[str, Any]]:
    """All records of JSONL preference files (validated: prompt/chosen/rejected ids)."""
    records = []
    for path in _files(pattern):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg}).") from e
                missing = [k for k in FIELDS if k not in record]
                if missing:
                    raise ValueError(f"{path}:{n}: missing field(s) {missing}; each line "
                                     "needs \"prompt\", \"chosen\" and \"rejected\" token ids.")
                for k in FIELDS:
                    _check_ids(path, n, k, record[k])
                records.append(record)
    return records


def write_preferences(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(dict(record)) + "\n")


def _dataset_fn(split_to_files: Mapping[str, FilePattern], split: str,
                shuffle_files: bool, seed: int | None = None):
    from posttrain_jax.data._tf import tf
    del shuffle_files, seed  # examples are shuffled by seqio (seed-deterministic)
    records = read_preferences(split_to_files[split])
    if not records:
        raise ValueError(f"The preference file(s) {_files(split_to_files[split])} of split "
                         f"{split!r} hold no pairs. Fix: write pairs with "
                         "tools/label_preferences.py or point the split at another file.")
    return tf.data.Dataset.from_tensor_slices({
        k: tf.ragged.constant([r[k] for r in records], dtype=tf.int32) for k in FIELDS})


def register_preference_task(name: str, split_to_files: Mapping[str, FilePattern]):
    """Registers (or replaces) a seqio Task over JSONL preference files; returns it."""
    from posttrain_jax.data._tf import tf
    from posttrain_jax.data.vocab import get_vocabulary
    import seqio
    splits = {k: (os.fspath(v) if isinstance(v, (str, os.PathLike))
                  else [os.fspath(p) for p in v]) for k, v in split_to_files.items()}
    for split, pattern in splits.items():
        _files(pattern)  # fail now, naming the missing file
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    vocab = get_vocabulary()
    feature = seqio.Feature(vocabulary=vocab, add_eos=False, dtype=tf.int32)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(functools.partial(_dataset_fn, splits),
                                        splits=list(splits)),
        preprocessors=[],
        output_features={k: feature for k in FIELDS},
        metric_fns=[])


def _row(prompt, response, length: int):
    """prompt + response -> the four fixed-length features (last `length` tokens)."""
    from posttrain_jax.data._tf import tf
    seq = tf.concat([prompt, response], 0)[-length:]
    n = tf.shape(seq)[0]
    pad = [[0, length - n]]
    segment_ids = tf.pad(tf.ones([n], tf.int32), pad)
    positions = tf.range(length, dtype=tf.int32) * segment_ids
    start = n - tf.minimum(tf.shape(response)[0], n)
    response_mask = tf.cast((positions >= start), tf.int32) * segment_ids
    return tf.pad(seq, pad), positions, segment_ids, response_mask


def _to_pair_features(length: int):
    from posttrain_jax.data._tf import tf

    def fn(ex):
        out = {"pair_weights": tf.constant(1.0, tf.float32)}
        for side in SIDES:
            values = _row(tf.cast(ex["prompt"], tf.int32), tf.cast(ex[side], tf.int32), length)
            for suffix, v in zip(FEATURE_SUFFIXES, values):
                out[f"{side}_{suffix}"] = tf.ensure_shape(v, [length])
        return out
    return fn


def _validate(task_name: str, split: str, sequence_length: int, batch_size: int,
              num_epochs: int | None, shard_index: int, num_shards: int):
    import seqio
    if sequence_length <= 0 or batch_size <= 0:
        raise ValueError(f"sequence_length and batch_size must be positive, got "
                         f"{sequence_length} and {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
    if task_name not in seqio.TaskRegistry.names():
        raise ValueError(f"No preference task {task_name!r} is registered. Fix: call "
                         "register_preference_task(name, {split: files}) (reward training "
                         "does it from its data_files argument).")
    task = seqio.get_mixture_or_task(task_name)
    if split not in task.splits:
        raise ValueError(f"task {task_name!r} has no split {split!r}; "
                         f"available: {sorted(task.splits)}")
    return task


def build_pair_dataset(*, task_name: str, split: str, sequence_length: int, shuffle: bool,
                       seed: int, num_epochs: int | None, shard_index: int = 0,
                       num_shards: int = 1):
    """Unbatched, deterministic tf.data pipeline of pair features."""
    from posttrain_jax.data._tf import tf
    import seqio
    task = _validate(task_name, split, sequence_length, 1, num_epochs, shard_index, num_shards)
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                          shard_info=seqio.ShardInfo(shard_index, num_shards),
                          num_epochs=num_epochs, use_cached=False)
    ds = ds.map(_to_pair_features(sequence_length), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


class PreferenceBatchIterator:
    """Resumable iterator of pair batches (see the module docstring for the keys).

    ``num_epochs=None`` repeats forever; batches are full (drop_remainder).
    ``get_state``/``set_state`` record and restore the number of batches
    consumed (resuming rebuilds the pipeline and skips them), like
    pipeline.LMBatchIterator. The shuffle ``seed`` sets the data order.
    """

    def __init__(self, *, task_name: str, split: str, sequence_length: int, batch_size: int,
                 shuffle: bool = True, seed: int = 0, num_epochs: int | None = None,
                 shard_index: int = 0, num_shards: int = 1, start_batch: int = 0):
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self._config = dict(
            task_name=task_name, split=split, seed=int(seed),
            sequence_length=int(sequence_length), batch_size=int(batch_size),
            shuffle=bool(shuffle), num_epochs=None if num_epochs is None else int(num_epochs),
            shard_index=int(shard_index), num_shards=int(num_shards))
        _validate(task_name, split, sequence_length, batch_size, num_epochs, shard_index,
                  num_shards)
        self._batches_consumed = int(start_batch)
        self._reset()

    def _reset(self) -> None:
        from posttrain_jax.data._tf import tf
        c = self._config
        ds = build_pair_dataset(task_name=c["task_name"], split=c["split"],
                                sequence_length=c["sequence_length"], shuffle=c["shuffle"],
                                seed=c["seed"], num_epochs=c["num_epochs"],
                                shard_index=c["shard_index"], num_shards=c["num_shards"])
        ds = ds.batch(c["batch_size"], drop_remainder=True).skip(self._batches_consumed)
        self._iterator = ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

    @property
    def batches_consumed(self) -> int:
        return self._batches_consumed

    def __iter__(self) -> "PreferenceBatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self._config["num_epochs"] is None or self._batches_consumed == 0:
                raise ValueError(
                    f"The preference data (task {self._config['task_name']!r}, split "
                    f"{self._config['split']!r}) has fewer pairs than one batch of "
                    f"{self._config['batch_size']}. Fix: lower batch_size or add pairs.") from None
            raise
        self._batches_consumed += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return dict(self._config, batches_consumed=self._batches_consumed)

    def set_state(self, state: dict[str, Any]) -> None:
        diffs = [f"{k!r}: saved={state.get(k, '<missing>')!r}, current={self._config[k]!r}"
                 for k in STATE_CONFIG_FIELDS if state.get(k, object()) != self._config[k]]
        if diffs:
            raise ValueError("Preference iterator state does not match this iterator's "
                             "config; differing fields: " + "; ".join(diffs))
        self._batches_consumed = int(state["batches_consumed"])
        self._reset()


def preference_eval_batches(*, task_name: str, split: str, sequence_length: int,
                            batch_size: int, max_batches: int | None = None,
                            shard_index: int = 0, num_shards: int = 1
                            ) -> list[dict[str, np.ndarray]]:
    """One unshuffled pass; the last batch is padded with pairs of weight 0."""
    from posttrain_jax.data._tf import tf
    ds = build_pair_dataset(task_name=task_name, split=split, sequence_length=sequence_length,
                            shuffle=False, seed=0, num_epochs=1, shard_index=shard_index,
                            num_shards=num_shards).batch(batch_size)
    if max_batches is not None:
        ds = ds.take(max_batches)
    out = []
    for b in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        n = b["pair_weights"].shape[0]
        if n < batch_size:
            b = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
                 for k, v in b.items()}
        out.append(b)
    if not out:
        raise ValueError(f"The preference data (task {task_name!r}, split {split!r}) is empty.")
    return out


def pairs_to_batch(records: Sequence[Mapping[str, Any]], sequence_length: int
                   ) -> dict[str, np.ndarray]:
    """The iterator's features for in-memory records, in numpy (no TF)."""
    out = {f"{s}_{k}": np.zeros((len(records), sequence_length), np.int32)
           for s in SIDES for k in FEATURE_SUFFIXES}
    out["pair_weights"] = np.ones((len(records),), np.float32)
    for i, r in enumerate(records):
        for side in SIDES:
            seq = (list(r["prompt"]) + list(r[side]))[-sequence_length:]
            n = len(seq)
            out[f"{side}_tokens"][i, :n] = seq
            out[f"{side}_positions"][i, :n] = np.arange(n)
            out[f"{side}_segment_ids"][i, :n] = 1
            out[f"{side}_response_mask"][i, max(0, n - len(r[side])):n] = 1
    return out


def flip_mask(num_pairs: int, fraction: float, seed: int) -> np.ndarray:
    """Exactly round(fraction * num_pairs) True entries at seeded random positions."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {fraction}.")
    mask = np.zeros((num_pairs,), bool)
    count = int(round(fraction * num_pairs))
    mask[np.random.default_rng(seed).permutation(num_pairs)[:count]] = True
    return mask


def label_pairs(prompts: Sequence[Sequence[int]], responses_a: Sequence[Sequence[int]],
                responses_b: Sequence[Sequence[int]], gold_a: Sequence[float],
                gold_b: Sequence[float], *, label_noise: float = 0.0, seed: int = 0
                ) -> tuple[list[dict[str, Any]], int]:
    """Preference records labelled by a gold reward, with a fraction of flipped labels.

    chosen is the response with the higher gold reward; pairs with equal gold
    rewards or an empty response are dropped (returned: how many). Then
    exactly round(label_noise * kept) labels are swapped at seeded positions
    (``flip_mask``); each record keeps "flipped", "gold_chosen" and
    "gold_rejected" (of its labelled chosen/rejected side).
    """
    kept = []
    for p, a, b, ga, gb in zip(prompts, responses_a, responses_b, gold_a, gold_b):
        if float(ga) == float(gb) or not len(a) or not len(b):
            continue
        chosen, rejected = ((a, ga), (b, gb)) if ga > gb else ((b, gb), (a, ga))
        kept.append((list(map(int, p)), chosen, rejected))
    flips = flip_mask(len(kept), label_noise, seed)
    records = []
    for (p, chosen, rejected), flip in zip(kept, flips):
        if flip:
            chosen, rejected = rejected, chosen
        records.append({"prompt": p, "chosen": list(map(int, chosen[0])),
                        "rejected": list(map(int, rejected[0])), "flipped": bool(flip),
                        "gold_chosen": float(chosen[1]), "gold_rejected": float(rejected[1])})
    return records, len(prompts) - len(kept)
