"""Model ratatouille for reward models (Ramé et al., 2023, "Model Ratatouille:
Recycling Diverse Models for Out-of-Distribution Generalization", arXiv
2212.10445, ICML 2023), transposed from classifiers to
Bradley-Terry reward models:

  1. fine-tune one RM per auxiliary preference task a_i from the SFT backbone;
  2. replace each auxiliary head by the target task's linear probe w_T:
       phi_i^0 = (backbone(theta_{a_i}), w_T);
  3. re-fine-tune each phi_i^0 on the target task -> phi_i;
  4. average: phi_rat = sum_i lambda_i phi_i (uniform, or a greedy soup).

"Inter-training" is the M = 1 case (one auxiliary task, no averaging); WARM
is the case where every member starts from the SFT backbone (no auxiliary
task). Step 2 is `with_head`; steps 1 and 3 are reward-model training runs and
step 4 `merging.average` / `merging.greedy_soup` (tools/run_ratatouille.sh).
"""

from __future__ import annotations

from typing import Any

from posttrain_jax.merging.leafwise import check_same_shapes, shapes


def with_head(params: Any, probe: Any) -> Any:
  """phi^0 = (params' backbone, probe's head): a reward model's parameters with its
  head replaced by another reward model's (the target task's linear probe)."""
  for name, tree in (("params", params), ("probe", probe)):
    if not isinstance(tree, dict) or set(tree) != {"backbone", "head"}:
      raise ValueError(f"{name} is not a reward model's parameters (top-level keys "
                       f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}"
                       ", expected backbone and head).")
  check_same_shapes([shapes(params["head"]), shapes(probe["head"])],
                    ["the reward model's head", "the probe's head"])
  return {"backbone": params["backbone"], "head": probe["head"]}
