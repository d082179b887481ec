"""Model ratatouille's head swap: the backbone of one RM with the probe of another."""

import numpy as np
import pytest

from posttrain_jax import merging


def rm(v, head_dim=4):
  return {"backbone": {"layer": {"w": np.full((3, 4), v)}},
          "head": {"kernel": np.full((head_dim, 1), -v)}}


def test_with_head_keeps_the_backbone_and_takes_the_probe_head():
  aux, probe = rm(1.0), rm(7.0)
  out = merging.with_head(aux, probe)
  np.testing.assert_array_equal(out["backbone"]["layer"]["w"], 1.0)
  np.testing.assert_array_equal(out["head"]["kernel"], -7.0)
  # then re-fine-tuned members average like any WARM members
  avg = merging.average([merging.with_head(rm(1.0), probe), merging.with_head(rm(3.0), probe)])
  np.testing.assert_array_equal(avg["backbone"]["layer"]["w"], 2.0)
  np.testing.assert_array_equal(avg["head"]["kernel"], -7.0)


def test_with_head_rejects_non_reward_models_and_other_heads():
  with pytest.raises(ValueError, match="not a reward model's parameters"):
    merging.with_head({"layer": {}}, rm(1.0))
  with pytest.raises(ValueError, match=r"probe's head.*\(5, 1\)"):
    merging.with_head(rm(1.0), rm(2.0, head_dim=5))
