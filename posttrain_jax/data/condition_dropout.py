"""Condition dropout for classifier-free guidance (TF-free, numpy).

Classifier-free guidance (Ho & Salimans 2022; for LMs Cideron et al. 2024,
arXiv 2410.06084) needs one model that knows both l(.|y<t, c) and
l(.|y<t, null). A prefix-LM trained on (prompt c, response y) pairs only ever
sees responses after their prompts, so its unconditional branch would be
meaningless; condition dropout trains both: each row's prompt is dropped with
probability p, leaving the response right after the decoder's start token.

Rows are the pipeline's prefix-LM layout (t5x; `data.pipeline`, pack=False):
decoder_target_tokens = [c_1..c_m, y_1..y_n, pad], decoder_input_tokens = the
targets shifted right with 0 first, loss weights 1 on y only. A dropped row
becomes targets [y_1..y_n, pad], inputs [0, y_1..y_{n-1}, pad], weights 1 on
y, positions 0..n-1: y_1 is predicted from the start token 0 alone, which is
what the sampler's default null prompt (0,) feeds the unconditional branch
(`inference.sampling.SamplingConfig.null_prompt`). Plain LM training needs no
dropout: every document already starts after the start token 0.
"""

from __future__ import annotations

import numpy as np

KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
        "decoder_segment_ids", "decoder_positions")


def drop_condition_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One unpacked prefix-LM row without its prompt (module docstring)."""
  weights = np.asarray(row["decoder_loss_weights"])
  hot = np.flatnonzero(weights > 0)
  if hot.size == 0:
    return row
  m = int(hot[0])
  length = weights.shape[0]
  out = {}
  for key in KEYS:
    shifted = np.zeros_like(row[key])
    shifted[:length - m] = row[key][m:]
    out[key] = shifted
  out["decoder_input_tokens"][0] = 0   # the decoder start token
  real = out["decoder_segment_ids"] > 0
  out["decoder_positions"] = np.where(real, np.cumsum(real) - 1, 0).astype(
      row["decoder_positions"].dtype)
  return out


def drop_conditions(batch: dict[str, np.ndarray], p: float,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Drops each row's prompt with probability p (rows chosen by rng); returns a
  new batch. Rejects packed rows (several segments) and p outside [0, 1]."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"condition_dropout must be in [0, 1], got {p}.")
  missing = [k for k in KEYS if k not in batch]
  if missing:
    raise ValueError(f"condition dropout needs prefix-LM batches with {KEYS}; missing "
                     f"{missing}.")
  if np.any(np.asarray(batch["decoder_segment_ids"]) > 1):
    raise ValueError("condition dropout works on unpacked prefix-LM rows (one segment "
                     "each); set the train DatasetConfig.pack = False.")
  drop = rng.random(batch["decoder_input_tokens"].shape[0]) < p
  out = {k: np.array(v, copy=True) for k, v in batch.items()}
  for i in np.flatnonzero(drop):
    row = drop_condition_row({k: out[k][i] for k in KEYS})
    for k in KEYS:
      out[k][i] = row[k]
  return out
