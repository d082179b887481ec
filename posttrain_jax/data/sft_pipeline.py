"""SFT input pipeline: a chat task (data.chat) -> packed decoder batches with role loss weights.

Batches have the LM pipeline's keys (``pipeline.MODEL_FEATURE_KEYS``), each
``[batch_size, sequence_length]``: the trainers and the train job take them
unchanged. With ``pack`` (the default) several conversations share a row
(``seqio.utils.trim_and_pack_dataset``): ``decoder_segment_ids`` are 1, 2, ...
per conversation and 0 on padding, ``decoder_positions`` restart at 0 in
every conversation, and ``decoder_input_tokens`` are the targets shifted
right within each segment (0 at each conversation's start), so with the
model's segment-masked attention no token sees another conversation and a
packed row gives each conversation's logits as if it ran alone.
``decoder_loss_weights`` are the chat task's weights (model turns only,
unless the task trains on prompts; 0 on padding).

``SFTBatchIterator`` is resumable like ``pipeline.LMBatchIterator`` (the
number of batches consumed; ``get_state``/``set_state``). On construction it
checks the lengths (``chat.check_lengths``: overlong conversations counted,
refused under overlong="error") and keeps the count line in ``summary``.
"""

from __future__ import annotations

import numpy as np

from posttrain_jax.data import chat
from posttrain_jax.data import pipeline
from posttrain_jax.data._tf import tf
import seqio

STATE_CONFIG_FIELDS = (
    "task_name", "split", "seed", "sequence_length", "batch_size", "shuffle",
    "num_epochs", "pack", "shard_index", "num_shards",
)


def is_sft_task(task_name: str) -> bool:
    """Whether task_name was registered by chat.register_sft_task."""
    return chat.task_settings(task_name) is not None


def _to_model_features(packed: bool, length: int):
    def fn(ex):
        targets = tf.cast(ex["targets"], tf.int32)
        if packed:
            segment_ids = tf.cast(ex["targets_segment_ids"], tf.int32)
            positions = tf.cast(ex["targets_positions"], tf.int32)
        else:
            segment_ids = tf.cast(tf.not_equal(targets, 0), tf.int32)
            positions = tf.range(length, dtype=tf.int32) * segment_ids
        inputs = seqio.utils.make_autoregressive_inputs(
            targets, sequence_id=segment_ids if packed else None, output_dtype=tf.int32)
        return {
            "decoder_target_tokens": targets,
            "decoder_input_tokens": inputs,
            # the task stores 1 + weight (chat._dataset_fn); padding is 0
            "decoder_loss_weights": tf.cast(tf.maximum(ex["loss_weights"] - 1, 0), tf.float32),
            "decoder_segment_ids": segment_ids,
            "decoder_positions": positions,
        }
    return fn


def _validate(task_name: str, split: str, sequence_length: int, batch_size: int,
              num_epochs: int | None, shard_index: int, num_shards: int) -> chat.LengthReport:
    if not is_sft_task(task_name):
        raise ValueError(f"No SFT task {task_name!r} is registered. Fix: call "
                         "chat.register_sft_task(name, {split: files}) (gin: sft_task).")
    if sequence_length <= 0 or batch_size <= 0:
        raise ValueError(f"sequence_length and batch_size must be positive, got "
                         f"{sequence_length} and {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
    task = seqio.get_mixture_or_task(task_name)
    if split not in task.splits:
        raise ValueError(f"SFT task {task_name!r} has no split {split!r}; "
                         f"available: {sorted(task.splits)}")
    return chat.check_lengths(task_name, split, sequence_length)


def check(task_name: str, split: str, sequence_length: int) -> chat.LengthReport:
    """The checks of an SFT split that the iterators run (task, split, lengths)."""
    return _validate(task_name, split, sequence_length, 1, None, 0, 1)


def build_sft_dataset(*, task_name: str, split: str, sequence_length: int, shuffle: bool,
                      seed: int, num_epochs: int | None, pack: bool, shard_index: int = 0,
                      num_shards: int = 1) -> tf.data.Dataset:
    """Unbatched, deterministic tf.data pipeline of model-feature examples."""
    _validate(task_name, split, sequence_length, 1, num_epochs, shard_index, num_shards)
    lengths = {"targets": sequence_length, "loss_weights": sequence_length}
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(sequence_length=lengths, split=split, shuffle=shuffle, seed=seed,
                          shard_info=seqio.ShardInfo(shard_index, num_shards),
                          num_epochs=num_epochs, use_cached=False)
    ds = ds.map(lambda ex: {k: ex[k] for k in lengths})
    if pack:
        ds = seqio.utils.trim_and_pack_dataset(ds, lengths)
    else:
        ds = seqio.utils.trim_and_pad_dataset(ds, lengths)
    ds = ds.map(_to_model_features(pack, sequence_length),
                num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


class SFTBatchIterator(pipeline.ResumableBatchIterator):
    """Resumable iterator of packed SFT batches (``pipeline.MODEL_FEATURE_KEYS``).

    ``batch_size`` is this process's rows; with several hosts give each one
    ``shard_index=jax.process_index(), num_shards=jax.process_count()``.
    ``summary`` is the one-line count of conversations and of overlong ones.
    """

    state_config_fields = STATE_CONFIG_FIELDS

    def __init__(self, *, task_name: str, split: str, sequence_length: int, batch_size: int,
                 shuffle: bool = True, seed: int = 0, num_epochs: int | None = None,
                 pack: bool = True, shard_index: int = 0, num_shards: int = 1,
                 start_batch: int = 0):
        self._config = dict(
            task_name=task_name, split=split, seed=int(seed),
            sequence_length=int(sequence_length), batch_size=int(batch_size),
            shuffle=bool(shuffle), num_epochs=None if num_epochs is None else int(num_epochs),
            pack=bool(pack), shard_index=int(shard_index), num_shards=int(num_shards))
        self.report = _validate(task_name, split, sequence_length, batch_size, num_epochs,
                                shard_index, num_shards)
        self.summary = self.report.describe(task_name, split, sequence_length,
                                            chat.task_settings(task_name).overlong)
        self._start(start_batch)

    def _examples(self) -> tf.data.Dataset:
        return build_sft_dataset(**{k: v for k, v in self._config.items() if k != "batch_size"})

    def _describe_empty(self, where: str) -> str:
        return (f"The SFT dataset is empty: {where} yields no conversations. Fix: point "
                "the split at a JSONL file of conversations, or use fewer shards.")


def sft_eval_batches(*, task_name: str, split: str, sequence_length: int, batch_size: int,
                     max_batches: int | None = None, pack: bool = True, shard_index: int = 0,
                     num_shards: int = 1) -> list[dict[str, np.ndarray]]:
    """One unshuffled pass as full-size batches (the last padded with weight-0 rows)."""
    ds = build_sft_dataset(task_name=task_name, split=split, sequence_length=sequence_length,
                           shuffle=False, seed=0, num_epochs=1, pack=pack,
                           shard_index=shard_index, num_shards=num_shards)
    ds = ds.batch(batch_size, drop_remainder=False)
    if max_batches is not None:
        ds = ds.take(max_batches)
    batches = [pipeline._pad_rows(b, batch_size)  # pylint: disable=protected-access
               for b in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()]
    if not batches and max_batches != 0:
        raise ValueError(f"The SFT dataset is empty: task {task_name!r}, split {split!r} "
                         "yields no conversations. Fix: point the split at a JSONL file "
                         "of conversations, or use fewer shards.")
    return batches
