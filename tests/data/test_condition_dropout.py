"""Condition dropout on prefix-LM rows (the unconditional branch of CFG)."""

import numpy as np
import pytest

from posttrain_jax.data.condition_dropout import drop_condition_row, drop_conditions


def _batch():
  # prompt [5, 6, 7] + response [8, 9, 1]; second row prompt [4] + response [3, 1]
  targets = np.array([[5, 6, 7, 8, 9, 1, 0, 0], [4, 3, 1, 0, 0, 0, 0, 0]], np.int32)
  inputs = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], 1)
  weights = np.array([[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0]], np.float32)
  seg = (targets > 0).astype(np.int32)
  pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": weights, "decoder_segment_ids": seg,
          "decoder_positions": pos}


def test_dropped_row_is_the_response_after_the_start_token():
  b = _batch()
  row = drop_condition_row({k: v[0] for k, v in b.items()})
  np.testing.assert_array_equal(row["decoder_target_tokens"], [8, 9, 1, 0, 0, 0, 0, 0])
  # inputs = targets shifted right, as the pipeline lays them out (EOS past the end)
  np.testing.assert_array_equal(row["decoder_input_tokens"], [0, 8, 9, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["decoder_loss_weights"], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["decoder_segment_ids"], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["decoder_positions"], [0, 1, 2, 0, 0, 0, 0, 0])


def test_probability_endpoints_and_reproducibility():
  b = _batch()
  same = drop_conditions(b, 0.0, np.random.default_rng(0))
  for k in b:
    np.testing.assert_array_equal(same[k], b[k])
  every = drop_conditions(b, 1.0, np.random.default_rng(0))
  np.testing.assert_array_equal(every["decoder_target_tokens"][1, :3], [3, 1, 0])
  np.testing.assert_array_equal(b["decoder_target_tokens"][1, :3], [4, 3, 1])  # input kept
  rows = {k: np.repeat(v, 200, 0) for k, v in b.items()}
  a = drop_conditions(rows, 0.3, np.random.default_rng([1, 2]))
  c = drop_conditions(rows, 0.3, np.random.default_rng([1, 2]))
  dropped = np.mean(a["decoder_target_tokens"][:, 0] != rows["decoder_target_tokens"][:, 0])
  np.testing.assert_array_equal(a["decoder_target_tokens"], c["decoder_target_tokens"])
  assert 0.22 < dropped < 0.38


def test_bad_inputs_rejected():
  b = _batch()
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    drop_conditions(b, 1.5, np.random.default_rng(0))
  packed = dict(b, decoder_segment_ids=b["decoder_segment_ids"] * 2)
  with pytest.raises(ValueError, match="pack = False"):
    drop_conditions(packed, 0.5, np.random.default_rng(0))
