"""Model presets (gin/models/gemma2_*.gin) read without gin.

Benchmarks run on machines whose image has no gin-config (the GPU image), so
this reads the `ModelConfig.FIELD = <Python literal>` lines of a model gin file
directly. Includes, macros and references need real gin
(`params_checkpoint.read_model_gin`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import os
import re

from posttrain_jax.models.config import ModelConfig

GIN_MODELS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "gin", "models")


def preset_path(name: str) -> str:
  """gin/models/gemma2_NAME.gin for a preset name, or NAME itself if it is a .gin path."""
  if name.endswith(".gin"):
    if not os.path.exists(name):
      raise ValueError(f"Model gin file not found: {name}.")
    return name
  path = os.path.join(GIN_MODELS_DIR, f"gemma2_{name}.gin")
  if not os.path.exists(path):
    raise ValueError(f"Unknown model preset {name!r}; presets: "
                     f"{', '.join(preset_names())} (or a .gin path).")
  return path


def preset_names() -> list[str]:
  return sorted(f[len("gemma2_"):-len(".gin")] for f in os.listdir(GIN_MODELS_DIR)
                if f.startswith("gemma2_") and f.endswith(".gin"))


def load_preset(name: str, **overrides) -> ModelConfig:
  """ModelConfig of a preset name or model gin path, with field overrides."""
  return ModelConfig(**{**read_literal_model_gin(preset_path(name)), **overrides})


def _suggest(word, options) -> str:
  close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
  return f" Did you mean: {', '.join(close)}?" if close else ""


_INCOMPLETE, _INVALID = object(), object()


def _literal(text: str):
  candidates = [text]
  if "#" in text:  # trailing comment (model gin values hold no '#')
    candidates.append("\n".join(l.split("#")[0] for l in text.splitlines()))
  for candidate in candidates:
    try:
      return ast.literal_eval(candidate.strip())
    except (ValueError, SyntaxError):
      pass
  stripped = candidates[-1]
  depth = sum(stripped.count(c) for c in "([{") - sum(stripped.count(c) for c in ")]}")
  return _INCOMPLETE if depth > 0 else _INVALID


def read_literal_model_gin(path: str) -> dict:
  """`ModelConfig.FIELD = <python literal>` lines of a gin file, without gin.

  Comments, blank lines and values spanning lines inside brackets are
  handled; anything else (includes, macros, references, other configurables)
  is a ValueError naming the line.
  """
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  kwargs = {}
  pending, start = "", 0
  with open(path) as f:
    lines = f.read().splitlines()
  for lineno, raw in enumerate(lines, 1):
    line = raw if pending else raw.strip()
    if not pending and (not line or line.startswith("#")):
      continue
    text = pending + "\n" + line if pending else line
    start = start if pending else lineno
    m = re.match(r"^ModelConfig\.(\w+)\s*=\s*(.+)$", text, re.S)
    if not m:
      raise ValueError(f"{path}:{lineno}: expected `ModelConfig.FIELD = VALUE` "
                       f"(a Python literal) without gin, got `{raw.strip()}`.")
    value = _literal(m.group(2))
    if value is _INCOMPLETE:
      pending = text
      continue
    pending = ""
    name = m.group(1)
    if value is _INVALID:
      raise ValueError(f"{path}:{start}: `{m.group(2).strip()}` is not a Python "
                       "literal; use --gin_file (needs gin-config) for gin syntax.")
    if name not in fields:
      raise ValueError(f"{path}:{start}: ModelConfig has no field '{name}'."
                       f"{_suggest(name, fields)}")
    kwargs[name] = value
  if pending:
    raise ValueError(f"{path}:{start}: unterminated value `{pending.strip()}`.")
  return kwargs
