"""Weight-space merging: pure merges of parameter trees and their model-directory forms.

  interpolation    average (WARM), slerp / slerp_many / liti (WARP), normalized_weights
  task_arithmetic  theta_0 + sum_i lambda_i (theta_i - theta_0) (arXiv 2212.04089)
  ties             trim, elect sign, disjoint merge (TIES, arXiv 2306.01708)
  dare             drop and rescale task vectors, seeded (DARE, arXiv 2311.03099)
  model_stock      per-tensor interpolation towards the init (arXiv 2403.19522)
  greedy_soup      add a model only if a held-out metric improves (arXiv 2203.05482)
  ratatouille      with_head: an RM's backbone with the target probe (arXiv 2212.10445)
  leafwise         per-tensor merge rules over trees (per layer in scanned leaves),
                   shape checks
  streaming        the same rules leaf by leaf from orbax checkpoints
  model_dirs       load_models, write_model, merge_model_dirs, slerp_model_dirs,
                   liti_model_dirs, check_models, stream_merge_dirs

`from posttrain_jax import merging` gives all of them (merging.average,
merging.ties, merging.merge_model_dirs, ...).
"""

from posttrain_jax.merging.dare import dare, dare_rule
from posttrain_jax.merging.greedy_soup import SoupResult, greedy_soup
from posttrain_jax.merging.interpolation import (average, liti, normalized_weights, slerp,
                                                 slerp_many)
from posttrain_jax.merging.leafwise import merge_leaves
from posttrain_jax.merging.model_dirs import (LoadedModel, check_models, liti_model_dirs,
                                              load_models, merge_model_dirs,
                                              slerp_model_dirs, stream_merge_dirs,
                                              write_model)
from posttrain_jax.merging.model_stock import model_stock, model_stock_rule
from posttrain_jax.merging.ratatouille import with_head
from posttrain_jax.merging.streaming import stream_merge
from posttrain_jax.merging.task_arithmetic import (task_arithmetic, task_arithmetic_rule,
                                                   task_lambdas)
from posttrain_jax.merging.ties import ties, ties_rule
