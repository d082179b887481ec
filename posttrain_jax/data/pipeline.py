"""LM input pipeline (t5x conventions): seqio task -> DecoderFeatureConverter -> numpy batches.

Every batch is a dict with exactly the keys in ``MODEL_FEATURE_KEYS``, each of
shape ``[batch_size, sequence_length]``. Token, segment-id and position arrays
are int32; ``decoder_loss_weights`` is float32 (1.0 on real target tokens, 0.0
on padding). Segment ids are 1, 2, ... per packed example and 0 on padding;
positions restart at 0 for every segment.

Tasks with an ``"inputs"`` feature (prompt) and ``"targets"`` (response) are
prefix-LM: the converter concatenates inputs + targets into one decoder
sequence of ``sequence_length`` tokens, the prompt part trimmed to
``inputs_length`` and the response to ``sequence_length - inputs_length``;
loss weights are 1 on response tokens only. Attention stays causal everywhere
(the converter's ``decoder_causal_attention`` is dropped).

``batch_size`` is the per-process batch: with several hosts give each one
``shard_index=jax.process_index(), num_shards=jax.process_count()``.
Determinism: same config => same batches, in any process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from posttrain_jax.data import tasks as _tasks  # registers "pydoc_lm"
from posttrain_jax.data._tf import tf
import seqio

MODEL_FEATURE_KEYS = (
    "decoder_target_tokens",
    "decoder_input_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)
# Fields of get_state() that must match for set_state() (everything but the position).
STATE_CONFIG_FIELDS = (
    "task_name", "split", "seed", "sequence_length", "batch_size", "shuffle",
    "num_epochs", "pack", "shard_index", "num_shards", "inputs_length",
)
# Value of a field that states saved before the field existed lack.
_STATE_FIELD_DEFAULTS = {"inputs_length": None}


def _to_model_features(pack: bool, sequence_length: int):
    """tf map fn: keep the five model features with fixed dtypes.

    Without packing seqio emits no segment ids/positions; synthesize them as
    ``segment_ids = (targets != 0)`` and ``positions = arange(length)``.
    """
    def fn(ex):
        targets = tf.cast(ex["decoder_target_tokens"], tf.int32)
        if "decoder_segment_ids" in ex:
            segment_ids = tf.cast(ex["decoder_segment_ids"], tf.int32)
            positions = tf.cast(ex["decoder_positions"], tf.int32)
        else:
            segment_ids = tf.cast(tf.not_equal(targets, 0), tf.int32)
            positions = tf.range(sequence_length, dtype=tf.int32)
        return {
            "decoder_target_tokens": targets,
            "decoder_input_tokens": tf.cast(ex["decoder_input_tokens"], tf.int32),
            "decoder_loss_weights": tf.cast(ex["decoder_loss_weights"], tf.float32),
            "decoder_segment_ids": segment_ids,
            "decoder_positions": positions,
        }
    return fn


def _describe(task_name: str, split: str, shard_index: int, num_shards: int) -> str:
    pattern = _tasks.task_filepattern(task_name, split)
    where = f"task {task_name!r}, split {split!r}, file pattern {pattern!r}"
    return where + (f", shard {shard_index} of {num_shards}" if num_shards > 1 else "")


def is_prefix_lm(task: seqio.Task) -> bool:
    """Whether a task has a prompt ("inputs") besides its "targets"."""
    return "inputs" in task.output_features


def _feature_lengths(task: seqio.Task, sequence_length: int,
                     inputs_length: int | None) -> dict[str, int]:
    """seqio task feature lengths: targets only, or inputs + targets = sequence_length."""
    if not is_prefix_lm(task):
        if inputs_length is not None:
            raise ValueError(
                f"inputs_length={inputs_length} was given but task {task.name!r} has no "
                "\"inputs\" feature (it is plain LM). Fix: drop inputs_length.")
        return {"targets": sequence_length}
    if inputs_length is None:
        raise ValueError(
            f"Task {task.name!r} is prefix-LM (\"inputs\" + \"targets\") and needs "
            "inputs_length, the prompt part of sequence_length. Fix: set inputs_length "
            "(DatasetConfig.inputs_length), e.g. sequence_length // 2.")
    if not 0 < inputs_length < sequence_length:
        raise ValueError(f"inputs_length must be in (0, sequence_length={sequence_length}) "
                         f"to leave room for the response, got {inputs_length}.")
    return {"inputs": inputs_length, "targets": sequence_length - inputs_length}


def _validate(task_name: str, split: str, sequence_length: int, batch_size: int,
              num_epochs: int | None, shard_index: int, num_shards: int) -> seqio.Task:
    """Check arguments and that the split has input files; return the task."""
    if sequence_length <= 0 or batch_size <= 0:
        raise ValueError(f"sequence_length and batch_size must be positive, got "
                         f"{sequence_length} and {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
    task = seqio.get_mixture_or_task(task_name)
    if split not in task.splits:
        raise ValueError(f"task {task_name!r} has no split {split!r}; "
                         f"available: {sorted(task.splits)}")
    if not task.source.list_shards(split):
        raise ValueError(
            f"No input file matches the file pattern ({_describe(task_name, split, 0, 1)}). "
            "Fix the path, or re-register the task with register_text_lm_task(name, "
            "{split: existing_text_file}).")
    return task


def build_dataset(*, task_name: str, split: str, sequence_length: int, shuffle: bool,
                  seed: int, num_epochs: int | None, pack: bool, shard_index: int = 0,
                  num_shards: int = 1, inputs_length: int | None = None) -> tf.data.Dataset:
    """Unbatched, deterministic tf.data pipeline of model-feature examples.

    ``inputs_length`` is required for prefix-LM tasks and rejected for plain LM.
    """
    task = _validate(task_name, split, sequence_length, 1, num_epochs, shard_index,
                     num_shards)
    ds = seqio.get_dataset(
        mixture_or_task_name=task_name,
        task_feature_lengths=_feature_lengths(task, sequence_length, inputs_length),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=num_epochs,
        feature_converter=seqio.DecoderFeatureConverter(pack=pack),
        shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
        seed=seed,
        use_cached=False,
        verbose=False,
    )
    ds = ds.map(_to_model_features(pack, sequence_length),
                num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _count(ds: tf.data.Dataset, limit: int) -> int:
    return int(ds.take(limit).reduce(np.int64(0), lambda n, _: n + 1))


class ResumableBatchIterator:
    """Base of the resumable iterators: numpy batches of ``_examples()`` with a position.

    Subclasses set ``self._config`` (a JSON-serializable dict holding at least
    task_name, split, shard_index, num_shards, batch_size, num_epochs), list in
    ``state_config_fields`` the keys that must match on ``set_state``, and
    implement ``_examples()`` (the unbatched tf.data pipeline) and
    ``_describe_empty()``. Batches are full (drop_remainder); resuming
    (``start_batch=k`` or ``set_state``) rebuilds the pipeline and skips k
    batches, so it yields exactly batches k, k+1, ... of a fresh iterator
    (skipping costs time proportional to k).
    """

    state_config_fields: tuple[str, ...] = ()
    # False: no tf.data autotuning (same batches, default parallelism). Deleting
    # an autotuned iterator joins its "tf_data_model" thread, which was seen to
    # finish its wait of up to a minute first (elastic DiLoCo slices' exits).
    autotune: bool = True

    def _start(self, start_batch: int) -> None:
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self._batches_consumed = int(start_batch)
        self._reset()

    def _examples(self) -> tf.data.Dataset:
        raise NotImplementedError

    def _describe_empty(self, where: str) -> str:
        """The error for a split that yields no examples at all."""
        raise NotImplementedError

    def _reset(self) -> None:
        ds = self._examples().batch(self._config["batch_size"], drop_remainder=True)
        ds = ds.skip(self._batches_consumed).prefetch(tf.data.AUTOTUNE)
        if not self.autotune:
            options = tf.data.Options()
            options.autotune.enabled = False
            ds = ds.with_options(options)
        self._iterator = ds.as_numpy_iterator()

    @property
    def batches_consumed(self) -> int:
        return self._batches_consumed

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._raise_if_empty()
            raise
        self._batches_consumed += 1
        return batch

    def _raise_if_empty(self) -> None:
        """Turn an exhausted-at-once pipeline into a clear ValueError."""
        c = self._config
        if c["num_epochs"] is not None and self._batches_consumed > 0:
            return  # a finite pass that simply ended
        n = _count(self._examples(), c["batch_size"])
        where = _describe(c["task_name"], c["split"], c["shard_index"], c["num_shards"])
        if n == 0:
            raise ValueError(self._describe_empty(where))
        if n < c["batch_size"]:
            raise ValueError(
                f"The finite dataset ({where}, num_epochs={c['num_epochs']}) has only {n} "
                f"(packed) examples, fewer than one batch of batch_size={c['batch_size']}. "
                "Fix: lower batch_size, use num_epochs=None, or use eval_batches() which pads "
                "the last batch.")

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable position + config (see ``state_config_fields``)."""
        return dict(self._config, batches_consumed=self._batches_consumed)

    def set_state(self, state: dict[str, Any]) -> None:
        """Reposition after ``state["batches_consumed"]`` batches.

        Raises ValueError naming each field whose saved value differs from this
        iterator's config (the data stream would not be the same).
        """
        missing = object()
        diffs = []
        for k in self.state_config_fields:
            saved = state.get(k, _STATE_FIELD_DEFAULTS.get(k, missing))
            if saved is missing or saved != self._config[k]:
                shown = "<missing>" if saved is missing else repr(saved)
                diffs.append(f"{k!r}: saved={shown}, current={self._config[k]!r}")
        if diffs:
            raise ValueError("Data iterator state does not match this iterator's config; "
                             "differing fields: " + "; ".join(diffs))
        consumed = int(state["batches_consumed"])
        if consumed < 0:
            raise ValueError(f"batches_consumed must be >= 0, got {consumed}")
        self._batches_consumed = consumed
        self._reset()


