"""Hugging Face checkpoint directories: config.json + safetensors, sharded or not.

Reading is lazy: `SafetensorsReader` knows every tensor's shape and dtype from
the file headers and loads one tensor at a time through safetensors' numpy API
(bfloat16 through ml_dtypes), so shapes are checked before anything is read and
a large checkpoint is never held twice. Writing produces what
`transformers.AutoModelForCausalLM.from_pretrained` reads: `model.safetensors`,
or `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` when
the tensors exceed one shard. No torch needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import glob
import json
import os
import re
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Side files copied through import/export unchanged (tokenizer, generation).
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json")
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


class HFCheckpointError(ValueError):
  """A missing or unreadable file in a Hugging Face checkpoint directory."""


def read_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, CONFIG)
  if not os.path.isfile(path):
    raise HFCheckpointError(f"{path} not found: --hf_dir must be a Hugging Face "
                            "model directory (config.json + *.safetensors).")
  try:
    with open(path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise HFCheckpointError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise HFCheckpointError(f"{path} does not hold a JSON object.")
  return config


class SafetensorsReader(Mapping):
  """Read-only mapping: HF tensor name -> numpy array, loaded on access.

  Attributes:
    shapes: name -> shape, from the headers.
    dtypes: name -> dtype name ("bfloat16", "float32", ...).
  """

  def __init__(self, hf_dir: str):
    self.directory = hf_dir
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map") or {}
      files = sorted(set(weight_map.values()))
      for name in files:
        if not os.path.isfile(os.path.join(hf_dir, name)):
          raise HFCheckpointError(f"{index} names {name}, which is not in {hf_dir}.")
    elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
      files = [SINGLE]
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
      raise HFCheckpointError(f"No *.safetensors weights in {hf_dir} (PyTorch .bin "
                              "checkpoints are not supported: re-save with "
                              "save_pretrained(..., safe_serialization=True)).")
    self._handles = {}
    self._file_of: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    for name in files:
      try:
        handle = safe_open(os.path.join(hf_dir, name), framework="numpy")
      except Exception as e:  # safetensors raises its own error types
        raise HFCheckpointError(f"Cannot read {os.path.join(hf_dir, name)}: {e}") from e
      self._handles[name] = handle
      for key in handle.keys():
        view = handle.get_slice(key)
        self._file_of[key] = name
        self.shapes[key] = tuple(view.get_shape())
        self.dtypes[key] = _DTYPES.get(view.get_dtype(), view.get_dtype().lower())

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._file_of:
      raise KeyError(key)
    return self._handles[self._file_of[key]].get_tensor(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._file_of)

  def __len__(self) -> int:
    return len(self._file_of)

  def stored_dtype(self) -> str:
    """The dtype most of the checkpoint's parameters are stored in."""
    counts: dict[str, int] = {}
    for key, dtype in self.dtypes.items():
      counts[dtype] = counts.get(dtype, 0) + int(np.prod(self.shapes[key]))
    return max(counts, key=counts.get) if counts else "float32"


def parse_size(text: str | int) -> int:
  """'5GB', '500MB', '10KB' or a byte count -> bytes (powers of 1000, like HF)."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
  if not m:
    raise ValueError(f"Cannot parse size {text!r}; use e.g. 5GB, 500MB or 10KB.")
  unit = (m.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  power = {"B": 0, "K": 1, "M": 2, "G": 3}[unit[0]]
  return int(float(m.group(1)) * base ** power)


def write_checkpoint(out_dir: str, config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray],
                     max_shard_bytes: int = 5 * 1000**3) -> list[str]:
  """Writes config.json and the safetensors shards; returns the files written."""
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  written = []
  if len(shards) == 1:
    save_file(dict(shards[0]), os.path.join(out_dir, SINGLE), metadata={"format": "pt"})
    written.append(SINGLE)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(dict(shard), os.path.join(out_dir, name), metadata={"format": "pt"})
      weight_map.update({k: name for k in shard})
      written.append(name)
    total = sum(int(a.nbytes) for a in tensors.values())
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                indent=2, sort_keys=True)
    written.append(INDEX)
  with open(os.path.join(out_dir, CONFIG), "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
    f.write("\n")
  written.append(CONFIG)
  return written
