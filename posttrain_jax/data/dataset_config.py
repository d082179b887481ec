"""Plain descriptions of input pipelines: LM/prefix-LM batches and prompts (no TensorFlow import)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """Which seqio task/split to read and how to batch it.

  batch_size is the global batch; each process reads batch_size / process_count
  rows of its own shard. sequence_length is the whole decoder length; for
  prefix-LM tasks ("inputs" prompt + "targets" response) inputs_length is the
  part of it the prompt may use (required there, None for plain LM tasks).
  """

  task_name: str
  split: str
  sequence_length: int
  batch_size: int
  shuffle: bool = True
  seed: int = 0
  pack: bool = True
  num_epochs: int | None = None  # None repeats forever (training)
  inputs_length: int | None = None  # prompt budget of prefix-LM tasks


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Prompts for online sampling or evaluation: a prompt task (data.prompts).

  batch_size is the global number of prompts per batch.
  """

  task_name: str
  split: str
  prompt_length: int
  batch_size: int
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None