class LMBatchIterator(ResumableBatchIterator):
    """Iterator of global-batch numpy dicts (``MODEL_FEATURE_KEYS``) with a resumable position.

    ``num_epochs=None`` repeats forever. ``inputs_length`` is the prompt part of
    ``sequence_length`` for prefix-LM tasks (required there, rejected for plain
    LM). ``autotune``: see ``ResumableBatchIterator.autotune``. See
    ``ResumableBatchIterator`` for resuming.
    """

    state_config_fields = STATE_CONFIG_FIELDS

    def __init__(self, *, task_name: str, split: str, sequence_length: int, batch_size: int,
                 shuffle: bool = True, seed: int = 0, num_epochs: int | None = None,
                 pack: bool = True, shard_index: int = 0, num_shards: int = 1,
                 start_batch: int = 0, inputs_length: int | None = None,
                 autotune: bool = True):
        self.autotune = bool(autotune)
        self._config = dict(
            task_name=task_name, split=split, seed=int(seed),
            sequence_length=int(sequence_length), batch_size=int(batch_size),
            shuffle=bool(shuffle), num_epochs=None if num_epochs is None else int(num_epochs),
            pack=bool(pack), shard_index=int(shard_index), num_shards=int(num_shards),
            inputs_length=None if inputs_length is None else int(inputs_length))
        task = _validate(task_name, split, sequence_length, batch_size, num_epochs,
                         shard_index, num_shards)
        _feature_lengths(task, sequence_length, inputs_length)
        self._start(start_batch)

    def _examples(self) -> tf.data.Dataset:
        return build_dataset(**{k: v for k, v in self._config.items() if k != "batch_size"})

    def _describe_empty(self, where: str) -> str:
        return (f"The dataset is empty: {where} yields no examples. Fix: point the split at "
                "a text file with at least one non-blank line (register_text_lm_task), "
                "or use fewer shards.")


