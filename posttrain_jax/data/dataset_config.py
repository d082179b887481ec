"""Plain description of an input pipeline (no TensorFlow import)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Which seqio task/split to read and how to batch it.

  batch_size is the global batch; each process reads batch_size / process_count
  rows of its own shard.
  """

  task_name: str
  split: str
  sequence_length: int
  batch_size: int
  shuffle: bool = True
  seed: int = 0
  pack: bool = True
  num_epochs: int | None = None  # None repeats forever (training)