def _pad_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pad a short final batch with all-zero rows (loss weight 0)."""
    n = next(iter(batch.values())).shape[0]
    if n == batch_size:
        return batch
    return {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


def eval_batches(*, task_name: str, split: str, sequence_length: int, batch_size: int,
                 max_batches: int | None = None, pack: bool = True, shard_index: int = 0,
                 num_shards: int = 1, inputs_length: int | None = None
                 ) -> list[dict[str, np.ndarray]]:
    """One deterministic pass (no shuffle, one epoch) as a list of full-size batches.

    Nothing is dropped: the last partial batch is padded with zero rows whose
    loss weights are 0. ``max_batches`` caps the number of batches. With
    several shards, hosts may get different batch counts.
    """
    _validate(task_name, split, sequence_length, batch_size, 1, shard_index, num_shards)
    ds = build_dataset(task_name=task_name, split=split, sequence_length=sequence_length,
                       shuffle=False, seed=0, num_epochs=1, pack=pack,
                       shard_index=shard_index, num_shards=num_shards,
                       inputs_length=inputs_length)
    ds = ds.batch(batch_size, drop_remainder=False)
    if max_batches is not None:
        ds = ds.take(max_batches)
    batches = [_pad_rows(b, batch_size) for b in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()]
    if not batches and max_batches != 0:
        raise ValueError(
            f"The dataset is empty: {_describe(task_name, split, shard_index, num_shards)} "
            "yields no examples. Fix: point the split at a text file with at least one "
            "non-blank line (register_text_lm_task), or use fewer shards.")
    return batches

